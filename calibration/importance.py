"""Importance of each weight's input channels: the mean squared activation on calibration data.

Weight-only quantization errors matter in proportion to the activations they multiply; SmolLM2,
like most LLMs, has a few hidden channels with activations far above the rest. The int4 recipe
weights each block's scale search by these values (blockwise.py), an "importance matrix" in
llama.cpp's terms, measured here through the fp32 graph on the recorded calibration feeds.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper
from tqdm import tqdm

from .nbits import tied_head, weight_matmuls


def activation_importance(graph_path: str, feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """{MatMul (or tied-head Gemm) node name: mean of x^2 over all rows, per input channel [K]}."""
    import onnxruntime as ort

    model = onnx.load(graph_path)
    inputs = {n.name: n.input[0] for n in weight_matmuls(model)}
    head = tied_head(model)
    if head:
        inputs[head[0].name] = head[0].input[0]
    tensors = sorted(set(inputs.values()))
    existing = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in existing:
            model.graph.output.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    sums: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    for feed in tqdm(feeds, desc="calibration: activation importance", unit="feed", leave=False):
        for name, value in zip(tensors, session.run(tensors, feed), strict=True):
            x = value.reshape(-1, value.shape[-1]).astype(np.float64)
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            rows[name] = rows.get(name, 0) + x.shape[0]
    return {node: (sums[t] / max(rows[t], 1)).astype(np.float32) for node, t in inputs.items() if t in sums}
