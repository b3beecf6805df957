"""Importance of each weight's input channels: the mean squared activation on calibration data.

Weight-only quantization errors matter in proportion to the activations they multiply; SmolLM2,
like most LLMs, has a few hidden channels with activations far above the rest. The int4 recipe
weights each block's scale search by these values (blockwise.py), an "importance matrix" in
llama.cpp's terms, measured here through the fp32 graph on the recorded calibration feeds.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper

from core.progress import progress

from .nbits import tied_head, weight_matmuls


def channel_stats(
    model: onnx.ModelProto,
    tensors: list[str],
    feeds: list[dict[str, np.ndarray]],
    desc: str,
    grams: set[str] | frozenset[str] = frozenset(),
) -> dict[str, dict[str, np.ndarray]]:
    """Per-channel statistics of intermediate float tensors over the feeds, through a copy of the
    graph that also outputs them: {tensor: {"mean_sq": [C], "max_abs": [C]}} (C = last axis), plus
    "gram" = X^T X / rows [C, C] (float64) for the tensors named in `grams`."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for t in tensors:
        if t not in existing:
            probe.graph.output.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    sums: dict[str, np.ndarray] = {}
    peaks: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    products: dict[str, np.ndarray] = {}
    for feed in progress(feeds, desc=desc, unit="feed", leave=False):
        for name, value in zip(tensors, session.run(tensors, feed), strict=True):
            x = value.reshape(-1, value.shape[-1]).astype(np.float64)
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            peak = np.abs(x).max(0)
            peaks[name] = np.maximum(peaks[name], peak) if name in peaks else peak
            rows[name] = rows.get(name, 0) + x.shape[0]
            if name in grams:
                products[name] = products.get(name, 0) + x.T @ x
    out = {
        t: {"mean_sq": (sums[t] / max(rows[t], 1)).astype(np.float32), "max_abs": peaks[t].astype(np.float32)}
        for t in sums
    }
    for t, product in products.items():
        out[t]["gram"] = product / max(rows[t], 1)
    return out


def activation_importance(
    graph_path: str, feeds: list[dict[str, np.ndarray]], gram_for: Callable[[str], bool] = lambda name: False
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """({MatMul (or tied-head Gemm) node name: mean of x^2 over all rows, per input channel [K]},
    {MatMul node name: X^T X / rows [K, K]} for the MatMuls `gram_for` selects (GPTQ's Hessian))."""
    model = onnx.load(graph_path)
    inputs = {n.name: n.input[0] for n in weight_matmuls(model)}
    gram_inputs = {node: t for node, t in inputs.items() if gram_for(node)}
    head = tied_head(model)
    if head:
        inputs[head[0].name] = head[0].input[0]
    stats = channel_stats(
        model,
        sorted(set(inputs.values())),
        feeds,
        "calibration: activation statistics",
        set(gram_inputs.values()),
    )
    importance = {node: stats[t]["mean_sq"] for node, t in inputs.items() if t in stats}
    return importance, {node: stats[t]["gram"] for node, t in gram_inputs.items()}
