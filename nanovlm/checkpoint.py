"""nanoVLM checkpoint files: config.json + model.safetensors (+ our tokenizer files), read strictly.

Format identical to nanoVLM's: module names `vision_encoder.*`, `MP.*`, `decoder.*`; the tied
embedding/head matrix is stored once (safetensors' `save_model` keeps `decoder.head.weight`).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_model

from core.config import VLMConfig, read_config_json
from core.files import staged_dir
from core.processors import Tokenizer

from .idefics3 import is_idefics3, load_idefics3

if TYPE_CHECKING:
    from .train_config import TrainConfig
    from .vision_language_model import VisionLanguageModel

log = logging.getLogger(__name__)

TIED = ("decoder.head.weight", "decoder.token_embedding.weight")


def resolve_checkpoint(src: str, revision: str | None = None) -> str:
    """Local directory of a checkpoint; Hub ids are downloaded (config, weights, tokenizer if any)."""
    if os.path.isdir(src):
        return src
    if os.path.exists(src):
        raise ValueError(
            f"{src} is a file; a checkpoint is a directory with config.json and model.safetensors"
        )
    from core.hub import snapshot

    return snapshot(
        src,
        revision,
        "pass a local folder with the checkpoint's files (config.json, model.safetensors) instead",
        allow_patterns=[
            "config.json",
            "model*.safetensors*",
            "tokenizer*",
            "README.md",
            "processor_config.json",
            "preprocessor_config.json",
            "chat_template.json",
            "chat_template.jinja",
            "special_tokens_map.json",
        ],
    )


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Copy every tensor of a safetensors file into `model`, refusing missing, extra or mis-shaped ones."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights not found: {path}")
    expected = model.state_dict()
    try:
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            missing = [k for k in expected if k not in keys]
            tied = getattr(model, "cfg", None) is not None and model.cfg.lm_tie_weights
            if tied:  # either name of the shared matrix is enough
                if any(name in keys for name in TIED):
                    missing = [k for k in missing if k not in TIED]
            unexpected = sorted(keys - set(expected))
            if missing or unexpected:
                raise ValueError(
                    f"{path} does not match the config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                    f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
                )
            with torch.no_grad():
                for key in sorted(keys):
                    tensor = f.get_tensor(key)
                    if tuple(tensor.shape) != tuple(expected[key].shape):
                        raise ValueError(
                            f"{path}: {key} has shape {tuple(tensor.shape)} but config.json implies "
                            f"{tuple(expected[key].shape)}: the config contradicts the weights"
                        )
                    expected[key].copy_(tensor)
    except SafetensorError as e:
        raise ValueError(f"{path}: not a valid or complete safetensors file ({e})") from None
    if tied:
        model.decoder.head.weight = model.decoder.token_embedding.weight


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def refuse_pickle(directory: str) -> None:
    """A directory with pickle weights but no safetensors: say why it is refused and what to do."""
    pickles = sorted(f for f in os.listdir(directory) if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ValueError(
            f"{directory} holds {pickles[0]}, a pickle checkpoint: refused, since unpickling can run code. "
            'Convert it once where you trust the file: python -c "import torch; from safetensors.torch import '
            f"save_file; save_file(torch.load('{pickles[0]}', weights_only=True), 'model.safetensors')\""
        )


def load_checkpoint(
    cls: type[VisionLanguageModel], src: str, revision: str | None = None
) -> VisionLanguageModel:
    directory = resolve_checkpoint(src, revision)
    raw = read_config_json(os.path.join(directory, "config.json"))
    if is_idefics3(raw):  # a transformers Idefics3 / SmolVLM checkpoint
        return load_idefics3(cls, directory, revision, hf=raw)
    cfg = VLMConfig.from_dict(raw, source=os.path.join(directory, "config.json"))
    weights = os.path.join(directory, "model.safetensors")
    if not os.path.exists(weights):
        refuse_pickle(directory)
        raise FileNotFoundError(f"weights not found: {weights}")
    model = cls(cfg, load_backbone=False, tokenizer=Tokenizer.of_checkpoint(directory, cfg))
    load_weights(model, weights)
    model.eval()
    return model


def save_checkpoint(
    model: VisionLanguageModel, directory: str | os.PathLike, extra: Callable[[str], None] | None = None
) -> None:
    """Write the checkpoint to a temp dir (plus whatever `extra(tmp_dir)` adds), then rename it into place."""
    with staged_dir(directory) as tmp:
        model.cfg.save(os.path.join(tmp, "config.json"))
        save_model(model, os.path.join(tmp, "model.safetensors"))
        if model.tokenizer is not None:
            model.tokenizer.save(tmp)
        if extra is not None:
            extra(tmp)


# ----------------------------------------------------------------------------- training state
STATE_FILE = "train_state.pt"  # optimizer, scheduler and RNG state next to the weights


def save_training_state(model, optimizer, scheduler, step: int, consumed: int, tc: TrainConfig) -> None:
    """The checkpoint plus what resuming needs, written whole to output_dir/checkpoint."""

    def extra(tmp: str) -> None:
        state = {
            "step": step,
            "consumed": consumed,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": list(random.getstate()[1]),
        }
        torch.save(state, os.path.join(tmp, STATE_FILE))
        tc.save(os.path.join(tmp, "train_config.json"))

    save_checkpoint(model, os.path.join(tc.output_dir, "checkpoint"), extra=extra)


def check_same_architecture(saved: VLMConfig, current: VLMConfig, where: str) -> None:
    a, b = saved.to_dict(), current.to_dict()
    shape_keys = [
        k for k in b if k.startswith(("vit_", "lm_", "mp_")) and not k.endswith(("_type", "_tokenizer"))
    ]
    diff = [f"{k}: checkpoint {a.get(k)!r} vs run {b.get(k)!r}" for k in shape_keys if a.get(k) != b.get(k)]
    if diff:
        raise ValueError(f"cannot resume from {where}: different architecture ({'; '.join(diff)})")


def load_training_state(model, optimizer, scheduler, ckpt: str) -> tuple[int, int]:
    """Restore weights and training state from `ckpt` -> (step, samples consumed per rank)."""
    if not os.path.exists(os.path.join(ckpt, STATE_FILE)):
        raise FileNotFoundError(f"resume: no checkpoint with {STATE_FILE} in {ckpt}")
    check_same_architecture(VLMConfig.load(os.path.join(ckpt, "config.json")), model.cfg, ckpt)
    load_weights(model, os.path.join(ckpt, "model.safetensors"))
    state = torch.load(os.path.join(ckpt, STATE_FILE), weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate((3, tuple(state["python_rng"]), None))
    log.info("resumed from %s at step %d", ckpt, state["step"])
    return state["step"], state["consumed"]
