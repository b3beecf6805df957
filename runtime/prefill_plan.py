"""How the engine lays out prefills: which prompts prefill together, and the one frame they share."""

from __future__ import annotations

import numpy as np

from core.sequence import Frame, Prompt

# A prefill group holds at most this many positions, padding included, and pads at most a quarter
# of them: past ~150 positions a prefill is compute-bound on a CPU (0.5 ms per position on the
# 222M shape, 2 cores), so larger groups only raise the peak memory, and padding is pure waste.
PREFILL_POSITIONS = 512
PREFILL_PADDING = 0.25
SCRATCH_POSITIONS = 2 * PREFILL_POSITIONS  # rows x length of the kept prefill cache, at most


def prefill_groups(lengths: list[int], budget: int = PREFILL_POSITIONS) -> list[list[int]]:
    """Indices of `lengths` in groups to prefill together: sorted by length, a group grows while
    its padded size (rows x longest) stays within `budget` and its padding within PREFILL_PADDING."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        g = groups[-1] if groups else None
        if g is not None:
            padded = (len(g) + 1) * lengths[i]  # sorted: i is the longest so far
            real = sum(lengths[j] for j in g) + lengths[i]
            if padded <= budget and padded - real <= PREFILL_PADDING * padded:
                g.append(i)
                continue
        groups.append([i])
    return groups


def merge(prompts: list[Prompt], keep: list[int], pad_id: int) -> Frame:
    """Prompts, each after its first `keep[i]` positions (reused KV), -> one prefill Frame over a
    past of P = max(keep) columns: row i's kept positions end at column P, and its new positions
    [keep[i], n) end the frame, left-padded when they are fewer than the longest (only where
    keep[i] is 0, so no row has a gap between its past and its new positions)."""
    new = [len(p) - k for p, k in zip(prompts, keep, strict=True)]
    B, P, S = len(prompts), max(keep), max(new)
    ids = np.full((B, S), pad_id, np.int64)
    pos = np.zeros((B, S), np.int64)
    mask = np.zeros((B, P + S), np.int64)
    rows = []
    for i, (p, k, m) in enumerate(zip(prompts, keep, new, strict=True)):
        piece = p.chunk(k, len(p))  # [1, m]: its image rows too
        ids[i, S - m :], pos[i, S - m :] = piece.input_ids[0], piece.position_ids[0]
        mask[i, P - k : P] = 1
        mask[i, P + S - m :] = 1
        rows.append(piece.image_rows)
    return Frame(ids, np.concatenate(rows), mask, pos)
