"""A request's images and video, opened only once the whole request is within its budgets.

In order, nothing decoded before the last step:
    count      images (--max-images) and videos (one, alone) over every message: serve/openai_api.py
    bytes      each data: URL's encoded size, from its length: serve/openai_api.py check_url
    source     a data: URL's bytes, or a file:// path resolved and confined to --image-dir
    headers    each image's width x height, a video's frame count, rate and size: each within
               --max-image-pixels, the video within --max-video-seconds, and all the pixels the
               request would decode (a video: its sampled frames) within --max-request-pixels
    decode     then, and only then, the pixels (a video: the frames sample_indices picks)
Nothing is fetched from the network.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from typing import Any

from PIL import Image, UnidentifiedImageError

from core.processors import load_image
from core.video import StreamInfo, Video, VideoSettings, probe, read_video, sample_indices

from .openai_api import ApiError, MediaRef, RequestLimits


def open_media(
    refs: list[MediaRef], limits: RequestLimits, video: VideoSettings
) -> list[Image.Image | Video]:
    """The request's images (or its one video, sampled with `video`), in order."""
    opened, total = [], 0
    for ref in refs:
        source = _source(ref, limits)
        if ref.kind == "image":
            img = _image_header(source, ref.where)
            w, h = img.size
            _pixels(w * h, limits.max_image_pixels, ref, f"image is {w}x{h} = {w * h} pixels")
            total += w * h
            opened.append((ref, img))
        else:
            info = _video_header(source, ref.where)
            _pixels(
                info.width * info.height,
                limits.max_image_pixels,
                ref,
                f"frames are {info.width}x{info.height}",
            )
            if info.duration > limits.max_video_seconds:
                raise ApiError(
                    400,
                    f"{ref.where}: the video lasts {info.duration:.1f} s, over {limits.max_video_seconds:g} s",
                    ref.where,
                )
            frames = len(sample_indices(info, video))
            total += frames * info.width * info.height
            opened.append((ref, (source, info)))
        if total > limits.max_request_pixels:
            raise ApiError(
                400,
                f"{ref.where}: the request's images and frames hold {total} pixels so far, above the limit of "
                f"{limits.max_request_pixels} per request",
                ref.where,
            )
    out = []
    for ref, item in opened:
        try:
            if ref.kind == "image":
                out.append(load_image(item, max_pixels=limits.max_image_pixels))
            else:
                out.append(read_video(item[0], video, item[1]))
        except (ValueError, OSError, RuntimeError) as e:
            raise ApiError(400, f"{ref.where}: {e}", ref.where) from None
    return out


def _pixels(n: int, limit: int, ref: MediaRef, what: str) -> None:
    if n > limit:
        raise ApiError(400, f"{ref.where}: {what}, above the limit of {limit} pixels", ref.where)


def _source(ref: MediaRef, limits: RequestLimits) -> Any:
    """The encoded bytes behind a URL (a file object, or a confined path), their size checked."""
    url, where = ref.url, ref.where
    limit = limits.max_image_bytes if ref.kind == "image" else limits.max_video_bytes
    if url.startswith("data:"):
        try:
            return io.BytesIO(base64.b64decode(url.partition(",")[2], validate=True))
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: the data: URL is not valid base64", where) from None
    if url.startswith("file://"):
        if not limits.image_dir:
            raise ApiError(
                400, f"{where}: file:// {ref.kind}s are off (the server allows them with --image-dir)", where
            )
        given = url[len("file://") :]
        path = os.path.realpath(given)
        root = os.path.realpath(limits.image_dir)
        # messages name the path as the client gave it, never where a link resolves to
        if os.path.commonpath([path, root]) != root:
            raise ApiError(400, f"{where}: {given} is outside the allowed image directory", where)
        if not os.path.isfile(path):
            raise ApiError(400, f"{where}: no such {ref.kind} file {given}", where)
        if os.path.getsize(path) > limit:
            raise ApiError(413, f"{where}: {ref.kind} is over {limit} bytes", where)
        return path
    raise ApiError(
        400,
        f"{where}: only data: URLs (or allowed file:// paths) are accepted; the server "
        "fetches nothing from the network",
        where,
    )


def _image_header(source: Any, where: str) -> Image.Image:
    """The image opened lazily: its header read (format, size), no pixel decoded yet."""
    try:
        return Image.open(source)
    except Image.DecompressionBombError:
        raise ApiError(400, f"{where}: refused as a decompression bomb", where) from None
    except (UnidentifiedImageError, OSError):
        raise ApiError(
            400, f"{where}: not a readable image (PNG, JPEG, WebP, GIF, BMP, TIFF)", where
        ) from None


def _video_header(source: Any, where: str) -> StreamInfo:
    try:
        info = probe(source)
    except (ValueError, RuntimeError) as e:
        raise ApiError(400, f"{where}: {e}", where) from None
    if info.frames < 1 or info.fps <= 0:
        raise ApiError(400, f"{where}: the video's header does not give its frame count and rate", where)
    return info
