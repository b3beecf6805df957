"""The bundle: the one contract between export and runtime (documented in docs/bundle.md).

A bundle is a directory holding the graphs, the tokenizer, the model config and `manifest.json`,
written last, which lists every other file with its size and SHA-256. Loading checks all of them,
so a missing, truncated or modified file is a clear error, not a wrong answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from nanovlm.config import VLMConfig

FORMAT = "nanovlm-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(ValueError):
    """A bundle that is missing, incomplete, modified or from an unsupported format version."""


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(
    directory: str, cfg: VLMConfig, tokenizer: Any, graphs: dict[str, dict], precision: str, opset: int,
    extra: dict[str, Any] | None = None,
) -> dict:  # fmt: skip
    """The manifest of a freshly exported bundle; every file in `directory` hashed, written last."""
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "precision": precision,
        "opset": opset,
        "graphs": graphs,
        "image_placement": cfg.image_placement,
        # the id the decoder graph treats as an image position (-1: the runtime marks prefix slots)
        "image_token_id": cfg.image_token_id if cfg.image_placement == "replace" else -1,
        "image_token_count": cfg.image_token_count,
        "preprocessing": {
            "tile_size": cfg.vit_img_size,
            "max_size": cfg.max_img_size,
            "resize_to_max": cfg.resize_to_max_side_len,
            "resample": "bicubic",
            "range": [0.0, 1.0],
        },
        "special_tokens": {
            "eos_token": tokenizer.eos_token,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "extra_tokens": cfg.vlm_extra_tokens or {},
        },
        "chat_template": cfg.lm_chat_template if cfg.image_placement == "replace" else None,
        "generation": {
            "max_context": cfg.lm_max_position_embeddings,
            "greedy": True,
            "eos_token_id": tokenizer.eos_token_id,
        },
        "kv_cache": {
            "layers": cfg.lm_n_blocks,
            "kv_heads": cfg.lm_n_kv_heads,
            "head_dim": cfg.lm_head_dim,
            "dtype": "float16" if precision == "fp16" else "float32",
        },  # fmt: skip
    } | (extra or {})
    return finish_manifest(directory, manifest)


def finish_manifest(directory: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in `directory` into manifest["files"] and write manifest.json, last."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in sorted(names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel != MANIFEST:
                files[rel] = {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}
    manifest = manifest | {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}
    tmp = os.path.join(directory, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, os.path.join(directory, MANIFEST))
    return manifest


@dataclass
class Bundle:
    path: str
    manifest: dict
    config: VLMConfig

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def total_bytes(self) -> int:
        """Size of every file the manifest lists."""
        return sum(meta["bytes"] for meta in self.manifest.get("files", {}).values())

    def graph_path(self, graph: str) -> str:
        try:
            return self.file(self.manifest["graphs"][graph]["file"])
        except KeyError:
            raise BundleError(f"{self.path}: manifest has no graph {graph!r}") from None


def load_bundle(path: str, verify: bool = True) -> Bundle:
    """Read and check a bundle: format version, every listed file present with its size and hash."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise BundleError(f"bundle not found: {path}")
    if not os.path.exists(mpath):
        raise BundleError(f"{path}: no {MANIFEST} (not a bundle, or an export that did not finish)")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise BundleError(f"{mpath}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleError(
            f"{mpath}: format_version {version!r} is newer than this runtime reads ({FORMAT_VERSION}); upgrade nanovlm-edge"
        )
    for rel, meta in manifest.get("files", {}).items():
        fp = os.path.join(path, rel)
        if not os.path.exists(fp):
            raise BundleError(f"{path}: missing file {rel} listed in the manifest")
        size = os.path.getsize(fp)
        if size != meta["bytes"]:
            raise BundleError(
                f"{path}: {rel} is {size} bytes, the manifest says {meta['bytes']} (truncated or replaced)"
            )
        if verify and file_sha256(fp) != meta["sha256"]:
            raise BundleError(
                f"{path}: {rel} does not match its SHA-256 in the manifest (modified or corrupt)"
            )
    config = VLMConfig.load(os.path.join(path, "config.json"))
    return Bundle(path, manifest, config)
