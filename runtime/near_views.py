"""Views that differ from the last frame's by less than a threshold reuse its views' keys.

Exact reuse needs nothing here: a view's key hashes its processed pixels, so an unchanged view finds
its embeddings in the image cache and its KV in the prefix cache. A camera's sensor noise changes
every pixel a little, though, so no view of a still scene is ever exactly the same. With a
threshold T, a view whose mean absolute difference from the same view of the scope's last frame is
below T (in 8-bit levels of the processed view) takes that view's key instead of its own: the caches
then serve it as if it were unchanged. The reference a view is compared with is the one its key
stands for, never a snapped copy, so error never builds up past T over a slow drift.

Held per cache scope (a tenant and cache_salt), for the few most recent scopes only: one frame of
SmolVLM's 17 views at 512 px is ~53 MB of float32 pixels.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

SCOPES = 4  # scopes whose last frame is kept


def pixel_level(cfg: object) -> float:
    """One 8-bit level in the processed view's units (SmolVLM: rescale / std; nanoVLM: 1 / 255)."""
    s = getattr(cfg, "vlm_image_processor", None)
    if s:
        return float(s["rescale"]) / float(np.mean(s["std"]))
    return 1.0 / 255.0


class NearViews:
    def __init__(self, threshold: float, level: float):
        self.threshold, self.level = threshold, level
        self.last: OrderedDict[bytes, tuple[list[str], list[np.ndarray]]] = OrderedDict()

    def snap(self, scope: bytes, keys: list[str], pixels: np.ndarray, cached: object) -> list[str]:
        """`keys` of views [N, 3, S, S] with each near view's key replaced by the last frame's; a view
        is near when its key is not `cached` (a container of keys) and its mean absolute difference
        from the reference is under the threshold. Remembers this frame as the scope's last."""
        prev_keys, prev_pixels = self.last.get(scope, ([], []))
        out, refs = list(keys), [pixels[i] for i in range(len(keys))]
        for i, key in enumerate(keys):
            if i >= len(prev_keys) or key == prev_keys[i] or key in cached:
                continue
            ref = prev_pixels[i]
            if ref.shape == pixels[i].shape and np.abs(pixels[i] - ref).mean() / self.level < self.threshold:
                out[i], refs[i] = prev_keys[i], ref
        self.last[scope] = (out, refs)
        self.last.move_to_end(scope)
        while len(self.last) > SCOPES:
            self.last.popitem(last=False)
        return out
