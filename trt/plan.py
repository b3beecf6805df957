"""TensorRT planning from the bundle: profiles, buffer sizes, compatibility, command lines.

Plain functions with no TensorRT import, shared by the engine builder (trt/build.py) and
the TensorRT backend (trt/backend.py), and tested without a GPU.

Profiles. The decoder gets two: "decode" (seq 1, past 0..max_context-1), which runs for every
generated token and so is tuned at its own shape, and "prefill" (seq 1..max_seq, past
0..max_context-max_seq, so past + seq <= max_context). The vision encoder gets one (1..max_images
tiles).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.bundle import Bundle

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ProfileLimits:
    max_batch: int = 1
    max_seq: int = 512  # longest prefill (prompt positions incl. image tokens)
    max_context: int = 1024  # prompt + generated positions
    max_images: int = 4  # tiles per call to the vision encoder

    def check(self, model_context: int) -> None:
        for name in ("max_batch", "max_seq", "max_context", "max_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.max_seq > self.max_context:
            raise ValueError(f"max_seq={self.max_seq} exceeds max_context={self.max_context}")
        if self.max_context > model_context:
            raise ValueError(f"max_context={self.max_context} exceeds the model's context of {model_context}")


def _decoder_shapes(bundle: Bundle, batch: int, seq: int, past: int, image_rows: int) -> dict[str, Shape]:
    shapes: dict[str, Shape] = {
        "input_ids": (batch, seq),
        "image_embeds": (image_rows, bundle.config.lm_hidden_dim),
        "attention_mask": (batch, past + seq),
        "position_ids": (batch, seq),
    }
    kv = bundle.kv
    for i in range(kv.layers):
        for part in ("key", "value"):
            shapes[f"past_key_values.{i}.{part}"] = (batch, kv.heads, past, kv.head_dim)
    return shapes


def views_per_image(cfg: Any) -> int:
    """Vision-encoder inputs one image can become: its tiles plus a global view at the largest
    split (max_img_size), or 1 (prefix placement, or a single-tile grid)."""
    if cfg.image_placement == "prefix":
        return 1
    tiles = (cfg.max_img_size // cfg.vit_img_size) ** 2
    return tiles + 1 if tiles > 1 else 1


def prefill_image_rows(bundle: Bundle, limits: ProfileLimits) -> int:
    """Image rows one prefill can carry: each prompt of the batch with max_images vision inputs,
    or one image at its largest split if that is more."""
    cfg = bundle.config
    return limits.max_batch * max(limits.max_images, views_per_image(cfg)) * cfg.image_token_count


def profiles(bundle: Bundle, limits: ProfileLimits) -> dict[str, list[dict[str, Any]]]:
    """{graph: [{"name", "min": {input: shape}, "opt": ..., "max": ...}, ...]} in profile-index order."""
    cfg = bundle.config
    limits.check(cfg.lm_max_position_embeddings)
    tile = cfg.vit_img_size
    rows = prefill_image_rows(bundle, limits)
    B, S, C = limits.max_batch, limits.max_seq, limits.max_context
    decode = {
        "name": "decode",
        "min": _decoder_shapes(bundle, 1, 1, 0, 0),
        "opt": _decoder_shapes(bundle, 1, 1, C // 2, 0),
        "max": _decoder_shapes(bundle, B, 1, C - 1, 0),
    }
    prefill = {
        "name": "prefill",
        "min": _decoder_shapes(bundle, 1, 1, 0, 0),
        "opt": _decoder_shapes(bundle, 1, min(S, 128), 0, min(rows, cfg.image_token_count)),
        "max": _decoder_shapes(bundle, B, S, C - S, rows),
    }
    vision = {
        "name": "vision",
        "min": {"pixel_values": (1, 3, tile, tile)},
        "opt": {"pixel_values": (1, 3, tile, tile)},
        "max": {"pixel_values": (limits.max_images, 3, tile, tile)},
    }
    return {"decoder": [decode, prefill], "vision_encoder": [vision]}


def pick_profile(graph_profiles: list[dict[str, Any]], shapes: dict[str, Shape]) -> int:
    """The first profile whose [min, max] holds every given shape; ValueError naming the misfit."""
    for k, p in enumerate(graph_profiles):
        if all(
            name in p["min"]
            and len(shape) == len(p["min"][name])
            and all(lo <= d <= hi for d, lo, hi in zip(shape, p["min"][name], p["max"][name], strict=True))
            for name, shape in shapes.items()
        ):
            return k
    raise ValueError(
        f"no optimization profile holds shapes {shapes}; rebuild the engines with larger --max-seq/--max-context/--max-batch"
    )


def kv_buffer_bytes(bundle: Bundle, limits: ProfileLimits) -> int:
    """Device memory for the KV cache: two ping-pong sets, every layer's key and value, at max context."""
    kv = bundle.kv
    item = 2 if kv.dtype == "float16" else 4
    per_set = 2 * kv.layers * limits.max_batch * kv.heads * limits.max_context * kv.head_dim * item
    return 2 * per_set


def shape_spec(shapes: dict[str, Shape]) -> str:
    """name:AxBxC,... as trtexec and the ONNX Runtime TensorRT EP take shapes."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shape)}" for name, shape in shapes.items())


def polygraphy_shapes(shapes: dict[str, Shape]) -> str:
    """name:[A,B,C] name:[...] as polygraphy's --input-shapes and --trt-*-shapes take shapes."""
    return " ".join(f"{name}:[{','.join(str(d) for d in shape)}]" for name, shape in shapes.items())


def trtexec_commands(
    bundle: Bundle,
    limits: ProfileLimits,
    workspace_mb: int = 2048,
    timing_cache: str = "timing.cache",
    tf32: bool = False,
) -> dict[str, str]:
    """The trtexec command line building each graph's engine with the same profiles (one set of
    --minShapes/--optShapes/--maxShapes per profile, in profile order); fp32 products stay fp32
    (--noTF32) unless `tf32`."""
    out = {}
    for graph, plist in profiles(bundle, limits).items():
        file = bundle.graph_spec(graph)["file"]
        parts = [
            "trtexec",
            f"--onnx={file}",
            f"--saveEngine={file.removesuffix('.onnx')}.engine",
            "--stronglyTyped",
            f"--memPoolSize=workspace:{workspace_mb}M",
            f"--timingCacheFile={timing_cache}",
            *([] if tf32 else ["--noTF32"]),
        ]
        for p in plist:
            parts += [
                f"--minShapes={shape_spec(p['min'])}",
                f"--optShapes={shape_spec(p['opt'])}",
                f"--maxShapes={shape_spec(p['max'])}",
            ]
        out[graph] = " ".join(parts)
    return out


def polygraphy_command(bundle: Bundle, limits: ProfileLimits, graph: str = "decoder") -> str:
    """polygraphy run comparing ONNX Runtime and TensorRT on one graph, at the decode profile's opt shapes."""
    p = profiles(bundle, limits)[graph][0]
    file = bundle.graph_spec(graph)["file"]
    return (
        f"polygraphy run {file} --onnxrt --trt --input-shapes {polygraphy_shapes(p['opt'])} "
        f"--trt-min-shapes {polygraphy_shapes(p['min'])} --trt-opt-shapes {polygraphy_shapes(p['opt'])} "
        f"--trt-max-shapes {polygraphy_shapes(p['max'])} --atol 1e-3 --rtol 1e-3"
    )


def io_dtypes(bundle: Bundle, graph: str) -> dict[str, str]:
    """{tensor: numpy dtype name} of a graph's inputs and outputs, as the bundle recorded them."""
    spec = bundle.graph_spec(graph)
    return {t["name"]: t["dtype"] for t in [*spec["inputs"], *spec["outputs"]]}


def check_io_dtypes(graph: str, engine: dict[str, str], expected: dict[str, str]) -> None:
    """Refuse an engine whose IO tensors differ from the graph's in name or dtype: the backend binds
    buffers of the graph's dtypes, and a mismatch would be read as garbage, not fail."""
    missing = sorted(set(expected) - set(engine))
    extra = sorted(set(engine) - set(expected))
    wrong = [
        f"{n}: engine {engine[n]}, graph {t}" for n, t in expected.items() if n in engine and engine[n] != t
    ]
    if missing or extra or wrong:
        problems = [f"missing {missing}"] * bool(missing) + [f"unexpected {extra}"] * bool(extra) + wrong
        raise RuntimeError(
            f"the {graph} engine's IO does not match the bundle's graph ({'; '.join(problems)}): rebuild it "
            "with `nanovlm-export trt` from this bundle"
        )


def check_engine_compatible(engine_meta: dict, trt_version: str, device: dict[str, Any]) -> None:
    """Refuse engines built by another TensorRT version or for another GPU, with what to do."""
    built = engine_meta.get("tensorrt_version")
    if built != trt_version:
        raise RuntimeError(
            f"engine {engine_meta.get('file')} was built with TensorRT {built}; this is TensorRT {trt_version}. "
            "Engines are tied to the TensorRT version: rebuild with `nanovlm-export trt BUNDLE OUT` on this device."
        )
    want, have = engine_meta.get("compute_capability"), device.get("compute_capability")
    if want and have and tuple(want) != tuple(have):
        raise RuntimeError(
            f"engine {engine_meta.get('file')} was built for GPU compute capability {tuple(want)} "
            f"({engine_meta.get('device_name')}); this GPU is {tuple(have)} ({device.get('name')}). Rebuild on this device."
        )


def trt_profile_shapes(
    bundle: Bundle, max_batch: int, max_context: int, max_images: int
) -> dict[str, dict[str, str]]:
    """ONNX Runtime's TensorRT EP profile options for each graph, from the same plan as
    `nanovlm-export trt`. The EP takes one profile per graph here: the decode profile's min and
    opt (decode is what runs per token) with a max that also covers prefills of up to max_context."""
    plan = profiles(bundle, ProfileLimits(max_batch, max_context, max_context, max_images))
    out = {}
    for graph, plist in plan.items():
        top = {
            name: tuple(max(p["max"][name][d] for p in plist) for d in range(len(shape)))
            for name, shape in plist[0]["max"].items()
        }
        out[graph] = {
            "trt_profile_min_shapes": shape_spec(plist[0]["min"]),
            "trt_profile_opt_shapes": shape_spec(plist[0]["opt"]),
            "trt_profile_max_shapes": shape_spec(top),
        }
    return out
