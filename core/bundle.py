"""The bundle: the one contract between export, quantization and the runtime (docs/bundle.md).

A bundle is a directory holding the graphs, the tokenizer, the model's `config.json` and
`manifest.json`, written last, which lists every other file with its size and SHA-256. Loading
checks all of them, so a missing, truncated or modified file is a clear error, not a wrong answer.

Each fact has one source: the model's shape (placement, image tokens, tile size, context, KV
layout) comes from `config.json` (`Bundle.config`, a VLMConfig), tensor names and types from the
graphs' recorded IO, and how the bundle was made (precision, decoder graph, quantization,
TensorRT engines) from the manifest; `Bundle` joins them in typed properties.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import VLMConfig
from .files import atomic_write
from .recipes import Recipe, recipe

FORMAT = "nanovlm-bundle"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
REFERENCE = (
    "reference.npz"  # PyTorch's results on built-in cases, stored at export (validation without torch)
)
GRAPHS = ("vision_encoder", "decoder")


class BundleError(ValueError):
    """A bundle that is missing, incomplete, modified or from an unsupported format version."""


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Manifest:
    """manifest.json: how the bundle was made and what files it holds."""

    precision: str  # "fp32" or "fp16": the float type the graphs were exported in
    opset: int
    graphs: dict[str, dict[str, Any]]  # graph -> {"file", "inputs", "outputs"} (names, dtypes, dims)
    decoder_graph: str = "standard"  # or "fused": ONNX Runtime contrib ops, CPU only
    vision_graph: str = "standard"  # the same choice for the vision encoder
    image_tiles: int | None = None  # default resolution budget (core/processors.py); None: the config's
    quantization: dict[str, Any] | None = None  # {"mode", ...}: written by `quantize`
    tensorrt: dict[str, Any] | None = None  # engines, limits, TensorRT version: written by `trt`
    reference: dict[str, Any] | None = None  # {"file", "split", "seed", "cases", "max_new_tokens"}
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> {"bytes", "sha256"}
    created: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> Manifest:
        if data.get("format") != FORMAT:
            raise BundleError(f"{source}: format {data.get('format')!r}, expected {FORMAT!r}")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise BundleError(
                f"{source}: format_version {version!r} is newer than this runtime reads ({FORMAT_VERSION}); "
                "upgrade nanovlm-edge"
            )
        if version == 1:  # v1 restated config facts and wrote a quantization mode as the precision
            data = dict(
                data,
                precision="fp16"
                if data.get("precision") == "fp16" and not data.get("quantization")
                else "fp32",
            )
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        missing = {"precision", "opset", "graphs"} - set(kwargs)
        if missing:
            raise BundleError(f"{source}: manifest lacks {', '.join(sorted(missing))}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if v is not None}

    def write(self, directory: str) -> Manifest:
        """Hash every file in `directory` into `files` and write manifest.json, last and atomically."""
        files = {}
        for root, _, names in os.walk(directory):
            for name in sorted(names):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, directory)
                if rel != MANIFEST:
                    files[rel] = {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}
        done = dataclasses.replace(
            self,
            files=files,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            format=FORMAT,
            format_version=FORMAT_VERSION,
        )
        with atomic_write(os.path.join(directory, MANIFEST)) as f:
            json.dump(done.to_dict(), f, indent=2)
        return done


@dataclass(frozen=True)
class KVLayout:
    """One KV cache tensor per layer and direction: [batch, heads, positions, head_dim] of dtype."""

    layers: int
    heads: int
    head_dim: int
    dtype: str  # numpy dtype name

    @property
    def position_bytes(self) -> int:
        """Bytes one position takes across every layer's key and value."""
        return 2 * self.layers * self.heads * self.head_dim * np.dtype(self.dtype).itemsize


@dataclass
class Bundle:
    """A loaded bundle: the model's shape is `config` (VLMConfig), how it was made `manifest`."""

    path: str
    manifest: Manifest
    config: VLMConfig

    # ------------------------------------------------------------------ files
    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def total_bytes(self) -> int:
        """Size of every file the manifest lists."""
        return sum(meta["bytes"] for meta in self.manifest.files.values())

    def graph_path(self, graph: str) -> str:
        return self.file(self.graph_spec(graph)["file"])

    def graph_spec(self, graph: str) -> dict[str, Any]:
        try:
            return self.manifest.graphs[graph]
        except KeyError:
            raise BundleError(f"{self.path}: manifest has no graph {graph!r}") from None

    def graph_input(self, graph: str, name: str) -> dict[str, Any]:
        for spec in self.graph_spec(graph)["inputs"]:
            if spec["name"] == name:
                return spec
        raise BundleError(f"{self.path}: graph {graph} has no input {name!r}")

    # ------------------------------------------------------------------ how it was made
    @property
    def precision(self) -> str:
        return self.manifest.precision

    @property
    def mode(self) -> str:
        """The quantization mode, or the export precision of an unquantized bundle."""
        return (self.manifest.quantization or {}).get("mode") or self.manifest.precision

    @property
    def recipe(self) -> Recipe:
        return recipe(self.mode)

    @property
    def fused(self) -> bool:
        """Whether the decoder is the fused (ONNX Runtime CPU) graph."""
        return self.manifest.decoder_graph == "fused"

    @property
    def image_tiles(self) -> int:
        """The resolution budget runtimes use unless told otherwise: tiles along the long edge."""
        from .processors import image_tiles

        return self.manifest.image_tiles or image_tiles(self.config)

    @property
    def contrib_graphs(self) -> list[str]:
        """The graphs exported in ONNX Runtime's contrib ops (no TensorRT, no quantization to QDQ)."""
        kinds = {"vision_encoder": self.manifest.vision_graph, "decoder": self.manifest.decoder_graph}
        return [graph for graph, kind in kinds.items() if kind == "fused"]

    @property
    def runs_on(self) -> tuple[str, ...]:
        return ("onnxruntime",) if self.contrib_graphs else self.recipe.runs_on

    # ------------------------------------------------------------------ tensors
    @property
    def kv(self) -> KVLayout:
        """The KV cache: layout from the config, element type from the decoder graph's IO."""
        c = self.config
        dtype = self.graph_input("decoder", "past_key_values.0.key")["dtype"]
        return KVLayout(c.lm_n_blocks, c.lm_n_kv_heads, c.lm_head_dim, dtype)

    @property
    def vocab_size(self) -> int:
        return self.graph_spec("decoder")["outputs"][0]["shape"][1]


def is_bundle(path: str) -> bool:
    """Whether `path` holds a bundle manifest (what `check_target` lets a bundle writer replace)."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def referenced_files(manifest: Manifest) -> list[tuple[str, Any]]:
    """(where in the manifest, path) of every file the manifest points the runtime at."""
    found = [
        (f"graphs.{g}.file", spec.get("file") if isinstance(spec, dict) else None)
        for g, spec in manifest.graphs.items()
    ]
    engines = (manifest.tensorrt or {}).get("engines") or {}
    if isinstance(engines, dict):
        found += [
            (f"tensorrt.engines.{g}.file", e.get("file") if isinstance(e, dict) else None)
            for g, e in engines.items()
        ]
    if manifest.reference:
        found.append(("reference.file", manifest.reference.get("file")))
    return found


def check_layout(path: str, manifest: Manifest, source: str) -> None:
    """Every path the manifest names is relative and resolves (links followed) inside the bundle;
    every file it points the runtime at is listed with its hash; and every file in the bundle is
    listed, so nothing the runtime reads there goes unchecked."""
    root = os.path.realpath(path)

    def confined(rel: Any, where: str) -> None:
        if not isinstance(rel, str) or not rel or "\x00" in rel or os.path.isabs(rel) or rel.startswith("\\"):
            raise BundleError(f"{source}: {where} {rel!r} is not a relative path inside the bundle")
        real = os.path.realpath(os.path.join(root, rel))
        if real == root or os.path.commonpath([real, root]) != root:
            raise BundleError(f"{source}: {where} {rel!r} resolves outside the bundle")

    if not isinstance(manifest.files, dict):
        raise BundleError(f"{source}: 'files' must map paths to their sizes and hashes")
    for rel, meta in manifest.files.items():
        confined(rel, "files entry")
        if (
            not isinstance(meta, dict)
            or not isinstance(meta.get("bytes"), int)
            or not isinstance(meta.get("sha256"), str)
        ):
            raise BundleError(f"{source}: files entry {rel!r} needs 'bytes' and 'sha256'")
        if not os.path.isfile(os.path.join(root, rel)):
            raise BundleError(f"{path}: missing file {rel} listed in the manifest")
    listed = {os.path.normpath(rel) for rel in manifest.files}
    for where, rel in referenced_files(manifest):
        confined(rel, where)
        if os.path.normpath(rel) not in listed:
            raise BundleError(
                f"{source}: {where} {rel!r} is not in the manifest's file list (its hash is unknown)"
            )
    for directory, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(directory, name), root)
            if rel != MANIFEST and rel not in listed:
                raise BundleError(
                    f"{path}: {rel} is not in the manifest's file list (added after the bundle was written); "
                    "remove it, or rewrite the bundle"
                )


def load_bundle(path: str, verify: bool = True) -> Bundle:
    """Read and check a bundle: format version, every listed file present with its size and hash."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise BundleError(f"bundle not found: {path}")
    if not os.path.exists(mpath):
        raise BundleError(f"{path}: no {MANIFEST} (not a bundle, or an export that did not finish)")
    try:
        with open(mpath) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise BundleError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{mpath}: expected a JSON object")
    manifest = Manifest.from_dict(data, mpath)
    check_layout(path, manifest, mpath)
    for rel, meta in manifest.files.items():
        fp = os.path.join(path, rel)
        size = os.path.getsize(fp)
        if size != meta["bytes"]:
            raise BundleError(
                f"{path}: {rel} is {size} bytes, the manifest says {meta['bytes']} (truncated or replaced)"
            )
        if verify and file_sha256(fp) != meta["sha256"]:
            raise BundleError(
                f"{path}: {rel} does not match its SHA-256 in the manifest (modified or corrupt)"
            )
    try:
        config = VLMConfig.load(os.path.join(path, "config.json"))
    except (ValueError, FileNotFoundError) as e:
        raise BundleError(str(e)) from None
    return Bundle(path, manifest, config)
