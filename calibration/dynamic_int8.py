"""Dynamic int8 in the graph: MatMul -> DynamicQuantizeMatMul, for the CPU recipes' vision encoder.

ONNX Runtime's DynamicQuantizeMatMul quantizes its float input to uint8 at run time (one scale
and zero point per tensor) and multiplies it with int8 weights in an integer GEMM. Over the ~200
tokens of an image it encodes ~2x faster than 8-bit MatMulNBits, whose int8 path is built for a
few rows at a time (docs/quantization.md, benchmarks/vision_int8.py).

Without VNNI, x86's uint8 x int8 kernel (VPMADDUBSW) adds the products of two neighbouring
weights along K, (2i, 2i+1), into int16, which saturates above 32767. Full 8-bit weights can
reach 2 x 255 x 127 = 64770; 7-bit weights cannot, but lose too much accuracy. Here each column's
scale is set so that every neighbouring pair has |q[2i]| + |q[2i+1]| <= 128: a pair then sums to
at most 255 x 128 = 32640, and a lone large weight still gets up to 127 levels.
tests/test_portability.py checks both the bound and the pairing on an emulated AVX2 CPU.

One scale per activation tensor is what makes it fast, and what a model with outlier channels
or tokens can lose to (SmolLM2's decoder does: KL 0.17 with every MatMul here, docs/quantization.md).
So `lowest_cosine` compares the rewritten encoder with its source on real pixels, and the
quantizer keeps the rewrite only when it stays close (calibration/quantize.py).

Layout (com.microsoft.DynamicQuantizeMatMul):
    A        float [..., K]    quantized at run time
    B        int8  [K, N]      w ~= B * b_scale
    b_scale  float [N]
    bias     float [N]         the Add that followed the MatMul, folded in when it adds a constant
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .nbits import _drop_unused_initializers, _ensure_ms_domain, matches, weight_matmuls

PAIR_MAX = 128  # |q[2i]| + |q[2i+1]| <= 128: 255 x 128 = 32640 fits int16


def quantize_pairs(w_kn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w_kn [K, N] -> (int8 [K, N], per-column scales [N]), round to nearest with every pair of
    neighbouring weights along K within PAIR_MAX in magnitude."""
    K, N = w_kn.shape
    w = np.zeros((K + K % 2, N), np.float32)  # an odd K pairs its last row with a zero
    w[:K] = w_kn
    pairs = np.abs(w).reshape(-1, 2, N)
    amax = np.maximum(pairs.sum(1).max(0), np.abs(w).max(0) * PAIR_MAX / 127)
    scale = np.where(amax > 0, amax / PAIR_MAX, 1.0).astype(np.float32)
    x = (w / scale).reshape(-1, 2, N)
    q = np.clip(np.rint(x), -127, 127).astype(np.int32)
    # rounding both of a pair away from zero can overshoot by one: take it off the one rounded
    # furthest, which leaves every weight within one step of its value
    over = np.abs(q).sum(1) > PAIR_MAX  # [K/2, N]
    pick = np.argmax(np.abs(q) - np.abs(x), axis=1)  # [K/2, N]
    rows, cols = np.nonzero(over)
    q[rows, pick[rows, cols], cols] -= np.sign(q[rows, pick[rows, cols], cols])
    return q.reshape(-1, N)[:K].astype(np.int8), scale


def quantize_dynamic_int8(
    model: onnx.ModelProto,
    exclude: list[str] | tuple[str, ...] = (),
    weights: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] = quantize_pairs,
) -> onnx.ModelProto:
    """In place: every float32 weight MatMul not matching `exclude` -> DynamicQuantizeMatMul, its
    weights quantized by `weights` (other quantizers: benchmarks/vision_int8.py)."""
    inits = {i.name: i for i in model.graph.initializer}
    targets = {n.name for n in weight_matmuls(model) if not matches(n.name, list(exclude))}
    nodes = list(model.graph.node)
    readers: dict[str, list[int]] = {}  # tensor name -> indices of the nodes that read it
    for i, x in enumerate(nodes):
        for name in x.input:
            readers.setdefault(name, []).append(i)
    copies = {x.output[0]: x.input[0] for x in nodes if x.op_type == "Identity"}
    folded: set[int] = set()  # indices of bias Adds now inside their DynamicQuantizeMatMul
    for k, node in enumerate(nodes):
        if node.name not in targets:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.dtype != np.float32:
            continue  # DynamicQuantizeMatMul takes float32 only
        q, scale = weights(w)
        base = f"{node.input[1]}_Qdyn"
        model.graph.initializer.extend(
            [numpy_helper.from_array(q, base), numpy_helper.from_array(scale, base + "_scales")]
        )
        inputs, outputs = [node.input[0], base, base + "_scales", "", ""], list(node.output)
        add = _bias_add(nodes, node, readers.get(node.output[0], []), copies, inits, w.shape[1])
        if add is not None:
            a, bias = add
            inputs[4], outputs = bias, list(nodes[a].output)
            folded.add(a)
        nodes[k] = helper.make_node(
            "DynamicQuantizeMatMul", inputs, outputs, name=node.name + "_Qdyn", domain="com.microsoft"
        )
    nodes = [n for i, n in enumerate(nodes) if i not in folded]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _drop_unused_initializers(model)
    _ensure_ms_domain(model)
    return model


def _bias_add(
    nodes: list[onnx.NodeProto],
    matmul: onnx.NodeProto,
    readers: list[int],
    copies: dict[str, str],
    inits: dict,
    n: int,
) -> tuple[int, str] | None:
    """(index, bias name) of the Add that alone reads `matmul`'s output (`readers`: the indices of
    its readers) and adds a float [n] constant, found through `copies` (Identity output -> input)."""
    out = matmul.output[0]
    if len(readers) != 1 or nodes[readers[0]].op_type != "Add":
        return None
    add = nodes[readers[0]]
    other = add.input[1] if add.input[0] == out else add.input[0]
    while other in copies:  # the exporter reads some shared initializers through Identity nodes
        other = copies[other]
    if (
        other not in inits
        or list(inits[other].dims) != [n]
        or inits[other].data_type != onnx.TensorProto.FLOAT
    ):
        return None
    return readers[0], other


def lowest_cosine(source_path: str, quantized: onnx.ModelProto, pixels: np.ndarray) -> float:
    """Lowest cosine similarity, over every output token, between the vision encoder at
    `source_path` and `quantized` on `pixels` [N, 3, S, S]."""
    import onnxruntime as ort

    from runtime.onnx_backend import session_options

    outs = []
    for model in (source_path, quantized.SerializeToString()):
        session = ort.InferenceSession(model, session_options(), providers=["CPUExecutionProvider"])
        outs.append(session.run(None, {session.get_inputs()[0].name: pixels})[0])
    a, b = (o.reshape(-1, o.shape[-1]).astype(np.float64) for o in outs)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)
    return float(cos.min())
