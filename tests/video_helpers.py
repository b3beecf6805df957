"""Video files for tests and benchmarks: a real photo with a moving square and sensor noise, encoded
with PyAV (its wheels carry FFmpeg and libx264)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def camera_frames(
    n: int, size: tuple[int, int] = (96, 64), moving: bool = True, noise: float = 0.0, seed: int = 0
) -> list[np.ndarray]:
    """`n` RGB frames [H, W, 3] uint8 of scikit-image's astronaut at `size` (w, h): a red square
    crosses it when `moving`, and each frame gets Gaussian noise of `noise` levels (a sensor's)."""
    from skimage import data

    base = np.asarray(Image.fromarray(data.astronaut()).resize(size), np.float32)
    rng = np.random.default_rng(seed)
    w, h = size
    side = max(4, h // 6)
    frames = []
    for i in range(n):
        f = base.copy()
        if moving:
            x = (i * max(1, w // 30)) % (w - side)
            f[h // 3 : h // 3 + side, x : x + side] = (255, 0, 0)
        if noise:
            f += rng.normal(0, noise, f.shape)
        frames.append(np.clip(f + 0.5, 0, 255).astype(np.uint8))
    return frames


def write_clip(
    path: str, frames: list[np.ndarray], fps: int = 10, codec: str = "libx264", fmt: str | None = None
) -> str:
    """Encode frames to a video file (yuv420p; `fmt` names the container when the suffix does not)
    and return its path."""
    import av

    h, w = frames[0].shape[:2]
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)
