"""`nanovlm-export trt BUNDLE OUT`: TensorRT engines for a bundle, with the TensorRT Python API.

Strongly typed networks (the only mode TensorRT 11 has): precision comes from the ONNX, so the
fp16 bundle gives FP16 engines and an int8-static (Q/DQ) bundle INT8 ones. Profiles come from the
manifest (trt/plan.py). OUT is a copy of the bundle plus `<graph>.engine` files, a timing
cache and `trtexec.txt` (the equivalent command lines, for building on a Jetson with trtexec);
its manifest records the engines, their profiles, the TensorRT version and the GPU.

Not run on these machines (no GPU, no TensorRT): tests/test_trt.py builds the tiny model's
engines and compares greedy tokens with ONNX Runtime where both are present.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time

from core.bundle import MANIFEST, Bundle, Manifest, is_bundle, load_bundle
from core.files import atomic_write, check_target, staged_dir

from .backend import device_info
from .plan import ProfileLimits, polygraphy_command, profiles, trtexec_commands
from .support import STANDARD_DOMAINS

log = logging.getLogger(__name__)


def contrib_ops(graph_path: str) -> list[str]:
    """Ops outside the standard ONNX domain (MatMulNBits, GatherBlockQuantized, DynamicQuantizeMatMul:
    ONNX Runtime only)."""
    import onnx

    m = onnx.load(graph_path, load_external_data=False)
    return sorted({f"{n.domain}.{n.op_type}" for n in m.graph.node if n.domain not in STANDARD_DOMAINS})


def check_buildable(bundle_path: str) -> Bundle:
    """The bundle, after refusing what TensorRT cannot take, before any GPU work."""
    bundle = load_bundle(bundle_path)
    for graph in ("vision_encoder", "decoder"):
        foreign = contrib_ops(bundle.graph_path(graph))
        if foreign:
            raise ValueError(
                f"{bundle_path}: {graph} uses ONNX Runtime contrib ops {foreign} "
                f"(mode {bundle.mode}); "
                "TensorRT takes the fp32, fp16 or int8-static bundles with the standard graphs"
            )
    return bundle


def build_engines(
    bundle_path: str,
    out: str,
    limits: ProfileLimits,
    workspace_mb: int = 2048,
    timing_cache: str | None = None,
    overwrite: bool = False,
    tf32: bool = False,
) -> Manifest:
    """Build one engine per graph into a copy of the bundle at `out`; returns the new manifest."""
    bundle = check_buildable(bundle_path)
    check_target(out, is_bundle, "bundle", overwrite, source=bundle_path)
    plans = profiles(bundle, limits)  # validates the limits against the model's context
    import tensorrt as trt

    device = device_info()
    with staged_dir(out, prefix=".tmp-bundle-") as tmp:
        for name in os.listdir(bundle_path):
            if name != MANIFEST and os.path.isfile(os.path.join(bundle_path, name)):
                shutil.copy2(os.path.join(bundle_path, name), os.path.join(tmp, name))
        cache_path = timing_cache or os.path.join(tmp, "timing.cache")
        logger = trt.Logger(trt.Logger.WARNING)
        engines = {}
        for graph, plist in plans.items():
            t0 = time.time()
            file = bundle.graph_spec(graph)["file"]
            engine_file = file.removesuffix(".onnx") + ".engine"
            log.info("building %s (%d profiles)", engine_file, len(plist))
            data = _build_one(trt, logger, os.path.join(tmp, file), plist, workspace_mb, cache_path, tf32)
            with open(os.path.join(tmp, engine_file), "wb") as f:
                f.write(data)
            engines[graph] = {
                "file": engine_file,
                "profiles": [
                    {
                        "name": p["name"],
                        **{k: {n: list(s) for n, s in p[k].items()} for k in ("min", "opt", "max")},
                    }
                    for p in plist
                ],
                "tensorrt_version": trt.__version__,
                "device_name": device["name"],
                "compute_capability": device["compute_capability"],
                "build_seconds": round(time.time() - t0, 1),
            }
        with open(os.path.join(tmp, "trtexec.txt"), "w") as f:
            for graph, cmd in trtexec_commands(bundle, limits, workspace_mb, tf32=tf32).items():
                f.write(f"# {graph}\n{cmd}\n\n")
            f.write(
                f"# compare ONNX Runtime and TensorRT on the decoder\n{polygraphy_command(bundle, limits)}\n"
            )
        if timing_cache and os.path.exists(timing_cache):
            shutil.copy2(timing_cache, os.path.join(tmp, "timing.cache"))
        limits_meta = {
            "max_batch": limits.max_batch,
            "max_seq": limits.max_seq,
            "max_context": limits.max_context,
            "max_images": limits.max_images,
        }
        tensorrt = {"engines": engines, "limits": limits_meta}
        return dataclasses.replace(bundle.manifest, tensorrt=tensorrt).write(tmp)


def _build_one(
    trt, logger, onnx_path: str, plist: list[dict], workspace_mb: int, cache_path: str, tf32: bool = False
) -> bytes:
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if not tf32:  # TensorRT enables TF32 by default: fp32 MatMuls on Ampere+ (Orin) would lose precision
        config.clear_flag(trt.BuilderFlag.TF32)
    cache_bytes = open(cache_path, "rb").read() if os.path.exists(cache_path) else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    for p in plist:
        profile = builder.create_optimization_profile()
        for name in p["min"]:
            profile.set_shape(name, p["min"][name], p["opt"][name], p["max"][name])
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path} (see the log above)")
    with atomic_write(cache_path, "wb") as f:
        f.write(memoryview(config.get_timing_cache().serialize()))
    return bytes(serialized)


def describe(manifest: Manifest) -> str:
    return json.dumps(
        {g: {k: v for k, v in e.items() if k != "profiles"} for g, e in manifest.tensorrt["engines"].items()},
        indent=2,
    )
