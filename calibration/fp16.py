"""The fp16 rewrite of an exported graph: fp16 weights and matrix products, everything else fp32;
optionally with int8 Q/DQ weights and activations on those products (the int8-static recipe)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .nbits import onnx_opset, tied_head, weight_matmuls

QDQ_MIN_OPSET = 19  # fp16 scales in QuantizeLinear / DequantizeLinear


def to_fp16(
    model: onnx.ModelProto,
    int8_weights: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    activation_amax: dict[str, float] | None = None,
) -> onnx.ModelProto:
    """fp16 weights and fp16 matrix products; everything between them (norms, RoPE, attention
    scores and softmax, residual adds) stays fp32, as does the graph IO and the KV cache.

    Each weight MatMul (and the tied head Gemm / embedding Gather) reads an fp16 initializer
    between two Casts. onnxruntime's generic float16 converter breaks SmolLM2 (KL 8.0, top-1 2%)
    even with every node blocked (docs/quantization.md), so the conversion is this explicit one.

    int8_weights {MatMul name: (q [K, N] int8, scales [N])}: that MatMul reads its weight through
    DequantizeLinear (per output channel, zero point 0) instead. activation_amax {MatMul name:
    amax}: its fp16 input passes QuantizeLinear -> DequantizeLinear with scale amax / 127 first.
    Either needs the model at opset >= 19 (fp16 scales).
    """
    int8_weights, activation_amax = int8_weights or {}, activation_amax or {}
    if int8_weights or activation_amax:
        opset = onnx_opset(model)
        if opset < QDQ_MIN_OPSET:
            raise ValueError(f"fp16 Q/DQ needs opset >= {QDQ_MIN_OPSET}; the graph has {opset}")
    inits = {i.name: i for i in model.graph.initializer}
    head = tied_head(model)
    targets = {n.name for n in weight_matmuls(model)} | ({head[0].name} if head else set())
    converted: set[str] = set()
    nodes: list[onnx.NodeProto] = []
    f16 = onnx.TensorProto.FLOAT16
    for node in model.graph.node:
        weight = (
            node.input[1] if node.name in targets else (node.input[0] if head and node is head[1] else None)
        )
        if weight is None:
            nodes.append(node)
            continue
        out = node.output[0]
        if node.name in int8_weights:
            q, scale = int8_weights[node.name]
            model.graph.initializer.remove(inits.pop(weight))
            model.graph.initializer.extend(
                [
                    numpy_helper.from_array(q.astype(np.int8), weight + "_int8"),
                    numpy_helper.from_array(scale.astype(np.float16), weight + "_scale"),
                    numpy_helper.from_array(np.zeros(scale.shape, np.int8), weight + "_zero"),
                ]
            )
            nodes.append(
                helper.make_node(
                    "DequantizeLinear",
                    [weight + "_int8", weight + "_scale", weight + "_zero"],
                    [weight + "_fp16"],
                    name=node.name + "_weight_dq",
                    axis=1,
                )
            )
            weight_in = weight + "_fp16"
        else:
            if weight not in converted:
                arr = numpy_helper.to_array(inits[weight]).astype(np.float16)
                inits[weight].CopyFrom(numpy_helper.from_array(arr, weight))
                converted.add(weight)
            weight_in = weight
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gather":  # fp16 table lookup, rows back to fp32
            nodes.append(
                helper.make_node("Gather", list(node.input), [out + "_fp16"], name=node.name, **attrs)
            )
        else:
            x = out + "_in16"
            nodes.append(helper.make_node("Cast", [node.input[0]], [x], name=node.name + "_in16", to=f16))
            if node.name in activation_amax:
                model.graph.initializer.extend(
                    [
                        numpy_helper.from_array(
                            np.array(activation_amax[node.name] / 127.0, np.float16), out + "_scale"
                        ),
                        numpy_helper.from_array(np.array(0, np.int8), out + "_zero"),
                    ]
                )
                qdq = [out + "_scale", out + "_zero"]
                nodes.append(
                    helper.make_node("QuantizeLinear", [x, *qdq], [out + "_q"], name=node.name + "_q")
                )
                nodes.append(
                    helper.make_node(
                        "DequantizeLinear", [out + "_q", *qdq], [out + "_dq"], name=node.name + "_dq"
                    )
                )
                x = out + "_dq"
            inputs = [x, weight_in, *node.input[2:]]
            nodes.append(helper.make_node(node.op_type, inputs, [out + "_fp16"], name=node.name, **attrs))
        nodes.append(
            helper.make_node(
                "Cast", [out + "_fp16"], [out], name=node.name + "_out32", to=onnx.TensorProto.FLOAT
            )
        )
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model
