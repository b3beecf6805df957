"""GPTQ for the 4-bit layers: round each input row of a weight in turn and push its rounding
error onto the rows not yet rounded, weighted by how the calibration activations correlate.

Rounding every weight to its nearest grid point (even with a well-chosen scale, blockwise.py)
ignores that a layer's output error is x @ (W - Q): errors on correlated input channels can cancel
or add up. GPTQ (Frantar et al., 2022) minimises ||X W - X Q||^2 one input channel at a time,
with H = X^T X / rows measured on the calibration feeds. Each block of 32 input channels gets its
scales from blockwise.search_scales on the weights as updated so far, so the packed format is the
one MatMulNBits already reads: only which integers are stored changes, not the speed.

Layout as in blockwise.py: W is a MatMul's B [K, N]; row k multiplies input channel k.
"""

from __future__ import annotations

import numpy as np

from .blockwise import check_bits, pack, round_to_grid, search_scales

# Added to H's diagonal as a share of its mean. A few thousand calibration rows estimate H for
# K = 576 channels poorly; with less damping GPTQ fits the calibration prompts rather than the
# model's use, with more it tends to plain rounding (docs/quantization.md has the sweep).
DAMPING = 0.1


def gptq_blocks(
    w_kn: np.ndarray, gram: np.ndarray, bits: int, block: int, damping: float = DAMPING
) -> tuple[np.ndarray, np.ndarray]:
    """w_kn [K, N], gram = X^T X / rows [K, K] -> (packed [N, K/block, blob] uint8, scales [N, K/block])."""
    check_bits(bits)
    K, N = w_kn.shape
    if K % block:
        raise ValueError(f"GPTQ here needs K ({K}) to be a multiple of the block ({block})")
    if gram.shape != (K, K):
        raise ValueError(f"gram has shape {gram.shape}, expected ({K}, {K})")
    w = w_kn.astype(np.float64, copy=True)
    h = gram.astype(np.float64, copy=True)
    diag = np.diag(h).copy()
    dead = diag <= 0  # channels that were always zero: their weights never matter
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h[np.diag_indices(K)] += damping * float(diag[~dead].mean() if (~dead).any() else 1.0)
    # U: upper Cholesky factor of H^-1; row k of U carries how channel k's error spreads forward.
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    importance = np.where(dead, 0.0, diag).reshape(-1, 1, 1, block)
    q = np.zeros((K, N))
    scales = np.zeros((K // block, N))
    for b, lo in enumerate(range(0, K, block)):
        hi = lo + block
        wb = w[lo:hi]  # a view: the updates below land in w
        scales[b] = search_scales(wb.T[None], importance[b], bits)[0]  # from the weights as updated so far
        err = np.zeros((block, N))
        for j in range(block):
            k = lo + j
            q[k] = round_to_grid(wb[j], scales[b], bits)
            err[j] = (wb[j] - q[k] * scales[b]) / u[k, k]
            wb[j + 1 :] -= np.outer(u[k, k + 1 : hi], err[j])
        w[hi:] -= u[lo:hi, hi:].T @ err  # the block's errors onto every later channel at once
    packed = pack(q.T.reshape(N, K // block, block), bits)
    return packed, scales.T.astype(np.float32)
