"""GPTQ: round each input row of a weight in turn and push its rounding error onto the rows not
yet rounded, weighted by how the calibration activations correlate.

Rounding every weight to its nearest grid point (even with a well-chosen scale, blockwise.py)
ignores that a layer's output error is x @ (W - Q): errors on correlated input channels can cancel
or add up. GPTQ (Frantar et al., 2022) minimises ||X W - X Q||^2 one input channel at a time,
with H = X^T X / rows measured on the calibration feeds. Two grids use it:

- `gptq_blocks`: MatMulNBits' blocks of input channels, each block's scales searched
  (blockwise.search_scales) on the weights as updated so far; only which integers are stored
  changes, not the format or the speed (the int4 recipe).
- `gptq_channels`: one symmetric scale per output channel, fixed from the weights before
  rounding (the int8 Q/DQ recipe's per-channel weights).

Layout as in blockwise.py: W is a MatMul's B [K, N]; row k multiplies input channel k.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .blockwise import check_bits, pack, round_to_grid, search_scales

# Added to H's diagonal as a share of its mean. A few thousand calibration rows estimate H for
# K = 576 channels poorly; with less damping GPTQ fits the calibration prompts rather than the
# model's use, with more it tends to plain rounding (docs/quantization.md has the sweep).
DAMPING = 0.1
CHANNEL_GROUP = 128  # rows rounded between two updates of the rest (the result does not depend on it)


def gptq_blocks(
    w_kn: np.ndarray, gram: np.ndarray, bits: int, block: int, damping: float = DAMPING
) -> tuple[np.ndarray, np.ndarray]:
    """w_kn [K, N], gram = X^T X / rows [K, K] -> (packed [N, K/block, blob] uint8, scales [N, K/block])."""
    check_bits(bits)
    K, N = w_kn.shape
    if K % block:
        raise ValueError(f"GPTQ here needs K ({K}) to be a multiple of the block ({block})")
    scales = np.zeros((K // block, N))

    def block_scale(lo: int, wb: np.ndarray, importance: np.ndarray) -> np.ndarray:
        scales[lo // block] = search_scales(wb.T[None], importance.reshape(1, 1, -1), bits)[0]
        return scales[lo // block]

    q = _gptq(w_kn, gram, block, damping, block_scale, bits)
    packed = pack(q.T.reshape(N, K // block, block), bits)
    return packed, scales.T.astype(np.float32)


def gptq_channels(
    w_kn: np.ndarray, gram: np.ndarray, qmax: int = 127, damping: float = DAMPING
) -> tuple[np.ndarray, np.ndarray]:
    """w_kn [K, N], gram [K, K] -> (q [K, N] int8 in [-qmax, qmax], scales [N] float32): symmetric
    per-output-channel integers, w ~= q * scale, scale = max|w[:, n]| / qmax."""
    if gram.shape != (w_kn.shape[0],) * 2:
        raise ValueError(f"gram has shape {gram.shape}, expected ({w_kn.shape[0]}, {w_kn.shape[0]})")
    scale = np.abs(w_kn).max(0).astype(np.float64) / qmax
    scale[scale == 0] = 1.0
    q = _gptq(w_kn, gram, CHANNEL_GROUP, damping, lambda lo, wb, importance: scale, None, qmax)
    return q.astype(np.int8), scale.astype(np.float32)


def _gptq(
    w_kn: np.ndarray,
    gram: np.ndarray,
    block: int,
    damping: float,
    scale_of: Callable[[int, np.ndarray, np.ndarray], np.ndarray],
    bits: int | None,
    qmax: int | None = None,
) -> np.ndarray:
    """The rounding loop: rows in groups of `block`; scale_of(first row, the group's rows as updated
    so far, their importance) gives the group's scales [N]. Returns the integers q [K, N] (floats)."""
    K, N = w_kn.shape
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
    importance = np.where(dead, 0.0, diag)
    q = np.zeros((K, N))
    for lo in range(0, K, block):
        hi = min(lo + block, K)
        wb = w[lo:hi]  # a view: the updates below land in w
        scale = scale_of(lo, wb, importance[lo:hi])
        err = np.zeros((hi - lo, N))
        for j in range(hi - lo):
            k = lo + j
            q[k] = round_to_grid(wb[j], scale, bits) if bits else np.clip(np.rint(wb[j] / scale), -qmax, qmax)
            err[j] = (wb[j] - q[k] * scale) / u[k, k]
            wb[j + 1 :] -= np.outer(u[k, k + 1 : hi], err[j])
        w[hi:] -= u[lo:hi, hi:].T @ err  # the group's errors onto every later channel at once
    return q
