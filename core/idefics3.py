"""Idefics3 / SmolVLM processing, torch-free: image tiles and prompt expansion as transformers'
Idefics3Processor does them (vlm_format="idefics3"), so every side sees its pixels and token ids.

Images: the long edge is resized to `longest_edge` (up or down, the short edge kept even), then
both sides to multiples of the tile size, every resize LANCZOS on 8-bit RGB as PIL does it; an
image larger than one tile is cut into a row-major grid of tiles followed by a global view (the
whole image resized to one tile). Pixels: x / 255 in float64, then float32, then (x - mean) / std.

Prompts: the checkpoint's chat template renders messages whose content is a list of parts
(`{"type": "image"}`, `{"type": "text"}`); each `<image>` it leaves is expanded to
`<fake_token_around_image><row_r_col_c><image>*n ...` per tile and `<global-img>` for the
global view.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

MAX_IMAGE_SIZE = 4096  # transformers' absolute cap on the resized long edge

# The processor settings a config carries (vlm_image_processor), with their meaning:
SETTINGS = {
    "longest_edge": "the long edge every image is first resized to",
    "tile": "side of one tile (the vision encoder's image size)",
    "splitting": "cut images larger than a tile into tiles plus a global view",
    "resample": "PIL resampling filter number (1: LANCZOS)",
    "rescale": "pixel scale factor (1/255)",
    "mean": "per-channel normalisation mean",
    "std": "per-channel normalisation std",
}


def settings_from_processor(pp: dict[str, Any], where: str) -> dict[str, Any]:
    """vlm_image_processor settings from a processor_config.json / preprocessor_config.json
    image-processor dict; the unsupported switches are named."""
    for key in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if pp.get(key) is False:
            raise ValueError(f"{where}: {key}=false is not supported")
    size, tile = pp.get("size") or {}, pp.get("max_image_size") or {}
    if "longest_edge" not in size or "longest_edge" not in tile:
        raise ValueError(f"{where}: size and max_image_size must give longest_edge (got {size}, {tile})")
    return {
        "longest_edge": int(size["longest_edge"]),
        "tile": int(tile["longest_edge"]),
        "splitting": bool(pp.get("do_image_splitting", True)),
        "resample": int(pp.get("resample", 1)),
        "rescale": float(pp.get("rescale_factor", 1 / 255)),
        "mean": [float(x) for x in pp.get("image_mean", [0.5, 0.5, 0.5])],
        "std": [float(x) for x in pp.get("image_std", [0.5, 0.5, 0.5])],
    }


# ----------------------------------------------------------------------------- images
def long_edge(h: int, w: int, long: int) -> tuple[int, int]:
    """(h, w) with the long edge at `long`, the aspect kept and the short edge rounded up to even."""
    aspect = w / h
    if w >= h:
        w, h = long, int(long / aspect)
        h += h % 2
    else:
        h, w = long, int(long * aspect)
        w += w % 2
    return max(h, 1), max(w, 1)


def _long_edge_size(h: int, w: int, long: int) -> tuple[int, int]:
    """The long edge to `long` (aspect kept, the short edge rounded up to even), then under 4096."""
    h, w = long_edge(h, w, long)
    aspect = w / h
    if w >= h and w > MAX_IMAGE_SIZE:
        w, h = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif h > w and h > MAX_IMAGE_SIZE:
        h, w = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(h, 1), max(w, 1)


def _tile_multiple_size(h: int, w: int, tile: int) -> tuple[int, int]:
    """Both sides up to multiples of the tile, from the long side (transformers' rounding)."""
    aspect = w / h
    if w >= h:
        w = math.ceil(w / tile) * tile
        h = math.ceil(int(w / aspect) / tile) * tile
    else:
        h = math.ceil(h / tile) * tile
        w = math.ceil(int(h * aspect) / tile) * tile
    return h, w


def _levels(s: dict[str, Any]) -> np.ndarray:
    """float32 [3, 256]: each channel's normalised value of every 8-bit level, rescaled in float64
    then normalised in float32 (the processor's arithmetic, done once per level, not per pixel)."""
    x = (np.arange(256, dtype=np.float64)[:, None] * s["rescale"]).astype(np.float32)  # [256, 1]
    x = (x - np.asarray(s["mean"], np.float32)) / np.asarray(s["std"], np.float32)  # [256, 3]
    return np.ascontiguousarray(x.T)


def _pixels(views: list[Image.Image], s: dict[str, Any]) -> np.ndarray:
    """8-bit RGB views of one size -> float32 [n, 3, H, W], by table look-up: the same values as
    computing each pixel, written in place."""
    levels = _levels(s)
    w, h = views[0].size
    out = np.empty((len(views), 3, h, w), np.float32)
    for i, view in enumerate(views):
        rgb = np.asarray(view)  # [H, W, 3] uint8
        for c in range(3):
            np.take(levels[c], rgb[..., c], out=out[i, c])
    return out


def process_image(img: Image.Image, s: dict[str, Any]) -> tuple[np.ndarray, tuple[int, int]]:
    """8-bit RGB image -> (pixel_values float32 [n, 3, tile, tile], grid (rows, cols)); an image
    that is not split has grid (1, 1) and one view."""
    tile, resample = s["tile"], Image.Resampling(s["resample"])
    h, w = _long_edge_size(img.height, img.width, s["longest_edge"])
    img = img.resize((w, h), resample)
    if not s["splitting"]:
        return _pixels([img.resize((tile, tile), resample)], s), (1, 1)
    h, w = _tile_multiple_size(h, w, tile)
    img = img.resize((w, h), resample)
    if h <= tile and w <= tile:
        return _pixels([img], s), (1, 1)
    rows, cols = h // tile, w // tile
    views = [
        img.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
        for r in range(rows)
        for c in range(cols)
    ]
    views.append(img.resize((tile, tile), resample))
    return _pixels(views, s), (rows, cols)


# ----------------------------------------------------------------------------- prompts
def image_expansion(grid: tuple[int, int], tokens: dict[str, str], image_tokens: int) -> str:
    """What one `<image>` of the rendered prompt becomes for an image with this tile grid."""
    fake, image, glob = tokens["fake_image_token"], tokens["image_token"], tokens["global_image_token"]
    body = image * image_tokens
    if grid == (1, 1):
        return f"{fake}{glob}{body}{fake}"
    rows, cols = grid
    out = ""
    for r in range(rows):
        for c in range(cols):
            out += f"{fake}{tokens[f'r{r + 1}c{c + 1}']}{body}"
        out += "\n"
    return out + f"\n{fake}{glob}{body}{fake}"


def chat_messages(
    question: str, n_images: int, history: list[tuple[str, str]], system: str | None, media: str = "image"
) -> list[dict]:
    """Messages with content parts, the images (or, with media="video", one video) in the first
    user turn (as the model was shown them)."""
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    messages = [{"role": "system", "content": [text(system)]}] if system else []
    images = [{"type": "video"}] if media == "video" else [{"type": "image"} for _ in range(n_images)]
    for i, (q, a) in enumerate(history):
        messages += [
            {"role": "user", "content": (images if i == 0 else []) + [text(q)]},
            {"role": "assistant", "content": [text(a)]},
        ]
    messages.append({"role": "user", "content": ([] if history else images) + [text(question)]})
    return messages


def expand_images(
    prompt: str, grids: list[tuple[int, int]], tokens: dict[str, str], image_tokens: int
) -> str:
    """Replace each `<image>` of a rendered prompt, in order, by its image's expansion."""
    parts = prompt.split(tokens["image_token"])
    if len(parts) - 1 != len(grids):
        raise ValueError(f"the chat template left {len(parts) - 1} image tokens for {len(grids)} images")
    out = parts[0]
    for grid, rest in zip(grids, parts[1:], strict=True):
        out += image_expansion(grid, tokens, image_tokens) + rest
    return out
