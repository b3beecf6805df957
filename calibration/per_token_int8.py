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

Outlier channels (LLM.int8()'s decomposition): an input whose few channels run far above the rest
(down_proj's, the SwiGLU product) can keep those channels in float. Their absolute values leave
the row's range (Abs is multiplied by a 0/1 mask before ReduceMax), their weight rows are zeroed in
the int8 weights (so the saturated codes they quantize to multiply nothing), and a float MatMul
over the kept channels is added back:

    Y = MatMulIntegerToFloat(...) + Gather(X, outliers, axis -1) @ W[outliers]    [k] channels

Rotations (QuaRot's online Hadamard): the input is multiplied by a block-diagonal orthonormal
Hadamard matrix at run time (X as [rows * K/b, b] @ H [b, b]) and H^T is folded into the weights,
X W = (X H)(H^T W): an outlier is spread over its block before the row's range is taken.
benchmarks/decoder_int8.py measures both on SmolLM2's down_proj (docs/quantization.md).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .dynamic_int8 import quantize_pairs
from .nbits import _drop_unused_initializers, _ensure_ms_domain, onnx_opset, weight_matmuls

ZERO_POINT = 128
# a rotation's block along K, at most: an outlier spread over 64 channels, for 64 MACs a value
HADAMARD_BLOCK = 64
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


def hadamard(n: int) -> np.ndarray:
    """The orthonormal Hadamard matrix of order n (a power of 2), float32 [n, n], symmetric."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard block must be a power of 2, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(np.float32)


def rotation_block(k: int) -> int:
    """The Hadamard block for an input of k channels: the largest power of 2 dividing k, at most
    HADAMARD_BLOCK (1: not rotated)."""
    return min(HADAMARD_BLOCK, k & -k)


def outlier_channels(max_abs: np.ndarray, count: int) -> np.ndarray:
    """The `count` channels with the largest calibrated |x| (int64, ascending): the ones a row's
    int8 range would otherwise be sized for."""
    return np.sort(np.argsort(-max_abs, kind="stable")[:count]).astype(np.int64)


def quantize_rows(
    x: str, k: int, tag: str, opset: int, outliers: np.ndarray | None = None
) -> tuple[list[onnx.NodeProto], list, str, str]:
    """Nodes quantizing activation `x` [..., k] to uint8 one row at a time, each row's range taken
    over every channel but `outliers` -> (nodes, initializers, the uint8 tensor [..., k], the
    scales [..., 1])."""
    p = f"{PREFIX}/{tag}"
    c = PREFIX
    inits = [numpy_helper.from_array(np.array([-1, k], np.int64), f"{p}/rows_shape")]
    nodes = [helper.make_node("Abs", [x], [f"{p}/abs"])]
    ranged = f"{p}/abs"
    if outliers is not None and len(outliers):
        mask = np.ones(k, np.float32)
        mask[outliers] = 0
        inits.append(numpy_helper.from_array(mask, f"{p}/inlier_mask"))
        nodes.append(helper.make_node("Mul", [ranged, f"{p}/inlier_mask"], [f"{p}/abs_inliers"]))
        ranged = f"{p}/abs_inliers"
    nodes.append(
        helper.make_node("ReduceMax", [ranged, f"{c}_last_axis"], [f"{p}/amax"], keepdims=1)
        if opset >= 18
        else helper.make_node("ReduceMax", [ranged], [f"{p}/amax"], axes=[-1], keepdims=1)
    )
    nodes += [
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
    return nodes, inits, f"{p}/q", f"{p}/scale"


def quantize_per_token(
    model: onnx.ModelProto,
    chosen: Callable[[onnx.NodeProto], bool] = lambda node: True,
    outliers: dict[str, np.ndarray] | None = None,
    rotations: dict[str, int] | None = None,
) -> onnx.ModelProto:
    """In place (and returned): every float32 weight MatMul that `chosen` accepts runs as
    MatMulIntegerToFloat on per-token uint8 activations; `outliers`: activation name -> the input
    channels its MatMuls keep in float (outlier_channels); `rotations`: activation name -> the
    Hadamard block it is rotated by first (rotation_block)."""
    outliers = outliers or {}
    rotations = rotations or {}
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
    replaced: dict[int, list[onnx.NodeProto]] = {}
    new_inits: list[onnx.TensorProto] = []
    for g, (x, group) in enumerate(by_input.items()):
        k = numpy_helper.to_array(inits[group[0].input[1]]).shape[0]
        kept = outliers.get(x)
        kept = kept if kept is not None and len(kept) else None
        block = rotations.get(x)
        rot_nodes: list[onnx.NodeProto] = []
        x_in = x
        if block:
            if k % block:
                raise ValueError(f"{group[0].name}: K={k} is not a multiple of the rotation block {block}")
            h = hadamard(block)
            r = f"{PREFIX}/g{g}/rot"
            new_inits += [
                # [1, b, b]: a constant, not a layer's [K, N] weight for the weight quantizers to take
                numpy_helper.from_array(h[None], f"{r}/h"),
                numpy_helper.from_array(np.array([-1, block], np.int64), f"{r}/blocks_shape"),
            ]
            rot_nodes = [
                helper.make_node("Shape", [x], [f"{r}/x_shape"]),
                helper.make_node("Reshape", [x, f"{r}/blocks_shape"], [f"{r}/blocks"]),
                helper.make_node(
                    "MatMul", [f"{r}/blocks", f"{r}/h"], [f"{r}/rotated_blocks"], name=f"{r}/MatMul"
                ),
                helper.make_node("Reshape", [f"{r}/rotated_blocks", f"{r}/x_shape"], [f"{r}/x"]),
            ]
            x_in = f"{r}/x"
        q_nodes, q_inits, xq, scale = quantize_rows(x_in, k, f"g{g}", opset, kept)
        first = min(index[n.output[0]] for n in group)
        before[first] = rot_nodes + q_nodes
        new_inits += q_inits
        if kept is not None:
            new_inits.append(numpy_helper.from_array(kept, f"{PREFIX}/g{g}/outliers"))
            before[first].append(
                helper.make_node("Gather", [x, f"{PREFIX}/g{g}/outliers"], [f"{PREFIX}/g{g}/x_out"], axis=-1)
            )  # [..., k_out]
        for node in group:
            w = numpy_helper.to_array(inits[node.input[1]])
            if block:  # X W = (X H)(H^T W), H orthogonal and symmetric, block by block along K
                kb, n_out = w.shape
                w = np.einsum("ij,kjn->kin", h, w.reshape(kb // block, block, n_out))
                w = w.reshape(kb, n_out).astype(np.float32)
            base = f"{node.input[1]}_{PREFIX}"
            integer_out = list(node.output)
            extra: list[onnx.NodeProto] = []
            if kept is not None:
                new_inits.append(numpy_helper.from_array(w[kept], base + "_outlier_rows"))
                w = w.copy()
                w[kept] = 0  # their codes saturate; zero rows make them count for nothing
                integer_out = [f"{base}/integer"]
                extra = [
                    helper.make_node(
                        "MatMul", [f"{PREFIX}/g{g}/x_out", base + "_outlier_rows"], [f"{base}/float"]
                    ),
                    helper.make_node("Add", [f"{base}/integer", f"{base}/float"], list(node.output)),
                ]
            wq, w_scale = quantize_pairs(w)
            new_inits += [
                numpy_helper.from_array(wq, base),
                numpy_helper.from_array(w_scale, base + "_scale"),
            ]
            # no bias folded in: with a per-row a_scale, ONNX Runtime scales the bias along with the
            # product (measured), so a following Add stays as it is
            inputs = [xq, base, scale, base + "_scale", f"{PREFIX}_zero_point"]
            replaced[index[node.output[0]]] = [
                helper.make_node(
                    "MatMulIntegerToFloat",
                    inputs,
                    integer_out,
                    name=f"{node.name or node.output[0]}_{PREFIX}",
                    domain="com.microsoft",
                ),
                *extra,
            ]
    out = []
    for i, n in enumerate(nodes):
        out += before.get(i, [])
        out += replaced.get(i, [n])
    del model.graph.node[:]
    model.graph.node.extend(out)
    model.graph.initializer.extend(_constants() + new_inits)
    _drop_unused_initializers(model)
    _ensure_ms_domain(model)
    return model
