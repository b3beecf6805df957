"""`nanovlm-export check BUNDLE --target trt-10.3`: will TensorRT's ONNX parser take these graphs?

Every node of each graph against the support table of the target (trt/support.py): the
operator is a standard ONNX one the target parses, its main tensor has an element type the target
supports for it (types from ONNX shape inference), inputs TensorRT needs as build-time constants
are initializers or Constant nodes, Q/DQ zero points are zero, and the opset is in range. A
problem is a line naming the graph, the node, the operator and what is wrong.
"""

from __future__ import annotations

import os

import onnx

from core.bundle import GRAPHS, load_bundle

from .support import CONSTANT_INPUTS, STANDARD_DOMAINS, TARGETS, TYPED_TENSOR, TYPES, ZERO_POINTS, Target

TYPE_NAMES = {
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.DOUBLE: "DOUBLE",
    onnx.TensorProto.FLOAT8E4M3FN: "FP8",
    onnx.TensorProto.INT4: "INT4",
}


def target(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"unknown TensorRT target {name!r}; known: {', '.join(TARGETS)}")
    return TARGETS[name]


def check_model(model: onnx.ModelProto, tgt: Target, graph_name: str = "graph") -> list[str]:
    """Problems TensorRT `tgt` would have parsing `model` (empty: none found)."""
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), None)
    if opset is None or not 9 <= opset <= tgt.max_opset:
        problems.append(f"{graph_name}: opset {opset}; {tgt.name} parses opsets 9 to {tgt.max_opset}")
    graph = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types |= {i.name: i.data_type for i in graph.initializer}
    inits = {i.name: i for i in graph.initializer}
    constants = set(inits) | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    for node in graph.node:
        op, where = node.op_type, f"{graph_name}: {node.name or node.op_type}"
        if node.domain not in STANDARD_DOMAINS:
            problems.append(
                f"{where}: {node.domain}.{op} is not a standard ONNX operator (ONNX Runtime only)"
            )
            continue
        if op in tgt.added_later:
            problems.append(f"{where}: {op} is not parsed by {tgt.name} (added in a later TensorRT)")
            continue
        if op not in TYPES:
            problems.append(f"{where}: {op} is not in the support table kept for {tgt.name}")
            continue
        kind, index = TYPED_TENSOR.get(op, ("input", 0))
        tensors = node.output if kind == "output" else node.input
        elem = types.get(tensors[index]) if index < len(tensors) and tensors[index] else None
        name = TYPE_NAMES.get(elem, str(elem)) if elem else None
        if name and name not in TYPES[op]:
            problems.append(f"{where}: {op} on {name}; {tgt.name} takes {', '.join(TYPES[op])}")
        if op == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            if TYPE_NAMES.get(to) not in TYPES["Cast"]:
                problems.append(
                    f"{where}: Cast to {TYPE_NAMES.get(to, to)}; {tgt.name} casts to {', '.join(TYPES['Cast'])}"
                )
        for i in (*CONSTANT_INPUTS.get(op, ()), *tgt.constant_inputs.get(op, ())):
            if i < len(node.input) and node.input[i] and node.input[i] not in constants:
                problems.append(f"{where}: input {i} of {op} ({node.input[i]}) must be a build-time constant")
        zp = ZERO_POINTS.get(op)
        if zp is not None and zp < len(node.input) and node.input[zp] in inits:
            if onnx.numpy_helper.to_array(inits[node.input[zp]]).any():
                problems.append(
                    f"{where}: {op} with a non-zero zero point; TensorRT takes symmetric quantization"
                )
    return problems


def check_bundle(path: str, target_name: str) -> dict[str, list[str]]:
    """{graph: problems} for both graphs of the bundle at `path`."""
    tgt = target(target_name)
    bundle = load_bundle(path, verify=False)
    out = {}
    for graph in GRAPHS:
        model = onnx.load(bundle.graph_path(graph), load_external_data=False)
        out[graph] = check_model(model, tgt, os.path.basename(bundle.graph_path(graph)))
    return out
