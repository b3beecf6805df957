"""int8-static: Q/DQ int8 weights (per channel) and activations (per tensor, calibrated), the
explicit-quantization input for TensorRT, plus a TensorRT calibration cache of the same ranges.

The decoder is smoothed first (SmoothQuant) and leaves `down_proj` and its edge blocks in float:
per-tensor activation ranges cannot hold their inputs on SmolLM2 (docs/quantization.md).
"""

from __future__ import annotations

import os

import onnx
from onnx import numpy_helper

from core.bundle import Bundle

from .nbits import matches, weight_matmuls
from .weight_only import edge_blocks

METHODS = ("minmax", "entropy", "percentile")
# Weights use 7 bits ([-64, 64]). On x86 ONNX Runtime runs int8 Q/DQ MatMuls as uint8 x int8 (it
# shifts int8 activations by 128); without AVX-512 VNNI / AVX-VNNI the kernel's VPMADDUBSW adds
# two such products into int16, which saturates for |w| > 64 (2 * 255 * 127 > 32767). With 7-bit
# weights no sum can saturate, so the bundle computes the same on AVX2, AVX-512 VNNI and ARM.
WEIGHT_RANGE = (-64, 64)
SMOOTH_ALPHA = 0.5  # SmoothQuant migration strength for the decoder (0 = off)
INT8_STATIC_FLOAT = ("*/mlp/down_proj/*",)
INT8_STATIC_EDGE_BLOCKS = 1


def quantize_qdq(
    bundle: Bundle, out: str, plan: dict, vision_feeds: list[dict], decoder_feeds: list[dict], method: str
) -> None:
    """Write both graphs of `bundle` as Q/DQ graphs into `out`, and `out`/calibration.cache."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from .recorder import FeedReader
    from .trt_cache import write_trt_cache

    plan["method"] = method
    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]  # fmt: skip
    ranges: dict[str, float] = {}
    for graph, feeds in (("vision_encoder", vision_feeds), ("decoder", decoder_feeds)):
        src_path = bundle.graph_path(graph)
        dst_path = os.path.join(out, bundle.graph_spec(graph)["file"])
        model = onnx.load(src_path)
        names = [n.name for n in weight_matmuls(model)]
        patterns = list(plan["excluded"])
        if graph == "decoder":
            patterns += [
                *INT8_STATIC_FLOAT,
                *(f"*/blocks.{i}/*" for i in edge_blocks(bundle.config.lm_n_blocks, INT8_STATIC_EDGE_BLOCKS)),
            ]
            plan["kept_float"] = patterns
        excluded = [n for n in names if matches(n, patterns)]
        targets = [n for n in names if n not in excluded]
        if not targets:  # quantize_static reads an empty node list as "every node": keep the graph float
            onnx.save(model, dst_path)
            plan["notes"][f"{graph}_float"] = "every weight MatMul excluded: the graph stays float"
            continue
        if graph == "decoder" and SMOOTH_ALPHA:
            from .smoothquant import smooth

            smoothed = smooth(model, feeds, SMOOTH_ALPHA)
            plan["notes"]["smoothquant"] = (
                f"alpha {SMOOTH_ALPHA}: {len(smoothed)} MatMul groups smoothed before calibration"
            )
            src_path = dst_path + ".smoothed.onnx"
            onnx.save(model, src_path)
        quantize_static(
            src_path, dst_path, FeedReader(feeds, f"calibrating {graph}"),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"], per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            nodes_to_quantize=targets, calibrate_method=calib,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                           "CalibTensorRangeSymmetric": True, "CalibStridedMinMax": 1},
            reduce_range=True,  # 7-bit weights: see WEIGHT_RANGE
            calibration_providers=["CPUExecutionProvider"],
            use_external_data_format=False, calibration_cache_path=None,
        )  # fmt: skip
        ranges |= activation_ranges(onnx.load(dst_path))
        if src_path.endswith(".smoothed.onnx"):
            os.remove(src_path)
    write_trt_cache(ranges, os.path.join(out, "calibration.cache"))
    plan["notes"]["trt_calibration_cache"] = (
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
