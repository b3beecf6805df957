"""Weight-only block quantization in the graph: MatMul -> MatMulNBits, and the tied embedding/head
matrix quantized once and shared by GatherBlockQuantized (lookup) and MatMulNBits (head)."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .blockwise import quantize_blocks
from .gptq import gptq_blocks

log = logging.getLogger(__name__)
BLOCK_SIZE = 32


def matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMul nodes whose second input is a 2-D initializer (the layers' weights)."""
    inits = {i.name: i for i in model.graph.initializer}
    return [
        n
        for n in model.graph.node
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2
    ]


def quantize_nbits(
    model: onnx.ModelProto,
    bits: int,
    keep_8bit: list[str] | tuple[str, ...] = (),
    exclude: list[str] | tuple[str, ...] = (),
    head_bits: int = 8,
    block_size: int = BLOCK_SIZE,
    accuracy_level: int = 4,
    importance: dict[str, np.ndarray] | None = None,
    grams: dict[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """In place: weight MatMuls -> MatMulNBits at `bits` (8 for names matching `keep_8bit`, left
    in float for `exclude`); the tied embedding/head at `head_bits`, stored once. MatMuls with an
    entry in `grams` (X^T X / rows of their input) are rounded by GPTQ (gptq.py)."""
    exclude, keep_8bit, importance, grams = list(exclude), list(keep_8bit), importance or {}, grams or {}
    head = tied_head(model)
    share_tied_embedding(
        model,
        head_bits,
        block_size,
        accuracy_level,
        skip=lambda n: matches(n, exclude),
        importance=importance.get(head[0].name) if head else None,
    )
    inits = {i.name: i for i in model.graph.initializer}
    targets = {n.name for n in weight_matmuls(model) if not matches(n.name, exclude)}
    nodes = list(model.graph.node)
    for k, node in enumerate(nodes):
        if node.name not in targets:
            continue
        node_bits = 8 if matches(node.name, keep_8bit) else bits
        w = numpy_helper.to_array(inits[node.input[1]])
        if node.name in grams:
            packed, scales = gptq_blocks(w, grams[node.name], node_bits, block_size)
        else:
            packed, scales = quantize_blocks(
                w.astype(np.float32), node_bits, block_size, importance.get(node.name)
            )
        base = f"{node.input[1]}_Q{node_bits}"
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(packed, base),
                numpy_helper.from_array(scales.astype(w.dtype), base + "_scales"),
            ]
        )
        nodes[k] = helper.make_node(
            "MatMulNBits",
            [node.input[0], base, base + "_scales"],
            list(node.output),
            name=node.name + f"_Q{node_bits}",
            domain="com.microsoft",
            K=w.shape[0],
            N=w.shape[1],
            bits=node_bits,
            block_size=block_size,
            accuracy_level=accuracy_level,
        )
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _drop_unused_initializers(model)
    _ensure_ms_domain(model)
    return model


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def onnx_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (ai.onnx) opset version; 0 when it imports none."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _ensure_ms_domain(model: onnx.ModelProto) -> None:
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def tied_head(model: onnx.ModelProto) -> tuple[onnx.NodeProto, onnx.NodeProto, str] | None:
    """(head Gemm, embedding Gather, matrix name) when one initializer serves both (see export)."""
    for gemm in model.graph.node:
        if gemm.op_type != "Gemm" or len(gemm.input) != 2:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
        if attrs.get("transB") != 1 or attrs.get("transA", 0) != 0:
            continue
        for gather in model.graph.node:
            if gather.op_type == "Gather" and gather.input[0] == gemm.input[1]:
                return gemm, gather, gemm.input[1]
    return None


def share_tied_embedding(
    model: onnx.ModelProto,
    bits: int,
    block_size: int,
    accuracy_level: int,
    skip: Callable[[str], bool],
    importance: np.ndarray | None = None,
) -> bool:
    """Quantize the tied [vocab, hidden] matrix once: the head becomes MatMulNBits and the
    embedding lookup GatherBlockQuantized, both reading the same packed initializer."""
    found = tied_head(model)
    if found is None or skip(found[0].name):
        return False
    gemm, gather, name = found
    inits = {i.name: i for i in model.graph.initializer}
    w = numpy_helper.to_array(inits[name])
    V, D = w.shape
    if D % block_size:
        log.warning("hidden size %d is not a multiple of block %d: tied head left in float", D, block_size)
        return False
    kb = D // block_size
    packed, scales = quantize_blocks(
        np.ascontiguousarray(w.T, dtype=np.float32), bits, block_size, importance
    )
    scales = scales.astype(w.dtype)
    q_name, s_name = f"{name}_Q{bits}", f"{name}_scales"
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(packed, q_name),
            numpy_helper.from_array(scales, s_name),
            numpy_helper.from_array(np.array([V, kb, 1], np.int64), f"{s_name}_shape3"),
            numpy_helper.from_array(np.array([0, 0, D], np.int64), f"{name}_rows_shape"),
        ]
    )
    head = helper.make_node(
        "MatMulNBits",
        [gemm.input[0], q_name, s_name],
        list(gemm.output),
        name=gemm.name + f"_Q{bits}",
        domain="com.microsoft",
        K=D,
        N=V,
        bits=bits,
        block_size=block_size,
        accuracy_level=accuracy_level,
    )
    # GatherBlockQuantized wants scales of the data's rank ([V, kb, 1] for data [V, kb, blob]) and
    # gives [..., kb, block]; two Reshapes (constant-folded at load) adapt the shared tensors.
    lookup = [
        helper.make_node(
            "Reshape", [s_name, f"{s_name}_shape3"], [f"{s_name}_3d"], name=gather.name + "_scales3d"
        ),
        helper.make_node(
            "GatherBlockQuantized",
            [q_name, gather.input[1], f"{s_name}_3d"],
            [gather.output[0] + "_blocks"],
            name=gather.name + f"_Q{bits}",
            domain="com.microsoft",
            gather_axis=0,
            quantize_axis=2,
            block_size=block_size,
            bits=bits,
        ),
        helper.make_node(
            "Reshape",
            [gather.output[0] + "_blocks", f"{name}_rows_shape"],
            list(gather.output),
            name=gather.name + "_rows",
        ),
    ]
    nodes = list(model.graph.node)
    k_gemm, k_gather = nodes.index(gemm), nodes.index(gather)
    nodes[k_gemm] = head
    nodes[k_gather : k_gather + 1] = lookup
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.remove(inits[name])
    _ensure_ms_domain(model)
    return True
