"""Per-token W8A8: weight MatMuls as integer GEMMs with one activation scale per row (token).

DynamicQuantizeMatMul is fast at a prefill's rows but has one activation scale per tensor, so one
attention-sink token or outlier row ruins every other row's precision; MatMulNBits keeps the
precision but its int8 path falls behind fp32 from a few dozen rows. Built from standard ops, the
same integer GEMM takes one scale per row:

    amax  = ReduceMax(Abs(X), axis -1)                   [..., 1]   X float [..., K]
    scale = Max(amax, tiny) / 127                        [..., 1]
    Xq    = QuantizeLinear(X as [M, K], scale as [M], zero point 128, axis 0) -> uint8 [M, K]
    Y     = MatMulIntegerToFloat(Xq as [..., K], W int8 [K, N], scale, w_scale [N], 128)

MatMuls that read the same X (q/k/v; gate/up) share one quantization. uint8 activations with zero
point 128 hold the symmetric range [-128, 127] * scale and take ONNX Runtime's fast u8s8 path
(int8 activations have none). Weights are per-column int8 with every neighbouring pair along K
within 128 in magnitude (calibration/dynamic_int8.py's quantize_pairs), so AVX2's VPMADDUBSW
cannot saturate and every CPU kind computes the same.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .dynamic_int8 import quantize_pairs
from .nbits import _drop_unused_initializers, _ensure_ms_domain, onnx_opset, weight_matmuls

ZERO_POINT = 128
PREFIX = "w8a8"


def _constants() -> list[onnx.TensorProto]:
    """The constants every per-token quantization shares (added once)."""
    return [
        numpy_helper.from_array(np.array([-1], np.int64), f"{PREFIX}_last_axis"),
        numpy_helper.from_array(np.array(1e-30, np.float32), f"{PREFIX}_tiny"),
        numpy_helper.from_array(np.array(127, np.float32), f"{PREFIX}_127"),
        numpy_helper.from_array(np.array([-1], np.int64), f"{PREFIX}_flat"),
        numpy_helper.from_array(np.array([ZERO_POINT], np.uint8), f"{PREFIX}_zero_point"),
    ]


def quantize_rows(x: str, k: int, tag: str, opset: int) -> tuple[list[onnx.NodeProto], list, str, str]:
    """Nodes quantizing activation `x` [..., k] to uint8 one row at a time -> (nodes, initializers,
    the uint8 tensor [..., k], the scales [..., 1])."""
    p = f"{PREFIX}/{tag}"
    c = PREFIX
    reduce = (
        helper.make_node("ReduceMax", [f"{p}/abs", f"{c}_last_axis"], [f"{p}/amax"], keepdims=1)
        if opset >= 18
        else helper.make_node("ReduceMax", [f"{p}/abs"], [f"{p}/amax"], axes=[-1], keepdims=1)
    )
    nodes = [
        helper.make_node("Abs", [x], [f"{p}/abs"]),
        reduce,
        helper.make_node("Max", [f"{p}/amax", f"{c}_tiny"], [f"{p}/amax_pos"]),
        helper.make_node("Div", [f"{p}/amax_pos", f"{c}_127"], [f"{p}/scale"]),  # [..., 1]
        helper.make_node("Reshape", [x, f"{p}/rows_shape"], [f"{p}/rows"]),  # [M, K]
        helper.make_node("Reshape", [f"{p}/scale", f"{c}_flat"], [f"{p}/row_scale"]),  # [M]
        helper.make_node("Shape", [f"{p}/row_scale"], [f"{p}/m"]),
        helper.make_node("Expand", [f"{c}_zero_point", f"{p}/m"], [f"{p}/row_zero_point"]),
        helper.make_node(
            "QuantizeLinear", [f"{p}/rows", f"{p}/row_scale", f"{p}/row_zero_point"], [f"{p}/rows_q"], axis=0
        ),
        helper.make_node("Shape", [x], [f"{p}/x_shape"]),
        helper.make_node("Reshape", [f"{p}/rows_q", f"{p}/x_shape"], [f"{p}/q"]),  # [..., K]
    ]
    inits = [numpy_helper.from_array(np.array([-1, k], np.int64), f"{p}/rows_shape")]
    return nodes, inits, f"{p}/q", f"{p}/scale"


def quantize_per_token(
    model: onnx.ModelProto, chosen: Callable[[onnx.NodeProto], bool] = lambda node: True
) -> onnx.ModelProto:
    """In place (and returned): every float32 weight MatMul that `chosen` accepts runs as
    MatMulIntegerToFloat on per-token uint8 activations."""
    inits = {i.name: i for i in model.graph.initializer}
    nodes = list(model.graph.node)
    targets = [
        n
        for n in weight_matmuls(model)
        if chosen(n) and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT
    ]
    if not targets:
        return model
    opset = onnx_opset(model)
    by_input: dict[str, list[onnx.NodeProto]] = {}
    for n in targets:
        by_input.setdefault(n.input[0], []).append(n)
    index = {n.output[0]: i for i, n in enumerate(nodes)}  # a node by its (unique) first output
    before: dict[int, list[onnx.NodeProto]] = {}  # node index -> quantization nodes placed before it
    replaced: dict[int, onnx.NodeProto] = {}
    new_inits: list[onnx.TensorProto] = []
    for g, (x, group) in enumerate(by_input.items()):
        k = numpy_helper.to_array(inits[group[0].input[1]]).shape[0]
        q_nodes, q_inits, xq, scale = quantize_rows(x, k, f"g{g}", opset)
        first = min(index[n.output[0]] for n in group)
        before[first] = q_nodes
        new_inits += q_inits
        for node in group:
            w = numpy_helper.to_array(inits[node.input[1]])
            wq, w_scale = quantize_pairs(w)
            base = f"{node.input[1]}_{PREFIX}"
            new_inits += [
                numpy_helper.from_array(wq, base),
                numpy_helper.from_array(w_scale, base + "_scale"),
            ]
            # no bias folded in: with a per-row a_scale, ONNX Runtime scales the bias along with the
            # product (measured), so a following Add stays as it is
            inputs = [xq, base, scale, base + "_scale", f"{PREFIX}_zero_point"]
            replaced[index[node.output[0]]] = helper.make_node(
                "MatMulIntegerToFloat",
                inputs,
                list(node.output),
                name=f"{node.name or node.output[0]}_{PREFIX}",
                domain="com.microsoft",
            )
    out = []
    for i, n in enumerate(nodes):
        out += before.get(i, [])
        out.append(replaced.get(i, n))
    del model.graph.node[:]
    model.graph.node.extend(out)
    model.graph.initializer.extend(_constants() + new_inits)
    _drop_unused_initializers(model)
    _ensure_ms_domain(model)
    return model
