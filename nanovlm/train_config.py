"""TrainConfig: everything a training run needs, as a JSON round-trippable dataclass."""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass
from typing import Any

from core.config import check_types
from core.files import atomic_write


@dataclass
class TrainConfig:
    # --- what to train ---
    model: str = (
        "tiny"  # "tiny" (built-in default), a checkpoint dir, or a VLMConfig .json (loads its backbones)
    )
    dataset: str = "shapes"  # "shapes" (built-in) or "hf:NAME[:SUBSET]" (the_cauldron / FineVision records)
    dataset_split: str = "train"
    streaming: bool = False  # stream the Hugging Face dataset instead of downloading it whole
    shapes_image_size: int = 128  # side of the rendered built-in images
    shapes_length: int = 200_000  # samples per epoch of the built-in data
    shapes_all_questions: bool = True  # train on every question type about each image, as one chat
    # --- optimisation; a learning rate of 0 freezes that part ---
    lr_mp: float = 3e-4
    lr_vision_backbone: float = 3e-4
    lr_language_backbone: float = 3e-4
    weight_decay: float = 0.0
    batch_size: int = 16  # per process, per micro-batch
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    warmup_ratio: float = 0.03  # linear warmup over this share of the steps ...
    min_lr_ratio: float = 0.05  # ... then cosine decay to this share of each peak lr
    max_training_steps: int = 4000  # optimizer steps
    max_epochs: float = 0.0  # stop after this many passes over the data as well (0 = no limit)
    max_sample_length: int = 192  # longer samples are skipped and counted, never truncated
    # --- evaluation, logging, checkpoints ---
    eval_interval: int = 1000  # optimizer steps between evaluations (0 = only at the end)
    eval_samples: int = 240  # validation samples for loss and exact-match accuracy
    target_accuracy: float = 0.0  # stop once validation accuracy reaches this at an evaluation (0 = off)
    log_interval: int = 10
    checkpoint_interval: int = 500  # optimizer steps between checkpoints
    output_dir: str = "artifacts/tiny"
    resume: bool = False  # continue from output_dir/checkpoint
    overwrite: bool = False  # start afresh over an earlier run in output_dir (without it: refused)
    # --- execution ---
    mixed_precision: str = "auto"  # "auto" (bf16 autocast on GPUs that support it), "bf16", "no"
    compile: bool = False  # torch.compile the model
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(type(self), dataclasses.asdict(self), "TrainConfig")
        at_least = {
            "batch_size": 1,
            "gradient_accumulation_steps": 1,
            "max_training_steps": 1,
            "log_interval": 1,
            "checkpoint_interval": 1,
            "max_sample_length": 2,
            "shapes_image_size": 8,
            "shapes_length": 1,
            "eval_interval": 0,
            "eval_samples": 0,
            "max_epochs": 0,
            "weight_decay": 0,
            "max_grad_norm": 0,
            "lr_mp": 0,
            "lr_vision_backbone": 0,
            "lr_language_backbone": 0,
        }
        for key, low in at_least.items():
            if getattr(self, key) < low:
                raise ValueError(f"TrainConfig: {key}={getattr(self, key)} must be at least {low}")
        for key in ("warmup_ratio", "min_lr_ratio", "target_accuracy"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"TrainConfig: {key}={getattr(self, key)} must be in [0, 1]")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise ValueError(
                f"TrainConfig: mixed_precision={self.mixed_precision!r}: expected auto, bf16 or no"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "train config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
            )
        check_types(cls, data, source)
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        with atomic_write(path) as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f), source=str(path))

    def override(self, assignments: list[str]) -> TrainConfig:
        """Apply CLI overrides like ["batch_size=16", "lr_mp=1e-3", "resume=true"]."""
        hints = typing.get_type_hints(type(self))
        data = self.to_dict()
        for item in assignments:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ValueError(f"override {item!r} is not KEY=VALUE")
            if key not in data:
                raise ValueError(f"unknown train config key {key!r}")
            data[key] = _parse(raw, hints[key], key)
        return type(self).from_dict(data)


def _parse(raw: str, kind: Any, key: str) -> Any:
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        return raw
    except ValueError:
        raise ValueError(
            f"train config {key}={raw!r} is not a valid {getattr(kind, '__name__', kind)}"
        ) from None
