"""`nanovlm-export quantize BUNDLE OUT --mode ...`: an fp32 bundle -> a quantized bundle.

Modes and what each does to the two graphs (the defaults were chosen by measurement on the real
SmolLM2-135M decoder; docs/quantization.md has the numbers):

    int8-dynamic  every weight MatMul -> MatMulNBits, 8-bit weights in blocks of 32 with
                  activations quantized per block at run time (accuracy_level 4: int8 dot
                  products). The tied embedding/LM-head matrix is quantized once and read by
                  both GatherBlockQuantized and the head's MatMulNBits. ONNX Runtime only.
    int8-static   QDQ: per-channel symmetric int8 weights, symmetric int8 activations with
                  ranges calibrated on real inputs; the explicit-quantization input for TensorRT,
                  plus a TensorRT calibration cache written from the same ranges.
    int4          MatMulNBits 4-bit weights (block 32, int8 activations), rounded by GPTQ on the
                  calibration feeds; the layers measured to be sensitive stay 8-bit, the vision
                  encoder stays 8-bit. ONNX Runtime only.
    int4-fp16     int4 on an fp16 graph (fp16 activations), for GPUs. ONNX Runtime only.
    fp16          fp16 weights and compute; norms, softmax and RoPE stay fp32; fp32 graph IO.

`--exclude PATTERN` (glob over node names, repeatable) leaves matching MatMuls in float.
The output is written to a temp directory and renamed into place after the manifest.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from nanovlm.files import staged_dir
from runtime.bundle import MANIFEST, Bundle, finish_manifest, load_bundle

from .gptq import DAMPING
from .nbits import matches, quantize_nbits, tied_head, weight_matmuls

log = logging.getLogger(__name__)

MODES = ("int8-dynamic", "int8-static", "int4", "int4-fp16", "fp16")
METHODS = ("minmax", "entropy", "percentile")
MIN_CALIBRATION_SAMPLES = 8
SMOOTH_ALPHA = 0.5  # int8-static: SmoothQuant migration strength for the decoder (0 = off); measured
# int8-static leaves these decoder MatMuls in float, and the first/last EDGE blocks whole: measured
# on SmolLM2-135M (per-tensor activation ranges cannot hold their inputs; docs/quantization.md).
INT8_STATIC_FLOAT = ("*/mlp/down_proj/*",)
INT8_STATIC_EDGE_BLOCKS = 1
FUSED_MODES = ("int8-dynamic", "int4")  # the CPU weight-only modes; the others target GPUs/TensorRT
CALIBRATED = ("int8-static", "int4", "int4-fp16")  # int4: the importance of each input channel
# Greedy decode steps recorded per calibration sample after its prefill. GPTQ (int4) wants many
# rows of the model's own text, not only prompts: 16 steps measured better than 4 (KL 0.055 vs 0.061).
DECODE_STEPS = {"int8-static": 4, "int4": 16, "int4-fp16": 16}

# Decoder MatMuls the int4 recipe keeps at 8 bits, and how many blocks at each end stay 8-bit:
# measured on SmolLM2-135M (docs/quantization.md has the sensitivity table).
INT4_KEEP_8BIT = ("*/mlp/down_proj/*", "*/attn/v_proj/*", "*/attn/k_proj/*", "*/attn/out_proj/*")
INT4_EDGE_BLOCKS_8BIT = 1
INT4_HEAD_BITS = 8  # the tied embedding/head matrix in the int4 recipe


@dataclass
class Plan:
    """What a mode does; recorded in the manifest so a bundle says how it was made."""

    mode: str
    method: str | None = None
    exclude: list[str] = field(default_factory=list)
    keep_8bit: list[str] = field(default_factory=list)
    keep_float: list[str] = field(default_factory=list)
    runs_on: list[str] = field(default_factory=lambda: ["onnxruntime"])
    notes: dict[str, str] = field(default_factory=dict)


def check_supported(mode: str) -> None:
    """A clear error when the installed onnxruntime cannot build or run a mode."""
    import onnxruntime as ort

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    version = tuple(int(p) for p in ort.__version__.split(".")[:2])
    if mode in ("int8-dynamic", "int4", "int4-fp16") and version < (1, 20):
        raise RuntimeError(
            f"mode {mode} needs onnxruntime >= 1.20 (MatMulNBits 8-bit, GatherBlockQuantized); "
            f"installed: {ort.__version__}"
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
) -> dict:
    """Quantize the fp32 bundle `src` into the bundle directory `out`; returns the new manifest.
    `decode_steps`: greedy decode steps recorded per calibration sample (default: DECODE_STEPS)."""
    check_supported(mode)
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {', '.join(METHODS)}")
    bundle = load_bundle(src)
    done = bundle.manifest.get("quantization")
    if done:
        raise ValueError(
            f"{src} is already quantized (mode {done.get('mode')}); quantize the fp32 bundle it came from"
        )
    if bundle.manifest.get("precision") != "fp32":
        raise ValueError(
            f"{src} has precision {bundle.manifest.get('precision')!r}; quantization starts from an fp32 bundle"
        )
    if bundle.manifest.get("decoder_graph") == "fused" and mode not in FUSED_MODES:
        raise ValueError(
            f"{src} has the fused decoder (an fp32 ONNX Runtime CPU graph); mode {mode} targets GPUs or "
            f"TensorRT: quantize a bundle exported with the standard decoder. Fused bundles take "
            f"{' or '.join(FUSED_MODES)}"
        )
    t0 = time.time()
    plan = Plan(mode, exclude=list(exclude))
    with staged_dir(out, prefix=".tmp-bundle-") as tmp:
        for name in os.listdir(bundle.path):  # tokenizer, config: everything but the graphs
            path = bundle.file(name)
            if (
                os.path.isfile(path)
                and not name.endswith((".onnx", ".onnx.data", ".ort"))
                and name != MANIFEST
            ):
                shutil.copy2(path, os.path.join(tmp, name))
        calib_meta, decoder_feeds = None, []
        if mode in CALIBRATED:
            from .data import load_calibration
            from .recorder import record_feeds

            decode_steps = DECODE_STEPS[mode] if decode_steps is None else decode_steps

            cal = load_calibration(calibration or "builtin", samples, minimum=MIN_CALIBRATION_SAMPLES)
            vision_feeds, decoder_feeds = record_feeds(bundle, cal, decode_steps)
            calib_meta = cal.describe() | {"decode_steps": decode_steps, "vision_feeds": len(vision_feeds),
                                           "decoder_feeds": len(decoder_feeds)}  # fmt: skip
        elif calibration:
            log.warning("mode %s needs no calibration data; --calibration %s is ignored", mode, calibration)
        if mode == "int8-static":
            _static(bundle, tmp, plan, vision_feeds, decoder_feeds, method)
        else:
            importance, grams = None, None
            if mode.startswith("int4"):
                from .importance import activation_importance

                plan.keep_8bit = int4_keep_8bit(bundle)

                def gptq_for(name: str) -> bool:  # the 4-bit MatMuls
                    return not matches(name, [*plan.keep_8bit, *plan.exclude])

                importance, grams = activation_importance(
                    bundle.graph_path("decoder"), decoder_feeds, gptq_for
                )
                plan.notes["importance"] = "4-bit scales searched with per-channel activation importance"
                if grams:
                    plan.notes["gptq"] = f"{len(grams)} 4-bit MatMuls rounded by GPTQ (damping {DAMPING})"
            _weight_only(bundle, tmp, plan, importance, grams)
        extra = {
            "quantization": {
                "mode": mode,
                "method": plan.method,
                "calibration": calib_meta,
                "excluded": plan.exclude,
                "kept_8bit": plan.keep_8bit,
                "kept_float": plan.keep_float,
                "runs_on": plan.runs_on,
                "notes": plan.notes,
                "source_bundle_sha256": {k: v["sha256"] for k, v in bundle.manifest["files"].items()},
            }
        }
        manifest = dict(bundle.manifest)
        manifest["precision"] = mode
        for graph in ("vision_encoder", "decoder"):
            manifest["graphs"][graph] = _graph_spec(tmp, manifest["graphs"][graph]["file"])
        manifest = finish_manifest(tmp, manifest | extra)
    log.info("%s bundle written to %s in %.1f s", mode, out, time.time() - t0)
    return manifest


def edge_blocks(bundle: Bundle, n: int) -> list[int]:
    """The first n and last n decoder block indices."""
    layers = bundle.manifest["kv_cache"]["layers"]
    return sorted({*range(min(n, layers)), *range(max(layers - n, 0), layers)})


def _graph_spec(directory: str, file: str) -> dict:
    from export.graph_io import graph_io

    return {"file": file} | graph_io(os.path.join(directory, file))


# ----------------------------------------------------------------------------- weight-only modes
def int4_keep_8bit(bundle: Bundle) -> list[str]:
    """The int4 recipe's 8-bit decoder layers (the vision encoder is 8-bit throughout)."""
    return [*INT4_KEEP_8BIT, *(f"*/blocks.{i}/*" for i in edge_blocks(bundle, INT4_EDGE_BLOCKS_8BIT))]


def _weight_only(
    bundle: Bundle, out: str, plan: Plan, importance: dict | None, grams: dict | None = None
) -> None:
    mode = plan.mode
    if mode == "fp16":
        plan.runs_on = ["onnxruntime", "tensorrt"]
    for graph in ("vision_encoder", "decoder"):
        model = onnx.load(bundle.graph_path(graph))
        if mode in ("fp16", "int4-fp16"):
            model = to_fp16(model)
        if mode != "fp16":
            bits = 4 if mode.startswith("int4") and graph == "decoder" else 8
            keep8 = plan.keep_8bit if bits == 4 else []
            model = quantize_nbits(
                model,
                bits,
                keep_8bit=keep8,
                exclude=plan.exclude,
                head_bits=INT4_HEAD_BITS if bits == 4 else 8,
                importance=importance if graph == "decoder" else None,
                grams=grams if graph == "decoder" else None,
            )
        _save(model, os.path.join(out, bundle.manifest["graphs"][graph]["file"]))
    if mode != "fp16":
        plan.notes["vision_encoder"] = "8-bit MatMulNBits (the vision encoder is kept at INT8 or better)"
        plan.notes["embedding"] = (
            "tied embedding/head quantized once, shared by GatherBlockQuantized and MatMulNBits"
        )


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and fp16 matrix products; everything between them (norms, RoPE, attention
    scores and softmax, residual adds) stays fp32, as does the graph IO and the KV cache.

    Each weight MatMul (and the tied head Gemm / embedding Gather) reads an fp16 initializer
    between two Casts. onnxruntime's generic float16 converter was measured to break SmolLM2
    (KL 8.0, top-1 2%) even with every node blocked, so the conversion is this explicit one.
    """
    inits = {i.name: i for i in model.graph.initializer}
    head = tied_head(model)
    targets = {n.name for n in weight_matmuls(model)} | ({head[0].name} if head else set())
    converted: set[str] = set()
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        weight = (
            node.input[1] if node.name in targets else (node.input[0] if head and node is head[1] else None)
        )
        if weight is None:
            nodes.append(node)
            continue
        if weight not in converted:
            arr = numpy_helper.to_array(inits[weight]).astype(np.float16)
            inits[weight].CopyFrom(numpy_helper.from_array(arr, weight))
            converted.add(weight)
        out = node.output[0]
        if node.op_type == "Gather":  # fp16 table lookup, rows back to fp32
            nodes.append(helper.make_node("Gather", list(node.input), [out + "_fp16"], name=node.name,
                                          **{a.name: helper.get_attribute_value(a) for a in node.attribute}))  # fmt: skip
        else:
            nodes.append(helper.make_node("Cast", [node.input[0]], [out + "_in16"], name=node.name + "_in16",
                                          to=onnx.TensorProto.FLOAT16))  # fmt: skip
            inputs = [out + "_in16", *node.input[1:]]
            nodes.append(helper.make_node(node.op_type, inputs, [out + "_fp16"], name=node.name,
                                          **{a.name: helper.get_attribute_value(a) for a in node.attribute}))  # fmt: skip
        nodes.append(
            helper.make_node(
                "Cast", [out + "_fp16"], [out], name=node.name + "_out32", to=onnx.TensorProto.FLOAT
            )
        )
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _save(model: onnx.ModelProto, path: str) -> None:
    large = model.ByteSize() > 2**31 - 2**26
    onnx.save_model(model, path, save_as_external_data=large, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + ".data")  # fmt: skip


# ----------------------------------------------------------------------------- static QDQ
def _static(
    bundle: Bundle, out: str, plan: Plan, vision_feeds: list[dict], decoder_feeds: list[dict], method: str
) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from .recorder import FeedReader
    from .trt_cache import write_trt_cache

    plan.method = method
    plan.runs_on = ["onnxruntime", "tensorrt"]
    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]  # fmt: skip
    ranges: dict[str, float] = {}
    for graph, feeds in (("vision_encoder", vision_feeds), ("decoder", decoder_feeds)):
        src_path = bundle.graph_path(graph)
        dst_path = os.path.join(out, bundle.manifest["graphs"][graph]["file"])
        model = onnx.load(src_path)
        names = [n.name for n in weight_matmuls(model)]
        patterns = list(plan.exclude)
        if graph == "decoder":
            patterns += [
                *INT8_STATIC_FLOAT,
                *(f"*/blocks.{i}/*" for i in edge_blocks(bundle, INT8_STATIC_EDGE_BLOCKS)),
            ]
            plan.keep_float = patterns
        excluded = [n for n in names if matches(n, patterns)]
        if graph == "decoder" and SMOOTH_ALPHA:
            from .smoothquant import smooth

            smoothed = smooth(model, feeds, SMOOTH_ALPHA)
            plan.notes["smoothquant"] = (
                f"alpha {SMOOTH_ALPHA}: {len(smoothed)} MatMul groups smoothed before calibration"
            )
            src_path = dst_path + ".smoothed.onnx"
            onnx.save(model, src_path)
        quantize_static(
            src_path, dst_path, FeedReader(feeds, f"calibrating {graph}"),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"], per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            nodes_to_quantize=[n for n in names if n not in excluded], calibrate_method=calib,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                           "CalibTensorRangeSymmetric": True, "CalibStridedMinMax": 1},
            calibration_providers=["CPUExecutionProvider"],
            use_external_data_format=False, calibration_cache_path=None,
        )  # fmt: skip
        ranges |= activation_ranges(onnx.load(dst_path))
        if src_path.endswith(".smoothed.onnx"):
            os.remove(src_path)
    write_trt_cache(ranges, os.path.join(out, "calibration.cache"))
    plan.notes["trt_calibration_cache"] = (
        "calibration.cache (TensorRT EntropyCalibration2 text, from the QDQ ranges)"
    )


def activation_ranges(model: onnx.ModelProto) -> dict[str, float]:
    """Symmetric int8 activation ranges of a QDQ graph: {tensor: amax = scale * 127}."""
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits and n.input[1] in inits:
            scale = numpy_helper.to_array(inits[n.input[1]])
            if scale.size == 1:
                out[n.input[0]] = float(scale.reshape(-1)[0]) * 127.0
    return out
