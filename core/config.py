"""VLMConfig: every field a nanoVLM checkpoint's config.json can carry, with its meaning.

nanoVLM has shipped two checkpoint layouts, and the image placement follows from which one a
config describes:

* v0.1 (`lusxvr/nanoVLM-222M`): no ``vlm_extra_tokens``. Image embeddings are concatenated in
  front of the text ("prefix" placement); one square image per sample.
* v0.2+ (`lusxvr/nanoVLM-450M`, `lusxvr/nanoVLM-230M-8k`): ``vlm_extra_tokens`` holds
  ``<|image|>`` and friends; each ``<|image|>`` placeholder token is replaced in place by one
  image embedding ("replace" placement), with images split into tiles plus a global view.

``to_dict`` writes only the keys the matching nanoVLM version knows, because nanoVLM builds its
config with ``VLMConfig(**json)`` and rejects any key it does not have.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


def default_extra_tokens() -> dict[str, str]:
    """nanoVLM v0.2's extra tokens: image placeholder, global-view marker, 8x8 tile markers."""
    tokens = {"image_token": "<|image|>", "global_image_token": "<|global_image|>"}
    for r in range(1, 9):
        for c in range(1, 9):
            tokens[f"r{r}c{c}"] = f"<row_{r}_col_{c}>"
    return tokens


CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def check_types(cls: type, data: dict[str, Any], source: str) -> None:
    """Refuse a value whose JSON type does not fit its dataclass field, naming the key and value
    (an int field takes no string or bool; a float field takes an int)."""
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key in hints and not _fits(value, hints[key]):
            name = getattr(hints[key], "__name__", str(hints[key]))
            raise ValueError(f"{source}: {key} = {value!r} is not a valid {name}")


def _fits(value: Any, want: Any) -> bool:
    if want is bool:
        return isinstance(value, bool)
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if want is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if want is str:
        return isinstance(value, str)
    options = typing.get_args(want) if typing.get_origin(want) in (typing.Union, types.UnionType) else (want,)
    return any(
        value is None if o is type(None) else isinstance(value, typing.get_origin(o) or o) for o in options
    )


@dataclass
class VLMConfig:
    # --- vision encoder (SigLIP-style ViT) ---
    vit_hidden_dim: int = 768  # width of the ViT residual stream
    vit_inter_dim: int = 3072  # width of the ViT MLP
    vit_patch_size: int = 16  # side of one square patch, in pixels
    vit_img_size: int = 512  # side of the square image (or tile) the ViT sees
    vit_n_heads: int = 12
    vit_dropout: float = 0.0
    vit_n_blocks: int = 12
    vit_ln_eps: float = 1e-6
    vit_cls_flag: bool = False  # prepend a CLS token (SigLIP has none)
    vit_model_type: str = "google/siglip2-base-patch16-512"  # Hub id or dir of the HF vision backbone

    # --- language model (Llama / SmolLM2) ---
    lm_hidden_dim: int = 576
    lm_inter_dim: int = 1536
    lm_rms_eps: float = 1e-5
    lm_re_base: float = 100000  # RoPE base (theta)
    lm_max_position_embeddings: int = 8192  # the decoder's context window
    lm_base_vocab_size: int = 49152  # vocabulary of the HF backbone before the extra image tokens
    extra_token_amount: int = 66  # number of extra tokens appended after the base vocabulary
    lm_vocab_size: int = 49152 + 66  # rows of the embedding / head matrix
    lm_n_heads: int = 9
    lm_n_kv_heads: int = 3  # grouped-query attention: heads sharing one K/V head = n_heads / n_kv_heads
    lm_dropout: float = 0.0
    lm_n_blocks: int = 30
    lm_attn_scaling: float = 1.0  # multiplies RoPE cos/sin (1.0 for Llama-style RoPE)
    lm_max_length: int = 4096  # longest training sample, in tokens
    lm_use_tokens: bool = False  # the LM takes embeddings, not token ids, inside the VLM
    lm_tie_weights: bool = True  # head shares the token-embedding matrix
    lm_model_type: str = "HuggingFaceTB/SmolLM2-135M-Instruct"  # Hub id or dir of the HF LM backbone
    lm_tokenizer: str = "HuggingFaceTB/SmolLM2-135M-Instruct"  # Hub id or dir of the tokenizer
    lm_chat_template: str = CHATML_TEMPLATE  # Jinja chat template (v0.2+)

    # --- modality projector ---
    mp_pixel_shuffle_factor: int = 4  # pixel shuffle folds factor x factor patches into one token
    mp_image_token_length: int = 64  # image tokens per tile = (img/patch)^2 / factor^2

    # --- image splitting (v0.2+) ---
    max_img_size: int = 1024  # longest side an image is resized to before splitting into tiles
    resize_to_max_side_len: bool = False  # always upscale the long side to max_img_size

    # --- VLM ---
    # None means a v0.1 checkpoint: prefix placement, no extra tokens.
    vlm_extra_tokens: dict[str, str] | None = field(default_factory=default_extra_tokens)
    # The id of the image placeholder when the checkpoint's tokenizer defines its image tokens
    # (Idefics3 / SmolVLM: vlm_extra_tokens then names tokens the vocabulary already has); None:
    # nanoVLM's extra tokens, appended after the base vocabulary in the order of vlm_extra_tokens.
    vlm_image_token_id: int | None = None
    # Prompt and image-processing convention: "nanovlm", or "idefics3" (SmolVLM's processor).
    vlm_format: str = "nanovlm"
    # vlm_format="idefics3": the checkpoint's image-processor settings (core/idefics3.py SETTINGS)
    vlm_image_processor: dict[str, Any] | None = None
    # the checkpoint's video sampling (SmolVLM2: {"fps", "max_frames", "size"}; core/video.py); None:
    # core.video.VideoSettings' defaults
    vlm_video_processor: dict[str, Any] | None = None
    vlm_load_backbone_weights: bool = True
    vlm_checkpoint_path: str = "checkpoints"
    hf_repo_name: str = "nanoVLM"

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------- derived values
    @property
    def image_placement(self) -> str:
        """'replace' (v0.2+: <|image|> placeholders) or 'prefix' (v0.1: embeddings in front)."""
        return "replace" if self.vlm_extra_tokens else "prefix"

    @property
    def vit_grid(self) -> int:
        return self.vit_img_size // self.vit_patch_size

    @property
    def image_token_count(self) -> int:
        """Embeddings the projector emits per image tile."""
        return self.vit_grid**2 // self.mp_pixel_shuffle_factor**2

    @property
    def lm_head_dim(self) -> int:
        return self.lm_hidden_dim // self.lm_n_heads

    def extra_token_id(self, key: str) -> int:
        """Id of an extra token: they follow the base vocabulary in the order of vlm_extra_tokens."""
        if not self.vlm_extra_tokens or key not in self.vlm_extra_tokens:
            raise KeyError(f"extra token {key!r} is not in vlm_extra_tokens")
        return self.lm_base_vocab_size + list(self.vlm_extra_tokens).index(key)

    @property
    def image_token_id(self) -> int | None:
        if self.vlm_image_token_id is not None:
            return self.vlm_image_token_id
        return self.extra_token_id("image_token") if self.vlm_extra_tokens else None

    @property
    def image_slot_id(self) -> int:
        """The id the decoder graph reads as "the next image row": <|image|> in replace placement,
        -1 in prefix placement (the runtime puts that many -1 slots in front of the text)."""
        return self.image_token_id if self.image_placement == "replace" else -1

    # ----------------------------------------------------------------- checks
    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"inconsistent VLMConfig: {msg}")

        check_types(type(self), dataclasses.asdict(self), "VLMConfig")
        may_be_zero = ("extra_token_amount", "mp_image_token_length")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                positive = f.type == "int" and f.name not in may_be_zero
                if value < 0 or (value == 0 and positive):
                    bad(f"{f.name}={value} must be {'positive' if positive else '>= 0'}")

        if self.vlm_format not in ("nanovlm", "idefics3"):
            bad(f"vlm_format={self.vlm_format!r} must be 'nanovlm' or 'idefics3'")
        if self.vlm_format == "idefics3":
            from .idefics3 import SETTINGS

            got = set(self.vlm_image_processor or {})
            if got != set(SETTINGS):
                bad(f"vlm_image_processor must have exactly the keys {sorted(SETTINGS)}; got {sorted(got)}")
            if self.vlm_image_processor["tile"] != self.vit_img_size:
                bad(
                    f"vlm_image_processor tile={self.vlm_image_processor['tile']} != vit_img_size={self.vit_img_size}"
                )
        if self.vlm_video_processor is not None:
            v = self.vlm_video_processor
            if set(v) != {"fps", "max_frames", "size"}:
                bad(f"vlm_video_processor must have exactly the keys fps, max_frames, size; got {sorted(v)}")
            elif not (v["fps"] > 0 and v["max_frames"] >= 1 and v["size"] >= 1):
                bad(f"vlm_video_processor {v}: fps, max_frames and size must be positive")
        if self.vit_img_size % self.vit_patch_size:
            bad(f"vit_img_size={self.vit_img_size} is not a multiple of vit_patch_size={self.vit_patch_size}")
        if self.vit_hidden_dim % self.vit_n_heads:
            bad(f"vit_hidden_dim={self.vit_hidden_dim} is not divisible by vit_n_heads={self.vit_n_heads}")
        if self.vit_grid % self.mp_pixel_shuffle_factor:
            bad(
                f"the ViT grid ({self.vit_grid}x{self.vit_grid} patches) is not divisible by "
                f"mp_pixel_shuffle_factor={self.mp_pixel_shuffle_factor}"
            )
        if self.lm_hidden_dim % self.lm_n_heads:
            bad(f"lm_hidden_dim={self.lm_hidden_dim} is not divisible by lm_n_heads={self.lm_n_heads}")
        if self.lm_n_heads % self.lm_n_kv_heads:
            bad(f"lm_n_heads={self.lm_n_heads} is not divisible by lm_n_kv_heads={self.lm_n_kv_heads}")
        if self.lm_head_dim % 2:
            bad(f"the LM head dim ({self.lm_head_dim}) must be even for RoPE")
        if self.vlm_extra_tokens:
            expected = self.image_token_count
            if self.mp_image_token_length != expected:
                bad(
                    f"mp_image_token_length={self.mp_image_token_length} but (vit_img_size/vit_patch_size)^2"
                    f"/mp_pixel_shuffle_factor^2 = ({self.vit_img_size}/{self.vit_patch_size})^2/"
                    f"{self.mp_pixel_shuffle_factor}^2 = {expected}"
                )
            if self.vlm_image_token_id is not None:  # the tokenizer's own tokens: nothing appended
                if not 0 <= self.vlm_image_token_id < self.lm_vocab_size:
                    bad(
                        f"vlm_image_token_id={self.vlm_image_token_id} is outside the vocabulary of {self.lm_vocab_size}"
                    )
            elif len(self.vlm_extra_tokens) > self.extra_token_amount:
                bad(
                    f"vlm_extra_tokens has {len(self.vlm_extra_tokens)} tokens but extra_token_amount="
                    f"{self.extra_token_amount}"
                )
            if self.vlm_image_token_id is None and self.lm_vocab_size < self.lm_base_vocab_size + len(
                self.vlm_extra_tokens
            ):
                bad(
                    f"lm_vocab_size={self.lm_vocab_size} cannot hold lm_base_vocab_size={self.lm_base_vocab_size} "
                    f"+ {len(self.vlm_extra_tokens)} extra tokens"
                )
            if self.max_img_size % self.vit_img_size:
                bad(f"max_img_size={self.max_img_size} is not a multiple of vit_img_size={self.vit_img_size}")

    # ----------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """The config as nanoVLM writes it; v0.1 (prefix) configs omit the v0.2-only keys."""
        d = dataclasses.asdict(self)
        for key, default in (
            ("vlm_image_token_id", None),
            ("vlm_format", "nanovlm"),
            ("vlm_image_processor", None),
            ("vlm_video_processor", None),
        ):
            if d[key] == default:  # keys nanoVLM's own config does not have, written only when used
                d.pop(key)
        if self.image_placement == "prefix":
            for key in V02_ONLY_KEYS:
                d.pop(key, None)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> VLMConfig:
        """Build from any nanoVLM version's config dict.

        Unknown or retired keys are ignored with a warning, missing keys take defaults, and a config
        without ``vlm_extra_tokens`` is a v0.1 (prefix placement) config.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            log.warning("%s: ignoring keys this version does not use: %s", source, ", ".join(unknown))
        kwargs = {k: v for k, v in data.items() if k in known}
        if "vlm_extra_tokens" not in data:
            kwargs["vlm_extra_tokens"] = None
            # A v0.1 config has no vocabulary bookkeeping: its vocabulary is the base one.
            kwargs.setdefault("lm_base_vocab_size", kwargs.get("lm_vocab_size", cls.lm_base_vocab_size))
            kwargs.setdefault("extra_token_amount", 0)
            kwargs.setdefault("mp_image_token_length", 0)
            grid = kwargs.get("vit_img_size", cls.vit_img_size) // kwargs.get(
                "vit_patch_size", cls.vit_patch_size
            )
            kwargs["mp_image_token_length"] = grid**2 // kwargs.get("mp_pixel_shuffle_factor", 4) ** 2
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        except TypeError as e:  # e.g. a list where a dict belongs
            raise ValueError(f"{source}: {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=4)

    @classmethod
    def load(cls, path: str | os.PathLike) -> VLMConfig:
        return cls.from_dict(read_config_json(path), source=str(path))


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """A config file's JSON object, with one-line errors for a missing, malformed or non-object file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"config not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# Keys that only nanoVLM v0.2+ configs carry; a v0.1 nanoVLM rejects them.
V02_ONLY_KEYS = (
    "lm_base_vocab_size",
    "extra_token_amount",
    "lm_chat_template",
    "mp_image_token_length",
    "max_img_size",
    "resize_to_max_side_len",
    "vlm_extra_tokens",
)


def check_context(
    positions: int, max_new_tokens: int, max_context: int, name: str = "max_new_tokens"
) -> None:
    """The one context-length check (PyTorch, runtime and server): refuse a prompt of `positions`
    (image tokens included) that leaves no room for its new tokens."""
    total = positions + max_new_tokens
    if total > max_context:
        raise ValueError(
            f"prompt ({positions} positions incl. image tokens) + {name} ({max_new_tokens}) = {total} "
            f"exceeds the model's context of {max_context}"
        )
