"""`nanovlm-export quantize BUNDLE OUT --mode ...`: an fp32 bundle -> a quantized bundle.

What each mode is comes from the recipe table (core/recipes.py): its scheme picks the module that
rewrites the graphs (weight_only.py for float and MatMulNBits modes, qdq.py for int8-static), and
`calibrated` says whether real graph inputs are recorded first (recorder.py). `--exclude PATTERN`
(glob over node names, repeatable) leaves matching MatMuls in float. The output is written to a
temp directory and renamed into place after the manifest.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time

import onnx

from core.bundle import GRAPHS, MANIFEST, Bundle, Manifest, is_bundle, load_bundle
from core.files import check_target, staged_dir
from core.graph_io import graph_io
from core.recipes import FUSED_MODES, QUANTIZE_MODES, Recipe, recipe

from .qdq import METHODS, quantize_qdq
from .weight_only import gptq_statistics, keep_8bit, quantize_graph

log = logging.getLogger(__name__)

MIN_CALIBRATION_SAMPLES = 8
VISION_CHECK_IMAGES = 4  # built-in images the dynamic-int8 vision encoder is checked on
MIN_ORT_WEIGHT_ONLY = (1, 20)  # MatMulNBits 8-bit, GatherBlockQuantized


def check_supported(mode: str) -> Recipe:
    """The mode's recipe; a clear error when the installed onnxruntime cannot build or run it."""
    import onnxruntime as ort

    if mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(QUANTIZE_MODES)}")
    r = recipe(mode)
    version = tuple(int(p) for p in ort.__version__.split(".")[:2])
    if r.scheme == "weight-only" and version < MIN_ORT_WEIGHT_ONLY:
        raise RuntimeError(
            f"mode {mode} needs onnxruntime >= {'.'.join(map(str, MIN_ORT_WEIGHT_ONLY))} (MatMulNBits 8-bit, "
            f"GatherBlockQuantized); installed: {ort.__version__}"
        )
    return r


def check_source(bundle: Bundle, mode: str) -> None:
    """Quantization starts from an unquantized fp32 bundle whose decoder graph the mode takes."""
    if bundle.manifest.quantization:
        raise ValueError(
            f"{bundle.path} is already quantized (mode {bundle.mode}); quantize the fp32 bundle it came from"
        )
    if bundle.precision != "fp32":
        raise ValueError(
            f"{bundle.path} has precision {bundle.precision!r}; quantization starts from an fp32 bundle"
        )
    if bundle.contrib_graphs and mode not in FUSED_MODES:
        raise ValueError(
            f"{bundle.path} has fused {' and '.join(bundle.contrib_graphs)} graphs (fp32 ONNX Runtime CPU "
            f"graphs); mode {mode} targets GPUs or TensorRT: quantize a bundle exported with the standard "
            f"graphs. Fused bundles take "
            f"{' or '.join(FUSED_MODES)}"
        )


def quantize_bundle(
    src: str,
    out: str,
    mode: str,
    calibration: str | None = None,
    samples: int = 32,
    method: str = "minmax",
    exclude: tuple[str, ...] | list[str] = (),
    decode_steps: int | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Quantize the fp32 bundle `src` into the bundle directory `out`; returns the new manifest.
    `decode_steps`: greedy decode steps recorded per calibration sample (default: the recipe's)."""
    r = check_supported(mode)
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {', '.join(METHODS)}")
    if samples < 1:
        raise ValueError(f"samples={samples}: must be at least 1")
    bundle = load_bundle(src)
    check_source(bundle, mode)
    check_target(out, is_bundle, "bundle", overwrite, source=src)
    t0 = time.time()
    # what the recipe did, recorded in the manifest so a bundle says how it was made
    plan = {
        "mode": mode,
        "method": None,
        "calibration": None,
        "excluded": list(exclude),
        "kept_8bit": keep_8bit(bundle, r),
        "kept_float": [],
        "notes": {},
    }
    with staged_dir(out, prefix=".tmp-bundle-") as tmp:
        for name in os.listdir(bundle.path):  # tokenizer, config: everything but the graphs
            path = bundle.file(name)
            if (
                os.path.isfile(path)
                and not name.endswith((".onnx", ".onnx.data", ".ort"))
                and name != MANIFEST
            ):
                shutil.copy2(path, os.path.join(tmp, name))
        vision_feeds, decoder_feeds = [], []
        if r.calibrated:
            from .data import load_calibration
            from .recorder import record_feeds

            steps = r.decode_steps if decode_steps is None else decode_steps
            cal = load_calibration(calibration or "builtin", samples, minimum=MIN_CALIBRATION_SAMPLES)
            vision_feeds, decoder_feeds = record_feeds(bundle, cal, steps)
            plan["calibration"] = cal.describe() | {
                "decode_steps": steps,
                "vision_feeds": len(vision_feeds),
                "decoder_feeds": len(decoder_feeds),
            }
        elif calibration:
            log.warning("mode %s needs no calibration data; --calibration %s is ignored", mode, calibration)
        if r.scheme == "qdq":
            quantize_qdq(bundle, tmp, plan, vision_feeds, decoder_feeds, method)
        else:
            importance, grams = gptq_statistics(bundle, r, plan, decoder_feeds)
            dynamic_vision = r.vision_dynamic_int8
            for graph in GRAPHS:
                model = quantize_graph(
                    onnx.load(bundle.graph_path(graph)), graph, r, plan, importance, grams, decoder_feeds
                )
                if graph == "vision_encoder" and dynamic_vision and not _vision_holds(bundle, model, r, plan):
                    dynamic_vision = False
                    model = quantize_graph(
                        onnx.load(bundle.graph_path(graph)),
                        graph,
                        dataclasses.replace(r, vision_dynamic_int8=False),
                        plan,
                    )
                _save(model, os.path.join(tmp, bundle.graph_spec(graph)["file"]))
            if r.weight_bits:
                plan["notes"]["vision_encoder"] = (
                    "DynamicQuantizeMatMul: int8 weights per column, neighbouring pairs within 128; "
                    "uint8 activations per tensor at run time"
                    if dynamic_vision
                    else "8-bit MatMulNBits (the vision encoder is kept at INT8 or better)"
                )
                plan["notes"]["embedding"] = (
                    "tied embedding/head quantized once, shared by GatherBlockQuantized and MatMulNBits"
                )
        plan["source_bundle_sha256"] = {k: v["sha256"] for k, v in bundle.manifest.files.items()}
        graphs = {
            g: {"file": s["file"]} | graph_io(os.path.join(tmp, s["file"]))
            for g, s in bundle.manifest.graphs.items()
        }
        manifest = dataclasses.replace(
            bundle.manifest, graphs=graphs, quantization=plan, tensorrt=None
        ).write(tmp)
    log.info("%s bundle written to %s in %.1f s", mode, out, time.time() - t0)
    return manifest


def _vision_holds(bundle: Bundle, model: onnx.ModelProto, r: Recipe, plan: dict) -> bool:
    """Whether the vision encoder in DynamicQuantizeMatMul stays within half the recipe's allowed
    cosine loss of the source encoder on the first tile of VISION_CHECK_IMAGES built-in images
    (half: the gate is applied later on other images). A ViT with outlier activations may not:
    it then gets 8-bit MatMulNBits, whose activation scales are per block of 32."""
    import numpy as np

    from core.processors import ImageProcessor

    from .data import load_calibration
    from .dynamic_int8 import lowest_cosine

    proc = ImageProcessor.from_config(bundle.config)
    samples = load_calibration("builtin", VISION_CHECK_IMAGES).samples
    pixels = np.concatenate([proc(s.images[0])[0][:1] for s in samples]).astype(np.float32)
    cosine = lowest_cosine(bundle.graph_path("vision_encoder"), model, pixels)
    bar = 1 - (1 - r.gates.vision_cosine_min) / 2
    plan["vision_check"] = {
        "images": len(samples),
        "cosine_min": cosine,
        "bar": bar,
        "kept": "DynamicQuantizeMatMul" if cosine >= bar else "MatMulNBits",
    }
    if cosine < bar:
        log.warning(
            "vision encoder in DynamicQuantizeMatMul: cosine %.5f < %.5f against the source on %d "
            "built-in images; using 8-bit MatMulNBits there instead",
            cosine,
            bar,
            len(samples),
        )
    return cosine >= bar


def _save(model: onnx.ModelProto, path: str) -> None:
    large = model.ByteSize() > 2**31 - 2**26
    onnx.save_model(
        model,
        path,
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=os.path.basename(path) + ".data",
    )
