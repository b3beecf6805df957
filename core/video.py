"""Video as SmolVLM2's processor sees it, torch-free: sampled frames with timestamps, one view each.

    VideoSettings  how a checkpoint samples and sizes frames (SmolVLM2's `video_sampling`)
    Video          decoded RGB frames with their timestamps and the stream's duration
    probe          a file's stream facts from its header (no frame decoded): for budgets
    read_video     decode the frames `sample_indices` picks (PyAV, the `video` extra)
    process_frame  one frame -> one view: long edge to `size`, then the tile square, normalised
    video_prompt   the text a video stands for: an intro, then "Frame from MM:SS:" and its tokens

Sampling, sizes and the prompt follow transformers' SmolVLMVideoProcessor and SmolVLMProcessor
(`sample_frames`, `resize`, `replace_video_token`): a frame is resized twice with LANCZOS (PIL's
here; torchvision's uint8 kernel there, which rounds differently by one level in ~0.3% of pixels)
and never split into tiles. Frames of a bundle that is not SmolVLM's go in as images, one view each.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

INTRO = "You are provided the following series of {count} frames from a {duration} [H:MM:SS] video.\n"
FRAME = "\nFrame from {stamp}:"
OUTRO = "\n\n"
# transformers renders a video prompt with this template whatever the checkpoint's own says
VIDEO_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'] is string %}"
    "{{': ' + message['content']}}{% else %}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}"
    "{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
VIDEO_TOKEN = "<video>"


@dataclass(frozen=True)
class VideoSettings:
    fps: float = 1.0  # frames sampled per second of video
    max_frames: int = 64  # at most this many frames
    size: int = 512  # a frame's long edge is resized to this first, then the frame to the tile square
    skip_secs: float = 1.0  # seconds skipped at each end of a video long enough to spare them

    @classmethod
    def from_config(cls, cfg: Any) -> VideoSettings:
        """The checkpoint's settings (SmolVLM2), else defaults sized by its image processor."""
        s = getattr(cfg, "vlm_video_processor", None)
        if s:
            return cls(float(s["fps"]), int(s["max_frames"]), int(s["size"]))
        if cfg.vlm_format == "idefics3":
            return cls(size=int(cfg.vlm_image_processor["longest_edge"]))
        return cls(max_frames=8, size=cfg.vit_img_size)


def settings_from_processor(vp: dict[str, Any], where: str) -> dict[str, Any]:
    """vlm_video_processor settings from a saved SmolVLMVideoProcessor: `size` wins over
    `video_sampling.video_size` where both are given (transformers' backward-compatibility rule)."""
    sampling = vp.get("video_sampling") or {}
    size = (vp.get("size") or {}).get("longest_edge") or (sampling.get("video_size") or {}).get(
        "longest_edge"
    )
    fps = sampling.get("fps", vp.get("fps"))
    frames = sampling.get("max_frames", vp.get("num_frames"))
    if size is None or fps is None or frames is None:
        raise ValueError(f"{where}: a video processor needs size (longest_edge), fps and max_frames")
    return {"fps": float(fps), "max_frames": int(frames), "size": int(size)}


@dataclass
class Video:
    """Sampled frames (8-bit RGB) with their timestamps in seconds, and the whole stream's duration."""

    frames: list[Image.Image]
    timestamps: list[float]
    duration: float
    indices: list[int] = field(default_factory=list)  # the frames' indices in the stream, if known

    def __post_init__(self) -> None:
        if not self.frames:
            raise ValueError("a video needs at least one frame")
        if len(self.timestamps) != len(self.frames):
            raise ValueError(f"{len(self.frames)} frames but {len(self.timestamps)} timestamps")

    @classmethod
    def from_frames(cls, frames: list[Any], timestamps: list[float] | None = None, fps: float = 1.0) -> Video:
        """Frames already sampled (images, paths or [H, W, 3] uint8 arrays), at `timestamps` or `fps`."""

        def rgb(f: Any) -> Image.Image:
            img = (
                Image.fromarray(f)
                if isinstance(f, np.ndarray)
                else f
                if isinstance(f, Image.Image)
                else Image.open(f)
            )
            return img.convert("RGB")

        images = [rgb(f) for f in frames]
        stamps = list(timestamps) if timestamps is not None else [i / fps for i in range(len(images))]
        return cls(images, [float(t) for t in stamps], max(stamps) if stamps else 0.0)


# ----------------------------------------------------------------------------- sampling and decoding


@dataclass(frozen=True)
class StreamInfo:
    """What a video's header says, before any frame is decoded."""

    frames: int  # total frames
    fps: float
    width: int
    height: int

    @property
    def duration(self) -> float:
        return self.frames / self.fps if self.fps else 0.0


def sample_indices(info: StreamInfo, s: VideoSettings) -> np.ndarray:
    """transformers' SmolVLMVideoProcessor.sample_frames: round(fps x duration) frames, at most
    max_frames, spread evenly over the video, `skip_secs` spared at each end of a long one."""
    desired = max(1, min(int(round(s.fps * info.duration)), s.max_frames))
    start, end = 0, info.frames - 1
    if s.skip_secs > 0 and info.duration - 2 * s.skip_secs > s.max_frames * s.fps:
        start, end = int(s.skip_secs * info.fps), int(info.frames - s.skip_secs * info.fps)
    start, end = max(0, start), min(end, info.frames - 1)
    if start >= end:
        start, end = 0, info.frames - 1
    return np.unique(np.linspace(start, end, desired, dtype=int))


def _av() -> Any:
    try:
        import av
    except ImportError:
        from .install import install_hint

        raise RuntimeError(f"video needs PyAV: {install_hint('video')}") from None
    return av


def _name(source: Any) -> str:
    return "<video bytes>" if hasattr(source, "read") else os.fspath(source)


def _open(av: Any, source: Any) -> Any:
    if hasattr(source, "seek"):
        source.seek(0)
    return av.open(source if hasattr(source, "read") else os.fspath(source))


def probe(source: str | os.PathLike | Any) -> StreamInfo:
    """The first video stream's frame count, rate and size, from the container's header
    (`source`: a path or a binary file object)."""
    av = _av()
    name = _name(source)
    try:
        with _open(av, source) as container:
            if not container.streams.video:
                raise ValueError(f"{name}: holds no video stream")
            st = container.streams.video[0]
            return StreamInfo(int(st.frames), float(st.average_rate or 0), int(st.width), int(st.height))
    except av.FFmpegError as e:
        raise ValueError(f"{name}: not a readable video ({type(e).__name__})") from None


def read_video(source: str | os.PathLike | Any, s: VideoSettings, info: StreamInfo | None = None) -> Video:
    """Decode the frames sample_indices picks, as transformers' PyAV reader does (frame i of the
    decoded stream, timestamp i / fps); `source` a path or a binary file object."""
    av = _av()
    name = _name(source)
    info = info or probe(source)
    if info.frames < 1 or info.fps <= 0:
        raise ValueError(f"{name}: the stream does not say its frame count and rate")
    indices = sample_indices(info, s)
    wanted, frames = set(indices.tolist()), []
    try:
        with _open(av, source) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i > indices[-1]:
                    break
                if i in wanted:
                    frames.append(frame.to_image().convert("RGB"))
    except av.FFmpegError as e:
        raise ValueError(f"{name}: cannot decode the video ({type(e).__name__})") from None
    if len(frames) != len(indices):
        raise ValueError(f"{name}: the stream ended after {len(frames)} of {len(indices)} sampled frames")
    return Video(frames, [i / info.fps for i in indices.tolist()], info.duration, indices.tolist())


# ----------------------------------------------------------------------------- pixels and prompt


def process_frame(img: Image.Image, s: VideoSettings, image: dict[str, Any]) -> np.ndarray:
    """One frame -> float32 [3, tile, tile] with the image processor's resampling and normalisation."""
    from .idefics3 import MAX_IMAGE_SIZE, _pixels, long_edge

    resample, tile = Image.Resampling(image["resample"]), image["tile"]
    # transformers' video resize caps the target at 4096 first (its image resize caps after)
    h, w = long_edge(img.height, img.width, min(MAX_IMAGE_SIZE, s.size))
    if (w, h) != img.size:
        img = img.resize((w, h), resample)
    if img.size != (tile, tile):
        img = img.resize((tile, tile), resample)
    return _pixels([img], image)[0]


def number_words(n: int) -> str:
    """English words for 0 <= n < 1000, as num2words writes them ("sixty-four", "one hundred and one")."""
    ones = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    ones += "sixteen seventeen eighteen nineteen"
    small = ones.split()
    tens = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
    if not 0 <= n < 1000:
        raise ValueError(f"number_words takes 0 to 999, got {n}")
    if n < 20:
        return small[n]
    if n < 100:
        return tens[n // 10] + ("-" + small[n % 10] if n % 10 else "")
    rest = n % 100
    return small[n // 100] + " hundred" + (" and " + number_words(rest) if rest else "")


def video_prompt(video: Video, tokens: dict[str, str], image_seq_len: int) -> str:
    """What `<video>` becomes: transformers' SmolVLMProcessor.replace_video_token."""
    fake, glob, image = tokens["fake_image_token"], tokens["global_image_token"], tokens["image_token"]
    one = f"{fake}{glob}{image * image_seq_len}{fake}"
    duration = datetime.timedelta(seconds=int(video.duration))
    out = INTRO.format(count=number_words(len(video.frames)), duration=str(duration))
    for t in video.timestamps:
        out += FRAME.format(stamp=f"{int(t // 60):02d}:{int(t % 60):02d}") + one
    return out + OUTRO
