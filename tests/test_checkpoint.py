import json
import os

import pytest
import torch
from safetensors.torch import save_file

from core.config import VLMConfig
from core.processors import Tokenizer
from nanovlm.vision_language_model import VisionLanguageModel
from tests.conftest import tiny_config

# The VLMConfig fields of nanoVLM releases: a config.json we write must only use these, since
# nanoVLM builds its config with VLMConfig(**json).
NANOVLM_V02_FIELDS = {
    "vit_hidden_dim",
    "vit_inter_dim",
    "vit_patch_size",
    "vit_img_size",
    "vit_n_heads",
    "vit_dropout",
    "vit_n_blocks",
    "vit_ln_eps",
    "vit_cls_flag",
    "vit_model_type",
    "lm_hidden_dim",
    "lm_inter_dim",
    "lm_rms_eps",
    "lm_re_base",
    "lm_max_position_embeddings",
    "lm_base_vocab_size",
    "extra_token_amount",
    "lm_vocab_size",
    "lm_n_heads",
    "lm_n_kv_heads",
    "lm_dropout",
    "lm_n_blocks",
    "lm_attn_scaling",
    "lm_max_length",
    "lm_use_tokens",
    "lm_tie_weights",
    "lm_model_type",
    "lm_tokenizer",
    "lm_chat_template",
    "mp_pixel_shuffle_factor",
    "mp_image_token_length",
    "max_img_size",
    "resize_to_max_side_len",
    "vlm_extra_tokens",
    "vlm_load_backbone_weights",
    "vlm_checkpoint_path",
    "hf_repo_name",
}
# nanoVLM v0.1's VLMConfig: v0.2's without its image-token and chat fields, with an EOS id
V02_ADDED = "lm_base_vocab_size extra_token_amount lm_chat_template mp_image_token_length max_img_size"
NANOVLM_V01_FIELDS = NANOVLM_V02_FIELDS - {
    *V02_ADDED.split(),
    "resize_to_max_side_len",
    "vlm_extra_tokens",
} | {"lm_eos_token_id"}


def _model(placement="replace", tokenizer=None):
    torch.manual_seed(0)
    return VisionLanguageModel(tiny_config(placement), load_backbone=False, tokenizer=tokenizer).eval()


def _inputs(cfg):
    ids = torch.randint(3, 300, (2, 6))
    if cfg.image_placement == "replace":
        ids = torch.cat([ids[:, :1], torch.full((2, 4), cfg.image_token_id), ids[:, 1:]], 1)
    return ids, torch.rand(2, 3, 32, 32)


@pytest.mark.parametrize("placement", ["replace", "prefix"])
def test_round_trip_gives_same_logits(tmp_path, placement):
    m = _model(placement)
    m.save_pretrained(tmp_path / "ckpt")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp dirs left behind
    again = VisionLanguageModel.from_pretrained(str(tmp_path / "ckpt"))
    ids, imgs = _inputs(m.cfg)
    with torch.no_grad():
        assert torch.equal(m(ids, imgs)[0], again(ids, imgs)[0])
    assert again.decoder.head.weight is again.decoder.token_embedding.weight  # still tied
    fields = NANOVLM_V02_FIELDS if placement == "replace" else NANOVLM_V01_FIELDS
    assert set(json.loads((tmp_path / "ckpt" / "config.json").read_text())) <= fields


def test_tied_matrix_is_stored_once_under_nanovlm_names(tmp_path):
    m = _model()
    m.save_pretrained(tmp_path / "ckpt")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "decoder.head.weight" in keys and "decoder.token_embedding.weight" not in keys
    assert "decoder.rotary_embd.inv_freq" in keys  # nanoVLM's strict loader expects the buffer
    assert {k.split(".")[0] for k in keys} == {"vision_encoder", "MP", "decoder"}


def test_tokenizer_is_saved_with_checkpoint(tmp_path, tiny_tokenizer_dir):
    cfg = tiny_config()
    tok = Tokenizer.from_dir(tiny_tokenizer_dir, cfg)
    m = VisionLanguageModel(cfg, load_backbone=False, tokenizer=tok)
    m.save_pretrained(tmp_path / "ckpt")
    again = VisionLanguageModel.from_pretrained(str(tmp_path / "ckpt"))
    assert again.tokenizer is not None
    assert again.tokenizer.token_id("image_token") == cfg.image_token_id == 300
    text = "How many red circles?"
    assert again.tokenizer.encode(text) == tok.encode(text)


def _write_nanovlm_checkpoint(tmp_path, placement):
    """A checkpoint as nanoVLM's own save_pretrained writes it: its config keys, its tensor names,
    the tied matrix once (as decoder.head.weight), the RoPE buffer included."""
    m = _model(placement)
    sd = {k: v.clone() for k, v in m.state_dict().items() if k != "decoder.token_embedding.weight"}
    d = tmp_path / f"nanovlm-{placement}"
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = m.cfg.to_dict()
    if placement == "prefix":
        cfg["lm_eos_token_id"] = 0  # retired key v0.1 configs carry
    (d / "config.json").write_text(json.dumps(cfg))
    return m, d


@pytest.mark.parametrize("placement", ["replace", "prefix"])
def test_loads_nanovlm_written_checkpoint(tmp_path, placement):
    m, d = _write_nanovlm_checkpoint(tmp_path, placement)
    loaded = VisionLanguageModel.from_pretrained(str(d))
    assert loaded.cfg.image_placement == placement
    ids, imgs = _inputs(m.cfg)
    with torch.no_grad():
        assert torch.equal(m(ids, imgs)[0], loaded(ids, imgs)[0])


def test_missing_weights_file(tmp_path):
    _, d = _write_nanovlm_checkpoint(tmp_path, "replace")
    os.remove(d / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        VisionLanguageModel.from_pretrained(str(d))


def test_truncated_weights_file(tmp_path):
    _, d = _write_nanovlm_checkpoint(tmp_path, "replace")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: not a valid or complete safetensors"):
        VisionLanguageModel.from_pretrained(str(d))


def test_config_contradicting_weights(tmp_path):
    _, d = _write_nanovlm_checkpoint(tmp_path, "replace")
    cfg = json.loads((d / "config.json").read_text())
    cfg["lm_inter_dim"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mlp.*has shape .* config.json implies"):
        VisionLanguageModel.from_pretrained(str(d))


def test_missing_tensor_is_named(tmp_path):
    m, d = _write_nanovlm_checkpoint(tmp_path, "replace")
    sd = {
        k: v
        for k, v in m.state_dict().items()
        if k not in ("MP.proj.weight", "decoder.token_embedding.weight")
    }
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="missing \\['MP.proj.weight'\\]"):
        VisionLanguageModel.from_pretrained(str(d))


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    m = _model()
    m.save_pretrained(tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("nanovlm.checkpoint.save_model", boom)
    with pytest.raises(OSError, match="disk full"):
        m.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_checkpoint_path_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        VisionLanguageModel.from_pretrained(str(tmp_path / "f"))


def test_config_missing(tmp_path):
    (tmp_path / "ck").mkdir()
    with pytest.raises(FileNotFoundError, match="config not found"):
        VisionLanguageModel.from_pretrained(str(tmp_path / "ck"))


def test_vlm_config_module_is_torch_free():
    import subprocess
    import sys

    code = "import sys, core.config, core.processors; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert VLMConfig  # imported above for the fixture module
