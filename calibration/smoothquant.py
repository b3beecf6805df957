"""SmoothQuant (Xiao et al., 2022): move activation outliers into the weights before static INT8.

Per-tensor int8 activation ranges cannot hold SmolLM2's outlier channels (docs/quantization.md). For a weight MatMul Y = X W, dividing input channel j of X by s_j and
multiplying row j of W by s_j leaves Y unchanged; with s_j = max|X_j|^a / max|W_j|^(1-a) the
activation ranges even out and the weights take a share of the difficulty.

The division is folded into whatever produces X, so the graph gains no op:
  - X = norm(x) * g (an RMSNorm's weight g, an initializer; or the gamma of ONNX Runtime's
    SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization in fused graphs): g_j /= s_j
  - X = a * U(x) (the gated MLP: SiLU(gate) * up, U a weight MatMul): column j of U's weight /= s_j
Every weight MatMul reading X is scaled together (q/k/v share one s, gate/up another). Inputs
produced any other way (the attention output into o_proj) are left as they are.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from .importance import channel_stats
from .nbits import weight_matmuls

log = logging.getLogger(__name__)

FUSED_NORMS = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}  # op -> gamma input


def smooth(
    model: onnx.ModelProto, feeds: list[dict], alpha: float = 0.5, only: set[str] | None = None
) -> list[str]:
    """In place; returns the names of the MatMul groups smoothed. `only`: the MatMul node names
    whose activations will be quantized; a group is smoothed only when all its MatMuls are among
    them (smoothing a weight-only layer would only make its weights harder)."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    weight_of = {n.output[0]: n for n in weight_matmuls(model)}
    groups: dict[str, list[onnx.NodeProto]] = {}
    for n in weight_matmuls(model):
        groups.setdefault(n.input[0], []).append(n)
    users: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1

    folds: dict[str, tuple[str, str]] = {}  # activation -> ("norm", gain init) or ("columns", weight init)
    for x in groups:
        if only is not None and not all(n.name in only for n in groups[x]):
            continue
        p = producer.get(x)
        if p is not None and p.op_type in FUSED_NORMS and p.output[0] == x:  # ONNX Runtime's fused RMSNorm
            gamma = p.input[FUSED_NORMS[p.op_type]]
            if gamma in inits and users.get(gamma) == 1:
                folds[x] = ("norm", gamma)
            continue
        if p is None or p.op_type != "Mul":
            continue
        gain = next(
            (i for i in p.input if i in inits and len(inits[i].dims) == 1 and users.get(i) == 1), None
        )
        upstream = next((weight_of[i] for i in p.input if i in weight_of), None)
        if gain is not None:
            folds[x] = ("norm", gain)
        elif upstream is not None and users.get(upstream.input[1]) == 1:
            folds[x] = ("columns", upstream.input[1])
    if not folds:
        return []
    stats = channel_stats(model, sorted(folds), feeds, "smoothquant: activation ranges")
    act_max = {t: v["max_abs"] for t, v in stats.items()}
    done = []
    for x, (kind, target) in folds.items():
        ws = [numpy_helper.to_array(inits[n.input[1]]) for n in groups[x]]
        w_max = np.max(np.stack([np.abs(w).max(1) for w in ws]), 0)  # per input channel
        s = np.power(np.maximum(act_max[x], 1e-5), alpha) / np.power(np.maximum(w_max, 1e-5), 1 - alpha)
        s = np.clip(s, 1e-5, None).astype(np.float32)
        for n, w in zip(groups[x], ws, strict=True):
            inits[n.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(w.dtype), n.input[1]))
        t = numpy_helper.to_array(inits[target])
        scaled = t / s if kind == "norm" else t / s[None, :]
        inits[target].CopyFrom(numpy_helper.from_array(scaled.astype(t.dtype), target))
        done.append(",".join(n.name for n in groups[x]))
    log.info("smoothquant (alpha %.2f): %d MatMul groups smoothed", alpha, len(done))
    return done
