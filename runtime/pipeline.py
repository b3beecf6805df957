"""VLMPipeline: images + prompt -> answer, from a bundle, without torch.

Reads top to bottom like llama2.c's run.c: the bundle (model), the tokenizer and prompt format
(shared with the PyTorch side), the sampler, then the generation loop — vision encoder once per
image, prefill, decode with the KV cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.bundle import Bundle, load_bundle
from core.config import check_context
from core.processors import Batch, ImageProcessor, Tokenizer, prepare_batch
from core.sampling import Sampler, SamplingConfig
from core.sequence import Frame, next_frame, prompt_frame
from core.video import Video, VideoSettings, read_video

from .backend import Backend, Cache
from .constraint import Constraint, Grammars

log = logging.getLogger(__name__)


@dataclass
class Timings:
    image_encode_s: float = 0.0
    prefill_s: float = 0.0  # the prompt pass; time to first token = image_encode_s + prefill_s
    decode_s: float = 0.0
    prompt_tokens: int = 0
    new_tokens: int = 0

    @property
    def time_to_first_token_s(self) -> float:
        return self.image_encode_s + self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float:
        # the first new token comes from the prefill; each later one from one decode step
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "image_encode_s": self.image_encode_s,
            "prefill_s": self.prefill_s,
            "time_to_first_token_s": self.time_to_first_token_s,
            "decode_s": self.decode_s,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "decode_tokens_per_s": self.decode_tokens_per_s,
        }


@dataclass
class GenerationRequest:
    max_new_tokens: int = 64
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # always produce max_new_tokens (benchmarks)
    constraint: Constraint | None = None  # the answer must match it (runtime/constraint.py)
    logprobs: int | None = None  # None: off; n: each token's logprob and the n most likely (engine)
    cache_scope: bytes = b""  # the engine shares cached prompt KV and images only within one scope

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be at least 1")


class VLMPipeline:
    # ------------------------------------------------------------------ model
    def __init__(self, bundle: Bundle, backend: Backend):
        self.bundle, self.backend = bundle, backend
        self.cfg = bundle.config
        self.tokenizer = Tokenizer.from_dir(bundle.path, self.cfg)
        # the resolution budget (tiles along an image's long edge): the bundle's, or set it here
        self.image_tiles = bundle.image_tiles
        self.last_timings = Timings()
        # how the last generate/stream/chat answer ended: "stop" (EOS, a stop string, a finished
        # constraint) or "length" (max_new_tokens ran out: the answer may be cut, JSON unfinished)
        self.last_finish_reason: str | None = None
        self._cache: Any = None
        self._grammars: Grammars | None = None

    @classmethod
    def from_bundle(
        cls,
        path: str,
        provider: str = "cpu",
        verify: bool = True,
        backend: str = "ort",
        **backend_options: Any,
    ) -> VLMPipeline:
        """Load a bundle (checksums verified) on ONNX Runtime (provider cpu, cuda or tensorrt) or,
        with backend="trt", on the TensorRT engines that `nanovlm-export trt` added to it."""
        bundle = load_bundle(path, verify=verify)
        if backend == "trt":
            from trt.backend import TrtBackend

            return cls(bundle, TrtBackend(bundle, **backend_options))
        if backend != "ort":
            raise ValueError(f"unknown backend {backend!r}; expected 'ort' or 'trt'")
        from .onnx_backend import OrtBackend

        return cls(bundle, OrtBackend(bundle, provider, **backend_options))

    # ------------------------------------------------------------------ the generation loop
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """[N_tiles, 3, S, S] -> [N_tiles, tokens, hidden]; no tiles -> [0, 0, hidden]."""
        if pixel_values.shape[0]:
            return self.backend.encode_images(pixel_values)
        return np.zeros((0, 0, self.cfg.lm_hidden_dim), np.float32)

    def generate_ids(self, batch: Batch, request: GenerationRequest) -> Iterator[np.ndarray]:
        """Yield the next token of every row, [B] int64, until all rows hit EOS or the limit."""
        t = Timings()
        t0 = time.perf_counter()
        frame = prompt_frame(self.cfg, batch, self.encode_images(batch.pixel_values))  # [B, S]
        t.image_encode_s = time.perf_counter() - t0
        B, S = frame.shape
        check_context(S, request.max_new_tokens, self.backend.max_context)
        cache = self._cache_for(B, S + request.max_new_tokens)
        cache.start(B)
        sampler = Sampler(request.sampling)
        matchers = [self.grammars.matcher(request.constraint) for _ in range(B)] if request.constraint else []
        eos = -1 if request.ignore_eos else self.tokenizer.eos_token_id
        seen = [list(r[m == 1]) for r, m in zip(batch.input_ids, batch.attention_mask, strict=True)]
        finished = np.zeros(B, dtype=bool)
        t1 = time.perf_counter()
        logits = self.step(frame, cache)  # prefill
        t.prefill_s, t.prompt_tokens = time.perf_counter() - t1, S
        t2 = time.perf_counter()
        try:
            for n in range(request.max_new_tokens):
                if matchers:  # only what each row's grammar allows next
                    self.grammars.mask_logits(
                        logits, [None if f else m for m, f in zip(matchers, finished, strict=True)]
                    )
                token = sampler(logits, seen if request.sampling.repetition_penalty != 1.0 else None)
                token = np.where(finished, eos, token)
                for r, m in enumerate(matchers):
                    if not finished[r] and not m.done:
                        m.consume(int(token[r]))
                finished |= token == eos
                for r in range(B):
                    seen[r].append(int(token[r]))
                t.new_tokens = n + 1
                yield token
                if finished.all() or n == request.max_new_tokens - 1:
                    break
                frame = next_frame(frame, token)
                logits = self.step(frame, cache)  # decode one token per row
        finally:
            t.decode_s = time.perf_counter() - t2
            self.last_timings = t

    @property
    def grammars(self) -> Grammars:
        """Constraints in this bundle's tokenizer (built on first use, ~0.3 s at a 49k vocabulary)."""
        if self._grammars is None:
            tok = self.tokenizer
            self._grammars = Grammars(tok.tok.to_str(), tok.eos_token_id, self.cfg.lm_vocab_size)
        return self._grammars

    def _cache_for(self, rows: int, length: int) -> Cache:
        """The pipeline's own cache, kept between generations while it fits: a new buffer costs page
        faults on first use, as much as a short prefill."""
        c = self._cache
        if c is None or c.capacity[0] != rows or c.capacity[1] < length:
            self._cache = c = self.backend.new_cache(rows, length)
        return c

    def step(self, frame: Frame, cache: Cache) -> np.ndarray:
        """One decoder call on `frame` -> logits [B, V]."""
        return self.backend.step(frame, cache)

    # ------------------------------------------------------------------ user calls
    def prepare(
        self,
        images: list[list[Any]],
        prompts: list[str],
        histories: list[list[tuple[str, str]]] | None = None,
        system: str | None = None,
        image_tiles: int | None = None,
    ) -> Batch:
        """Model inputs for (images, prompt) pairs: the one input path (core/processors.py), at a
        resolution budget of `image_tiles` along each image's long edge (None: self.image_tiles)."""
        processor = ImageProcessor.from_config(self.cfg, image_tiles or self.image_tiles)
        return prepare_batch(self.cfg, self.tokenizer, processor, images, prompts, histories, system)

    def generate(
        self,
        images: Any = None,
        prompt: str = "",
        max_new_tokens: int = 64,
        stop: list[str] | None = None,
        sampling: SamplingConfig | None = None,
        video: Any = None,
        **constraint: Any,
    ) -> str:
        """Answer `prompt` about `images` (one image or a list: paths, PIL images or file objects)
        or a `video` (a file path, a core.video.Video, or a list of frames); greedy unless `sampling`
        says otherwise. One of json_schema= (a dict or JSON text), json_object=True, regex= or lark=
        makes the answer match it (runtime/constraint.py)."""
        return "".join(self.stream(images, prompt, max_new_tokens, stop, sampling, video, **constraint))

    def stream(
        self,
        images: Any = None,
        prompt: str = "",
        max_new_tokens: int = 64,
        stop: list[str] | None = None,
        sampling: SamplingConfig | None = None,
        video: Any = None,
        **constraint: Any,
    ) -> Iterator[str]:
        """Like generate, yielding text as tokens arrive."""
        request = GenerationRequest(
            max_new_tokens,
            sampling or SamplingConfig(),
            list(stop or []),
            constraint=Constraint.given(**constraint),
        )
        yield from self.stream_batch(self.prepare([self.media(images, video)], [prompt]), request)

    def load_video(self, video: Any) -> Video:
        """A video file (frames sampled with the bundle's video settings), a Video, or a list of frames."""
        if isinstance(video, Video):
            return video
        if isinstance(video, (list, tuple)):
            return Video.from_frames(list(video), fps=VideoSettings.from_config(self.cfg).fps)
        return read_video(video, VideoSettings.from_config(self.cfg))

    def media(self, images: Any, video: Any = None) -> list[Any]:
        """What one request shows the model: its images, or its one video."""
        if video is None:
            return [] if images is None else _as_list(images)
        if images is not None and _as_list(images):
            raise ValueError("give images or a video, not both")
        return [self.load_video(video)]

    def chat(
        self,
        images: Any,
        history: list[tuple[str, str]],
        prompt: str,
        max_new_tokens: int = 64,
        sampling: SamplingConfig | None = None,
    ) -> str:
        """One more turn of a conversation about the same images; `history` holds (question, answer) pairs."""
        request = GenerationRequest(max_new_tokens, sampling or SamplingConfig())
        return "".join(self.stream_batch(self.prepare([_as_list(images)], [prompt], [history]), request))

    def generate_batch(
        self,
        items: list[tuple[Any, str]],
        max_new_tokens: int = 64,
        stop: list[str] | None = None,
        sampling: SamplingConfig | None = None,
        **constraint: Any,
    ) -> list[str]:
        """Several (images, prompt) pairs in one left-padded batch (each row its own matcher)."""
        request = GenerationRequest(
            max_new_tokens,
            sampling or SamplingConfig(),
            list(stop or []),
            constraint=Constraint.given(**constraint),
        )
        batch = self.prepare([_as_list(i) for i, _ in items], [p for _, p in items])
        rows: list[list[int]] = [[] for _ in items]
        for token in self.generate_ids(batch, request):
            for r, tok in enumerate(token.tolist()):
                rows[r].append(tok)
        return [answer_text(self.tokenizer, r, request.stop)[0] for r in rows]

    def stream_batch(self, batch: Batch, request: GenerationRequest) -> Iterator[str]:
        """The answer to one prepared batch row as text pieces; sets last_finish_reason."""
        text = TextStream(self.tokenizer, request.stop)
        gen = self.generate_ids(batch, request)
        self.last_finish_reason = "length"
        for token in gen:
            delta, done = text.push(int(token[0]))
            if delta:
                yield delta
            if done:
                self.last_finish_reason = "stop"
                gen.close()
                return
        if tail := text.flush():
            yield tail


class TextStream:
    """Token ids -> text pieces for streaming: holds back an incomplete multi-byte character and any
    tail that may begin a stop string; ends at EOS or at a stop string (which is not sent)."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token: int) -> tuple[str, bool]:
        """Add one token -> (new text to send, whether the answer ended here)."""
        if token == self.tokenizer.eos_token_id:
            return self.flush(), True
        self.ids.append(token)
        text, stopped = answer_text(self.tokenizer, self.ids, self.stop)
        if stopped:
            return self._send(text), True
        if text.endswith("\ufffd"):
            return "", False
        return self._send(text[: len(text) - _stop_overlap(text, self.stop)]), False

    def flush(self) -> str:
        """What is left to send once no more tokens come."""
        return self._send(answer_text(self.tokenizer, self.ids, self.stop)[0])

    def _send(self, upto: str) -> str:
        if len(upto) <= len(self.sent):
            return ""
        delta, self.sent = upto[len(self.sent) :], upto
        return delta


def answer_text(tokenizer: Tokenizer, ids: list[int], stop: list[str]) -> tuple[str, bool]:
    """(the text of `ids` up to EOS and before the first stop string, whether a stop string cut it)."""
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    text = tokenizer.decode(ids)
    for s in stop:
        if s in text:
            return text[: text.index(s)], True
    return text, False


def _stop_overlap(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                best = max(best, k)
                break
    return best


def _as_list(images: Any) -> list[Any]:
    return list(images) if isinstance(images, (list, tuple)) else [images]
