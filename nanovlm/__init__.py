"""nanoVLM-style vision-language models: the PyTorch reference.

Importing the package is cheap: the torch modules load on first use. What the torch-free floors
share with it (config, processors, bundle, sampling) lives in `core`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["VLMConfig", "VisionLanguageModel", "ViT", "LanguageModel", "ModalityProjector"]

_LAZY = {
    "VLMConfig": "core.config",
    "VisionLanguageModel": "nanovlm.vision_language_model",
    "ViT": "nanovlm.vision_transformer",
    "LanguageModel": "nanovlm.language_model",
    "ModalityProjector": "nanovlm.modality_projector",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nanovlm' has no attribute {name!r}")
