"""Reading Hugging Face backbones: config.json plus single or sharded safetensors, local or Hub.

Only safetensors are read: no pickle, no code from the checkpoint ever runs.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open


def resolve_file(
    repo_or_dir: str, filename: str, revision: str | None = None, required: bool = True
) -> str | None:
    """Path of `filename` in a local directory, or downloaded from the Hub when not a directory."""
    if os.path.isdir(repo_or_dir):
        path = os.path.join(repo_or_dir, filename)
        if os.path.exists(path):
            return path
        if required:
            raise FileNotFoundError(f"{filename} not found in {repo_or_dir}")
        return None
    from huggingface_hub.utils import EntryNotFoundError

    from core.hub import download

    try:
        return download(
            repo_or_dir, filename, revision, "pass a local folder with the checkpoint's files instead"
        )
    except EntryNotFoundError:
        if required:
            raise FileNotFoundError(f"{filename} not found in Hub repo {repo_or_dir}") from None
        return None


def read_hf_config(repo_or_dir: str, revision: str | None = None) -> dict:
    path = resolve_file(repo_or_dir, "config.json", revision)
    with open(path) as f:
        return json.load(f)


class TensorSource:
    """Tensors by name across the (possibly sharded) safetensors files of one HF model."""

    def __init__(self, repo_or_dir: str, revision: str | None = None):
        self.where = repo_or_dir
        index = resolve_file(repo_or_dir, "model.safetensors.index.json", revision, required=False)
        if index:
            with open(index) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            files = {
                name: resolve_file(repo_or_dir, name, revision) for name in sorted(set(weight_map.values()))
            }
            self._file_of = {key: files[name] for key, name in weight_map.items()}
        else:
            path = resolve_file(repo_or_dir, "model.safetensors", revision)
            with safe_open(path, framework="pt") as f:
                self._file_of = {key: path for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)

    def keys(self) -> set[str]:
        return set(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def get(self, key: str) -> torch.Tensor:
        if key not in self._file_of:
            raise KeyError(f"{self.where}: tensor {key!r} not found in the backbone's safetensors")
        with safe_open(self._file_of[key], framework="pt") as f:
            return f.get_tensor(key)


def copy_into(module: torch.nn.Module, source: TensorSource, table: dict[str, str]) -> None:
    """Copy HF tensors into `module` following `table` (HF name -> our name), checking every shape."""
    ours = module.state_dict()
    for hf_name, our_name in table.items():
        tensor = source.get(hf_name)
        target = ours[our_name]
        if tensor.numel() != target.numel():
            raise ValueError(
                f"{source.where}: {hf_name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)} for {our_name}"
            )
        with torch.no_grad():
            target.copy_(tensor.reshape(target.shape).to(target.dtype))
