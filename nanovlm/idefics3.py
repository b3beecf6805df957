"""Idefics3 / SmolVLM checkpoints in transformers' format -> our VisionLanguageModel.

SmolVLM-256M/500M-Instruct (`Idefics3ForConditionalGeneration`, and `SmolVLMForConditionalGeneration`
where it is the same model) are the nanoVLM architecture: a SigLIP vision transformer, a pixel
shuffle by `scale_factor` then one bias-free linear (the same channel order as ours), and a Llama
decoder whose `<image>` positions take the image embeddings. Only names differ, so loading is a
config mapping and a weight table. What differs is the processing around the model (tile order,
LANCZOS resizing, [-1, 1] pixels, `<fake_token_around_image>` prompts): `vlm_format="idefics3"`
selects core/idefics3.py, with the checkpoint's processor settings and chat template.
"""

from __future__ import annotations

import logging
import math
import os

import torch

from core.config import VLMConfig, read_config_json
from core.idefics3 import settings_from_processor
from core.processors import Tokenizer
from core.video import settings_from_processor as video_settings

from .hf_weights import TensorSource, copy_into, read_hf_config, resolve_file
from .language_model import LanguageModel, llama_weight_table
from .vision_transformer import ViT, fuse_qkv, siglip_weight_table

log = logging.getLogger(__name__)

ARCHITECTURES = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
MODEL_TYPES = ("idefics3", "smolvlm")
# Idefics3's processor tokens, by our extra-token keys (tile markers r{i}c{j} as in nanoVLM)
TOKENS = {
    "image_token": "<image>",
    "global_image_token": "<global-img>",
    "fake_image_token": "<fake_token_around_image>",
}
TOKENS |= {f"r{r}c{c}": f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)}


def is_idefics3(hf: dict) -> bool:
    """Whether a config.json is an Idefics3 / SmolVLM checkpoint's."""
    return hf.get("model_type") in MODEL_TYPES or any(
        a in ARCHITECTURES for a in hf.get("architectures") or []
    )


def read_processing(directory: str, revision: str | None = None) -> tuple[dict, int | None, str, dict | None]:
    """(image-processor settings dict, image_seq_len, chat template, video-processor settings dict
    or None) from a checkpoint's processor files: processor_config.json (transformers 5) or
    preprocessor_config.json (+ video_preprocessor_config.json: SmolVLM2), and the chat template
    from chat_template.jinja, chat_template.json, processor_config.json or tokenizer_config.json."""

    def load(name: str) -> dict | None:
        path = resolve_file(directory, name, revision, required=False)
        return read_config_json(path) if path else None

    processor, pre = load("processor_config.json") or {}, load("preprocessor_config.json")
    image = processor.get("image_processor") or pre
    video = processor.get("video_processor") or load("video_preprocessor_config.json")
    if not image:
        raise FileNotFoundError(
            f"{directory}: no image processor settings (processor_config.json or preprocessor_config.json)"
        )
    seq_len = processor.get("image_seq_len", (pre or {}).get("image_seq_len"))
    template = processor.get("chat_template")
    jinja = resolve_file(directory, "chat_template.jinja", revision, required=False)
    if jinja:
        with open(jinja) as f:
            template = f.read()
    template = template or (load("chat_template.json") or {}).get("chat_template")
    template = template or (load("tokenizer_config.json") or {}).get("chat_template")
    if not isinstance(template, str) or not template:
        raise FileNotFoundError(
            f"{directory}: no chat template (chat_template.jinja / .json, processor_config.json)"
        )
    return image, seq_len, template, video


def idefics3_config(
    hf: dict,
    processor: dict,
    chat_template: str,
    image_seq_len: int | None = None,
    where: str = "config.json",
    video: dict | None = None,
) -> VLMConfig:
    """Our VLMConfig for an Idefics3 config dict and its processor settings; unsupported settings
    are named."""
    vision, text = hf.get("vision_config") or {}, hf.get("text_config") or {}
    if not vision or not text:
        raise ValueError(f"{where}: an Idefics3 config needs vision_config and text_config")
    act = vision.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise ValueError(
            f"{where}: vision_config.hidden_act={act!r} is not supported (only gelu_pytorch_tanh)"
        )
    if text.get("model_type", "llama") != "llama":
        raise ValueError(
            f"{where}: text_config.model_type={text.get('model_type')!r} is not supported (only llama)"
        )
    if text.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"{where}: text_config.hidden_act={text.get('hidden_act')!r} is not supported (only silu)"
        )
    for key in ("attention_bias", "mlp_bias"):
        if text.get(key):
            raise ValueError(f"{where}: text_config.{key}=true is not supported")
    if "image_token_id" not in hf:
        raise ValueError(f"{where}: no image_token_id")
    scale = hf.get("scale_factor", 2)
    cfg = VLMConfig(vit_model_type="", lm_model_type="", lm_tokenizer="")
    ViT.config_from_hf(vision, cfg)
    # the text vocabulary already holds the image tokens: nothing is appended after it
    cfg.vlm_extra_tokens, cfg.extra_token_amount = dict(TOKENS), 0
    LanguageModel.config_from_hf(text, cfg)
    cfg.lm_vocab_size = cfg.lm_base_vocab_size = text["vocab_size"]
    # the top-level flag is the one transformers ties by (text_config may say otherwise)
    cfg.lm_tie_weights = bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    cfg.vlm_image_token_id = int(hf["image_token_id"])
    cfg.mp_pixel_shuffle_factor = scale
    cfg.mp_image_token_length = cfg.image_token_count
    settings = settings_from_processor(processor, f"{where}: image processor")
    if video:  # frames are normalised as images are (core/video.py): other settings are named
        cfg.vlm_video_processor = video_settings(video, f"{where}: video processor")
        for key, ours in (("image_mean", settings["mean"]), ("image_std", settings["std"])):
            if key in video and [float(x) for x in video[key]] != ours:
                raise ValueError(
                    f"{where}: video processor {key}={video[key]} differs from the image processor's"
                )
        if video.get("resample", settings["resample"]) != settings["resample"]:
            raise ValueError(
                f"{where}: video processor resample={video['resample']} differs from the image processor's"
            )
    if settings["tile"] != cfg.vit_img_size:
        raise ValueError(
            f"{where}: max_image_size.longest_edge={settings['tile']} differs from the vision "
            f"encoder's image_size={cfg.vit_img_size}"
        )
    if image_seq_len is not None and image_seq_len != cfg.image_token_count:
        raise ValueError(
            f"{where}: image_seq_len={image_seq_len} but the model emits {cfg.image_token_count} "
            "image tokens per tile"
        )
    cfg.vlm_image_processor = settings
    # the largest tile grid an image can get (TensorRT profiles are sized by it)
    cfg.max_img_size = math.ceil(settings["longest_edge"] / cfg.vit_img_size) * cfg.vit_img_size
    cfg.lm_chat_template = chat_template
    cfg.vlm_format = "idefics3"
    cfg.validate()
    return cfg


def idefics3_weight_table(cfg: VLMConfig) -> dict[str, str]:
    """transformers' Idefics3 tensor name -> our name (q/k/v fused and embeddings copied apart)."""
    table = {
        k: f"vision_encoder.{v}"
        for k, v in siglip_weight_table(cfg.vit_n_blocks, "model.vision_model.").items()
    }
    table |= {k: f"decoder.{v}" for k, v in llama_weight_table(cfg.lm_n_blocks, "model.text_model.").items()}
    table["model.connector.modality_projection.proj.weight"] = "MP.proj.weight"
    table["model.text_model.embed_tokens.weight"] = "decoder.token_embedding.weight"
    if not cfg.lm_tie_weights:
        table["lm_head.weight"] = "decoder.head.weight"
    return table


def load_idefics3(
    cls: type, directory: str, revision: str | None = None, hf: dict | None = None
) -> torch.nn.Module:
    """A VisionLanguageModel (cls) with the weights and tokenizer of an Idefics3 checkpoint directory
    or Hub id (`hf`: its config.json, when already read)."""
    hf = hf or read_hf_config(directory, revision)  # config.json, unless the caller has read it
    image, seq_len, template, video = read_processing(directory, revision)
    cfg = idefics3_config(hf, image, template, seq_len, os.path.join(directory, "config.json"), video)
    model = cls(cfg, load_backbone=False)
    source = TensorSource(directory, revision)
    table = idefics3_weight_table(cfg)
    qkv = {
        f"model.vision_model.encoder.layers.{i}.self_attn.{p}_proj.{k}"
        for i in range(cfg.vit_n_blocks)
        for p in "qkv"
        for k in ("weight", "bias")
    }
    unexpected = sorted(source.keys() - set(table) - qkv)
    filled = set(table.values()) | {
        f"vision_encoder.blocks.{i}.attn.qkv_proj.{k}"
        for i in range(cfg.vit_n_blocks)
        for k in ("weight", "bias")
    }
    params = {
        name for name, _ in model.named_parameters(remove_duplicate=False)
    }  # buffers come from the config
    missing = sorted(params - filled - ({"decoder.head.weight"} if cfg.lm_tie_weights else set()))
    if unexpected or missing:
        raise ValueError(
            f"{directory}: the weights do not match an Idefics3 model of this config: "
            f"unexpected {unexpected[:4]}, missing {missing[:4]}"
        )
    copy_into(model, source, table)
    fuse_qkv(model.vision_encoder, source, "model.vision_model.", cfg.vit_n_blocks)
    if cfg.lm_tie_weights:
        model.decoder.head.weight = model.decoder.token_embedding.weight
    model.tokenizer = Tokenizer.of_checkpoint(directory, cfg)
    log.info(
        "loaded Idefics3 checkpoint %s (%d params)", directory, sum(p.numel() for p in model.parameters())
    )
    return model.eval()
