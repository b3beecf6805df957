"""Image preprocessing, tokenizer and prompt formatting: written once, without torch.

Both sides use this module: the PyTorch reference (training, generation, export) and the
torch-free runtime, so the pixels and token ids the exported graphs see are the ones the
reference sees. It needs only numpy, pillow, tokenizers and jinja2.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import idefics3
from .config import VLMConfig
from .video import VIDEO_CHAT_TEMPLATE, VIDEO_TOKEN, Video, VideoSettings, process_frame, video_prompt

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- images

# Decompression-bomb guard: a 16384 x 16384 image is already far beyond any tile budget.
MAX_IMAGE_PIXELS = 16384 * 16384
# The resolution budget's ceiling, in tiles along an image's long edge: nanoVLM's tile markers go
# to 8x8, and Idefics3's long edge stops at 4096 px = 8 tiles of 512.
MAX_IMAGE_TILES = 8


def load_image(
    image: str | os.PathLike | Image.Image | Any, max_pixels: int = MAX_IMAGE_PIXELS
) -> Image.Image:
    """Open an image as 8-bit RGB. Grayscale, palette, RGBA and 16-bit images are converted."""
    if isinstance(image, Image.Image):
        img, name = image, "<PIL image>"
    elif hasattr(image, "read"):  # a file object, e.g. image bytes from a dataset
        name = "<image bytes>"
        try:
            img = Image.open(image)
        except Image.DecompressionBombError as e:
            raise ValueError(f"{name}: refused as a decompression bomb ({e})") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{name}: not a readable image ({e})") from None
    else:
        name = os.fspath(image)
        try:
            img = Image.open(name)
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {name}") from None
        except Image.DecompressionBombError as e:  # Pillow's own limit, checked at open
            raise ValueError(f"{name}: refused as a decompression bomb ({e})") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{name}: not a readable image ({e})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ValueError(f"{name}: image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels}")
    if w == 0 or h == 0:
        raise ValueError(f"{name}: image has zero size {w}x{h}")
    try:
        img.load()
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{name}: cannot decode image ({e})") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (or 32-bit integer) grayscale: scale to 8 bits instead of letting PIL clip.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(
            np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8), "L"
        )
    return img.convert("RGB") if img.mode != "RGB" else img


def _to_chw(img: Image.Image) -> np.ndarray:
    """8-bit RGB PIL image -> float32 [3, H, W] in nanoVLM's [0, 1] range (what ToTensor gives)."""
    return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)


def _resize_float(chw: np.ndarray, size: int) -> np.ndarray:
    """Antialiased bilinear resize of a float [3, H, W] array to [3, size, size], channel by channel."""
    out = [np.asarray(Image.fromarray(c, mode="F").resize((size, size), Image.BILINEAR)) for c in chw]
    return np.stack(out).astype(np.float32)


@dataclass(frozen=True)
class ImageProcessor:
    """nanoVLM's image pipeline.

    prefix placement (v0.1): bicubic resize to one square `tile_size` image.
    replace placement (v0.2+): bicubic resize so both sides are multiples of `tile_size` with the
    long side at most `max_size`, split into a row-major grid of tiles and, when there is more than
    one tile, a global view of the whole image placed first.
    """

    tile_size: int
    max_size: int
    placement: str = "replace"
    resize_to_max: bool = False

    @classmethod
    def from_config(cls, cfg: VLMConfig, tiles: int | None = None) -> ImageProcessor | Idefics3ImageProcessor:
        """The image pipeline of the config's format (nanoVLM's, or Idefics3's), at a resolution
        budget of `tiles` along the long edge (None: the config's own, image_tiles(cfg)).

        nanoVLM: the long side up to tiles x tile size. Idefics3 / SmolVLM: `longest_edge` =
        tiles x tile size, and image splitting on above one tile (the processor's own knobs)."""
        if tiles is not None:
            check_image_tiles(cfg, tiles)
        if cfg.vlm_format == "idefics3":
            s = cfg.vlm_image_processor
            if tiles is not None:
                s = dict(s, longest_edge=tiles * s["tile"], splitting=tiles > 1)
            return Idefics3ImageProcessor(s)
        size = cfg.max_img_size if tiles is None else tiles * cfg.vit_img_size
        return cls(cfg.vit_img_size, size, cfg.image_placement, cfg.resize_to_max_side_len)

    def target_size(self, h: int, w: int) -> tuple[int, int]:
        """(h, w) after the dynamic resize: multiples of tile_size, aspect ratio kept, long side <= max_size."""
        p, m = self.tile_size, self.max_size
        long, short = (w, h) if w >= h else (h, w)
        target_long = m if self.resize_to_max else min(m, math.ceil(long / p) * p)
        target_short = max(math.ceil(short * target_long / long / p) * p, p)
        return (target_short, target_long) if w >= h else (target_long, target_short)

    def __call__(self, image: str | os.PathLike | Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        """-> (pixel_values float32 [n_images, 3, tile, tile], grid (n_h, n_w))."""
        img = load_image(image)
        p = self.tile_size
        if self.placement == "prefix":
            return _to_chw(img.resize((p, p), Image.BICUBIC))[None], (1, 1)
        h, w = self.target_size(img.height, img.width)
        chw = _to_chw(img.resize((w, h), Image.BICUBIC))
        n_h, n_w = h // p, w // p
        # [3, n_h*p, n_w*p] -> [n_h*n_w, 3, p, p], row-major over the grid
        tiles = chw.reshape(3, n_h, p, n_w, p).transpose(1, 3, 0, 2, 4).reshape(n_h * n_w, 3, p, p)
        if (n_h, n_w) != (1, 1):
            tiles = np.concatenate([_resize_float(chw, p)[None], tiles], axis=0)
        return np.ascontiguousarray(tiles), (n_h, n_w)


def image_tiles(cfg: VLMConfig) -> int:
    """The config's own resolution budget: tiles along an image's long edge (1: one view)."""
    if cfg.vlm_format == "idefics3":
        s = cfg.vlm_image_processor
        return max(1, math.ceil(s["longest_edge"] / s["tile"])) if s["splitting"] else 1
    if cfg.image_placement == "prefix":
        return 1
    return cfg.max_img_size // cfg.vit_img_size


def check_image_tiles(cfg: VLMConfig, tiles: Any) -> int:
    """`tiles` as a resolution budget this model takes, or a ValueError naming it."""
    if isinstance(tiles, bool) or not isinstance(tiles, int) or not 1 <= tiles <= MAX_IMAGE_TILES:
        raise ValueError(f"image_tiles={tiles!r}: expected an integer from 1 to {MAX_IMAGE_TILES}")
    if cfg.image_placement == "prefix" and cfg.vlm_format != "idefics3" and tiles != 1:
        raise ValueError(f"image_tiles={tiles}: this model (prefix placement) sees every image as one view")
    return tiles


@dataclass(frozen=True)
class Idefics3ImageProcessor:
    """Idefics3 / SmolVLM's image pipeline (core/idefics3.py): tiles row-major, global view last."""

    settings: dict[str, Any]

    def __call__(self, image: str | os.PathLike | Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        return idefics3.process_image(load_image(image), self.settings)


# ----------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """A `tokenizers.Tokenizer` with nanoVLM's extra image tokens and the special ids generation needs.

    Extra tokens get the ids right after the base vocabulary, in the order of `vlm_extra_tokens`;
    this is checked, since the model's embedding rows are laid out that way.
    """

    def __init__(
        self,
        tokenizer: Any,
        eos_token: str,
        extra_tokens: dict[str, str] | None,
        base_vocab: int,
        appended: bool = True,
    ):
        """`appended`: the extra tokens follow the base vocabulary (nanoVLM); otherwise they are the
        tokenizer's own (Idefics3 / SmolVLM), and each must already be in it."""
        from tokenizers import AddedToken

        self.tok = tokenizer
        self.extra_tokens = dict(extra_tokens or {})
        missing = [t for t in self.extra_tokens.values() if not appended and tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"the tokenizer lacks the model's image tokens {missing[:4]}")
        if self.extra_tokens and appended:
            self.tok.add_special_tokens(
                [AddedToken(t, special=True, normalized=False) for t in self.extra_tokens.values()]
            )
            for i, (key, text) in enumerate(self.extra_tokens.items()):
                got = self.tok.token_to_id(text)
                if got != base_vocab + i:
                    raise ValueError(
                        f"tokenizer maps extra token {key}={text!r} to id {got}, but the model expects "
                        f"{base_vocab + i} (lm_base_vocab_size={base_vocab} + its position {i})"
                    )
        self.eos_token = eos_token
        self.eos_token_id = self.tok.token_to_id(eos_token)
        if self.eos_token_id is None:
            raise ValueError(f"tokenizer has no id for its eos token {eos_token!r}")
        self.pad_token_id = self.eos_token_id  # nanoVLM pads with eos

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, cfg: VLMConfig) -> Tokenizer:
        """Load tokenizer.json (+ tokenizer_config.json for the eos token) from a directory."""
        from tokenizers import Tokenizer as HFTokenizer

        path = os.path.join(directory, "tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer.json not found in {directory}")
        try:
            tok = HFTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{path}: cannot parse tokenizer ({e})") from None
        eos = read_eos_token(directory, tok)
        return cls(
            tok, eos, cfg.vlm_extra_tokens, cfg.lm_base_vocab_size, appended=cfg.vlm_image_token_id is None
        )

    @classmethod
    def from_pretrained(cls, name_or_dir: str, cfg: VLMConfig, revision: str | None = None) -> Tokenizer:
        """From a local directory or a Hub repo (tokenizer.json and tokenizer_config.json)."""
        if os.path.isdir(name_or_dir):
            return cls.from_dir(name_or_dir, cfg)
        from .hub import download

        fix = "point lm_tokenizer (config.json) at a local folder holding tokenizer.json"
        path = download(name_or_dir, "tokenizer.json", revision, fix)
        try:
            download(name_or_dir, "tokenizer_config.json", revision, fix)
        except Exception:  # optional file
            pass
        return cls.from_dir(os.path.dirname(path), cfg)

    @classmethod
    def of_checkpoint(cls, directory: str, cfg: VLMConfig) -> Tokenizer | None:
        """A checkpoint's own tokenizer files, else cfg.lm_tokenizer (a directory or Hub id), else
        None (the model still works on token ids), with a warning that says why."""
        if os.path.exists(os.path.join(directory, "tokenizer.json")):
            return cls.from_dir(directory, cfg)
        try:
            return cls.from_pretrained(cfg.lm_tokenizer, cfg)
        except Exception as e:  # offline (core/hub.py names the fix), or no tokenizer.json on the Hub
            log.warning(
                "no tokenizer for %s (%s: %s); generate() needs explicit eos_token_id",
                directory,
                type(e).__name__,
                e,
            )
            return None

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json and a tokenizer_config.json that transformers can read too."""
        self.tok.save(os.path.join(directory, "tokenizer.json"))
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "eos_token": self.eos_token,
                    "pad_token": self.eos_token,
                    "extra_special_tokens": self.extra_tokens,
                },
                f,
                indent=2,
            )

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, key: str) -> int:
        return self.tok.token_to_id(self.extra_tokens[key])


def read_eos_token(directory: str | os.PathLike, tok: Any) -> str:
    """The eos token named by tokenizer_config.json, else the first of the usual suspects present."""
    cfg_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            eos = json.load(f).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if eos:
            return eos
    for candidate in ("<|im_end|>", "<|endoftext|>", "</s>", "<eos>"):
        if tok.token_to_id(candidate) is not None:
            return candidate
    raise ValueError(f"{directory}: cannot tell the eos token (no tokenizer_config.json eos_token)")


# ----------------------------------------------------------------------------- prompts


def image_string(grids: list[tuple[int, int]], cfg: VLMConfig) -> str:
    """nanoVLM's image-token string for images split into the given grids (replace placement).

    Per image: a global-view marker and its tokens, then for each tile its <row_i_col_j> marker and
    tokens; a 1x1 grid has only the global part. Several images are numbered `<image: i>`.
    """
    extra, n = cfg.vlm_extra_tokens or {}, cfg.mp_image_token_length
    if not extra:
        raise ValueError("image_string: this config uses prefix placement and has no image tokens")
    tokens = extra["image_token"] * n
    out = []
    for idx, (n_h, n_w) in enumerate(grids):
        if n_h > 8 or n_w > 8:
            raise ValueError(f"image grid {n_h}x{n_w} exceeds the 8x8 tile markers; lower max_img_size")
        if len(grids) > 1:
            out.append(f"<image: {idx}>")
        out.append(extra["global_image_token"] + tokens)
        if (n_h, n_w) == (1, 1):
            continue
        for i in range(n_h):
            for j in range(n_w):
                out.append(extra[f"r{i + 1}c{j + 1}"] + tokens)
    return "".join(out)


def images_per_grid(grid: tuple[int, int]) -> int:
    """Tensors the image processor emits for one image: its tiles plus the global view if split."""
    return 1 if grid == (1, 1) else grid[0] * grid[1] + 1


@functools.lru_cache(maxsize=8)
def _compile_template(template: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)


def render_chat(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """Render a Jinja chat template in a sandbox (templates come from checkpoints: no code runs)."""
    return _compile_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


def format_prompt(
    cfg: VLMConfig,
    question: str,
    grids: list[tuple[int, int]],
    history: list[tuple[str, str]] | None = None,
    system: str | None = None,
    video: Video | None = None,
) -> str:
    """The text the model sees for a question about images with the given tile grids.

    replace placement: chat template, the image string in front of the first user turn.
    prefix placement: nanoVLM v0.1's "Question: ... Answer:" (images go in front as embeddings).
    `history` holds earlier (question, answer) turns of a chat about the same images; `system` is
    a system message (chat-template models only). A `video` (SmolVLM) stands where the images would,
    as its timestamped frames (core/video.py); other models see its frames as images.
    """
    if not question or not question.strip():
        raise ValueError("empty prompt")
    history = history or []
    if video is not None and cfg.vlm_format == "idefics3":
        messages = idefics3.chat_messages(question, 0, history, system, media="video")
        prompt = render_chat(VIDEO_CHAT_TEMPLATE, messages)
        if prompt.count(VIDEO_TOKEN) != 1:
            raise ValueError("the video chat template must leave exactly one <video>")
        text = video_prompt(video, cfg.vlm_extra_tokens, cfg.mp_image_token_length)
        return prompt.replace(VIDEO_TOKEN, text)
    if cfg.vlm_format == "idefics3":
        prompt = render_chat(
            cfg.lm_chat_template, idefics3.chat_messages(question, len(grids), history, system)
        )
        return idefics3.expand_images(prompt, grids, cfg.vlm_extra_tokens, cfg.mp_image_token_length)
    if cfg.image_placement == "prefix":
        if system:
            raise ValueError("this model (prefix placement, no chat template) takes no system message")
        turns = "".join(f"Question: {q} Answer: {a} " for q, a in history)
        return f"{turns}Question: {question} Answer:"
    img = image_string(grids, cfg) if grids else ""
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    for i, (q, a) in enumerate(history):
        messages += [
            {"role": "user", "content": (img if i == 0 else "") + q},
            {"role": "assistant", "content": a},
        ]
    messages.append({"role": "user", "content": (img if not history else "") + question})
    return render_chat(cfg.lm_chat_template, messages)


def encode_prompt(tokenizer: Tokenizer, cfg: VLMConfig, prompt: str) -> list[int]:
    """Token ids of a formatted prompt; v0.1 checkpoints used the tokenizer's own special tokens."""
    # v0.1 checkpoints and Idefics3's processor let the tokenizer add its special tokens
    return tokenizer.encode(
        prompt, add_special_tokens=cfg.image_placement == "prefix" or cfg.vlm_format == "idefics3"
    )


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token rows -> (input_ids int64 [B, T], attention_mask int64 [B, T])."""
    if not rows:
        raise ValueError("left_pad: no rows")
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = r
            mask[i, width - len(r) :] = 1
    return ids, mask


@dataclass
class Batch:
    """Model inputs for a batch of (images, prompt) samples, as numpy arrays."""

    input_ids: np.ndarray  # int64 [B, T], left-padded
    attention_mask: np.ndarray  # int64 [B, T]
    pixel_values: np.ndarray  # float32 [N_tiles, 3, S, S], all samples' tiles in order
    prompts: list[str]
    image_tiles: list[int] = field(default_factory=list)  # tiles of each image, in order
    view_keys: list[str] = field(default_factory=list)  # image_key of each view [1, 3, S, S], in order


def image_key(pixels: np.ndarray) -> str:
    """A hash of preprocessed views [N, 3, S, S]: what the vision encoder sees, so it covers the
    decoded pixels and every processor setting (size, tiling, normalisation). SHA-256: the CPUs
    this runs on hash it in hardware (x86 SHA-NI, ARMv8 crypto), faster than blake2b on a frame's MBs."""
    h = hashlib.sha256()
    h.update(repr((pixels.shape, pixels.dtype.str)).encode())
    h.update(np.ascontiguousarray(pixels).data)
    return h.hexdigest()[:32]


def view_keys(pixels: np.ndarray) -> list[str]:
    """image_key of each view of [N, 3, S, S]: views are what caches reuse one by one (a frame
    whose scene moved in one tile keeps the others)."""
    return [image_key(pixels[i : i + 1]) for i in range(pixels.shape[0])]


def media_views(
    cfg: VLMConfig, image_processor: Any, items: list[Any]
) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """(views [n, 3, S, S], grid) of each image, in order; a video gives one entry per frame, its one
    view sized as SmolVLM2's video processor sizes it (other models: as an image at one tile)."""
    out = []
    for item in items:
        if not isinstance(item, Video):
            out.append(image_processor(item))
        elif cfg.vlm_format == "idefics3":
            s = VideoSettings.from_config(cfg)
            out += [(process_frame(f, s, cfg.vlm_image_processor)[None], (1, 1)) for f in item.frames]
        else:
            one = ImageProcessor.from_config(cfg, 1)
            out += [one(f) for f in item.frames]
    return out


def prepare_batch(
    cfg: VLMConfig,
    tokenizer: Tokenizer,
    image_processor: ImageProcessor,
    images: list[list[Any]],
    prompts: list[str],
    histories: list[list[tuple[str, str]]] | None = None,
    system: str | None = None,
) -> Batch:
    """Preprocess images, format and tokenize prompts, left-pad: the one input path for every backend."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} image lists for {len(prompts)} prompts")
    histories = histories or [[] for _ in prompts]
    rows, tiles, texts, views = [], [], [], []
    for sample_images, prompt, history in zip(images, prompts, histories, strict=True):
        videos = [v for v in sample_images if isinstance(v, Video)]
        if videos and len(sample_images) != 1:
            raise ValueError("a video goes alone: no other video or image beside it in one request")
        video = videos[0] if videos else None
        count = len(video.frames) if video else len(sample_images)
        if cfg.image_placement == "prefix" and count != 1:
            raise ValueError(f"this model (prefix placement) takes exactly one image per prompt, got {count}")
        grids = []
        for pixels, grid in media_views(cfg, image_processor, sample_images):
            tiles.append(pixels)
            views.append(view_keys(pixels))
            grids.append(grid)
        text = format_prompt(cfg, prompt, grids, history, system, video)
        texts.append(text)
        rows.append(encode_prompt(tokenizer, cfg, text))
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    size = cfg.vit_img_size
    pixel_values = np.concatenate(tiles) if tiles else np.zeros((0, 3, size, size), np.float32)
    return Batch(ids, mask, pixel_values, texts, [t.shape[0] for t in tiles], sum(views, []))
