"""int8-static: Q/DQ INT8 on an fp16 base, the explicit-quantization input for TensorRT.

Both graphs become the fp16 recipe's graph (fp16.py: fp16 weights and products between Casts;
norms, softmax, RoPE, residuals and the graph IO in fp32) in which every weight MatMul reads int8
weights through DequantizeLinear: symmetric, one scale per output channel, [-127, 127], rounded by
GPTQ on the calibration feeds (gptq.py). Where a per-tensor activation range holds the MatMul's
input, that fp16 input passes QuantizeLinear -> DequantizeLinear with a calibrated scale: a
strongly typed TensorRT build runs those MatMuls as INT8 GEMMs and every other op in the type the
graph gives it. Elsewhere the weight alone is int8 (fp16 activations).

On SmolLM2 (docs/quantization.md) per-tensor ranges hold the inputs of the attention output
projection and of gate/up (after SmoothQuant), not those of q/k/v (+0.0045 KL), down_proj (+0.20)
or the first and last block: those stay weight-only. The ranges live in the graph, so the bundle
carries no TensorRT calibration cache.

ONNX Runtime's CPU provider would fuse the weight-only DequantizeLinear -> MatMul pairs into
MatMulNBits with int8 activations; the runtime turns its Q/DQ fusions off for these bundles
(runtime/onnx_backend.py), so ONNX Runtime computes what the graph says, as TensorRT does, and
the same on every CPU (no integer kernels, whose AVX2 variant saturates).
"""

from __future__ import annotations

import logging
import os
import tempfile

import numpy as np
import onnx
from onnx import version_converter

from core.bundle import Bundle

from .fp16 import QDQ_MIN_OPSET, to_fp16
from .gptq import DAMPING, gptq_channels
from .importance import channel_stats
from .nbits import matches, weight_matmuls
from .weight_only import edge_blocks

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
SMOOTH_ALPHA = 0.5  # SmoothQuant migration strength for the decoder's quantized activations
# Decoder MatMuls whose activations stay fp16 (weight-only int8), and the blocks at each end that do.
INT8_STATIC_WEIGHT_ONLY = ("*/attn/q_proj/*", "*/attn/k_proj/*", "*/attn/v_proj/*", "*/mlp/down_proj/*")
INT8_STATIC_EDGE_BLOCKS = 1


def weight_only_patterns(layers: int) -> list[str]:
    """Decoder MatMul patterns the int8-static recipe keeps weight-only, for `layers` blocks."""
    return [
        *INT8_STATIC_WEIGHT_ONLY,
        *(f"*/blocks.{i}/*" for i in edge_blocks(layers, INT8_STATIC_EDGE_BLOCKS)),
    ]


def quantize_qdq(
    bundle: Bundle, out: str, plan: dict, vision_feeds: list[dict], decoder_feeds: list[dict], method: str
) -> None:
    """Write both graphs of `bundle` as fp16 Q/DQ graphs into `out`."""
    plan["method"] = method
    plan["kept_weight_only"] = weight_only_patterns(bundle.config.lm_n_blocks)
    plan["kept_float"] = list(plan["excluded"])
    for graph, feeds in (("vision_encoder", vision_feeds), ("decoder", decoder_feeds)):
        model = version_converter.convert_version(onnx.load(bundle.graph_path(graph)), QDQ_MIN_OPSET)
        matmuls = weight_matmuls(model)  # smoothing below rescales their weights, not which nodes they are
        names = [n.name for n in matmuls]
        int8 = [n for n in names if not matches(n, plan["excluded"])]
        quantized = [n for n in int8 if graph != "decoder" or not matches(n, plan["kept_weight_only"])]
        if graph == "decoder" and SMOOTH_ALPHA:
            from .smoothquant import smooth

            smoothed = smooth(model, feeds, SMOOTH_ALPHA, only=set(quantized))
            plan["notes"]["smoothquant"] = f"alpha {SMOOTH_ALPHA}: {len(smoothed)} MatMul groups smoothed"
        inputs = {n.name: n.input[0] for n in matmuls if n.name in int8}
        amax, int8_weights = {}, {}
        if inputs:  # (every MatMul excluded: the fp16 graph alone)
            stats = channel_stats(
                model, sorted(set(inputs.values())), feeds, f"calibrating {graph}", grams=set(inputs.values())
            )
            amax = activation_amax(model, {n: inputs[n] for n in quantized}, stats, feeds, method)
            inits = {i.name: i for i in model.graph.initializer}
            for n in matmuls:
                if n.name in inputs:
                    w = onnx.numpy_helper.to_array(inits[n.input[1]])
                    int8_weights[n.name] = gptq_channels(w, stats[inputs[n.name]]["gram"])
            del stats
        model = to_fp16(model, int8_weights, amax)
        onnx.save(model, os.path.join(out, bundle.graph_spec(graph)["file"]))
        plan["notes"][f"{graph}_int8"] = (
            f"{len(amax)} MatMuls int8 x int8, {len(int8) - len(amax)} int8 weights on fp16 activations, "
            f"{len(names) - len(int8)} fp16; weights per output channel rounded by GPTQ (damping {DAMPING})"
        )
        log.info("int8-static %s: %s", graph, plan["notes"][f"{graph}_int8"])


def activation_amax(
    model: onnx.ModelProto, inputs: dict[str, str], stats: dict, feeds: list[dict], method: str
) -> dict[str, float]:
    """{MatMul name: symmetric range of its input}: the largest |x| seen (minmax), or onnxruntime's
    histogram calibrators (entropy, percentile) over the same feeds, one feed at a time (prefill
    and decode feeds differ in shape, which the histogram collectors cannot stack)."""
    if method == "minmax":
        return {n: float(stats[t]["max_abs"].max()) for n, t in inputs.items()}
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {', '.join(METHODS)}")
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    from .recorder import FeedReader

    calibrate = {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[method]
    with tempfile.TemporaryDirectory(prefix="nanovlm-calibrate-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        onnx.save(model, path)
        calibrator = create_calibrator(
            path,
            ["MatMul"],
            os.path.join(tmp, "augmented.onnx"),
            calibrate_method=calibrate,
            providers=["CPUExecutionProvider"],
            extra_options={"symmetric": True},
        )
        reader = FeedReader(feeds, f"calibrating ({method})")
        for i in range(len(feeds)):
            reader.set_range(i, i + 1)
            calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
    out = {}
    for name, tensor in inputs.items():
        low, high = (float(np.max(np.abs(v))) for v in ranges[tensor].range_value)
        out[name] = max(low, high)
    return out
