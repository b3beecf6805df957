"""Calibration inputs: real (images, prompt) samples from a folder, the built-in data or a HF dataset.

Sources, as `--calibration` takes them:

    builtin            the built-in shapes data, validation split (the test split stays held out)
    DIR                image files in DIR, each asked the prompt in DIR/prompts.txt (one per line,
                       cycled; another file can be named) or, without one, a description request;
                       plus the text-only prompts in DIR/texts.txt (one per line), if there is one,
                       taken in turn with the images: a VLM answers text-only prompts too, and the
                       decoder's calibration should see them (the int4 recipe's GPTQ measurably does)
    hf:NAME[:SUBSET]   a Hugging Face dataset in the_cauldron / FineVision style (first user turn)

Unreadable images are skipped and counted, never fatal; too few usable samples is an error that
says how many are needed. The samples' content hash goes into the quantized bundle's manifest, so
a bundle says exactly what it was calibrated on.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from core.processors import load_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_PROMPT = "Describe this image."
TEXTS_FILE = "texts.txt"  # in a calibration folder: text-only prompts, one per line


@dataclass
class CalibrationSample:
    images: list[Image.Image]
    prompt: str


@dataclass
class CalibrationSet:
    source: str
    samples: list[CalibrationSample]
    skipped: dict[str, int] = field(default_factory=dict)

    def sha256(self) -> str:
        """Hash of what the graphs are calibrated on: every image's pixels and every prompt."""
        h = hashlib.sha256()
        for s in self.samples:
            h.update(s.prompt.encode())
            for img in s.images:
                h.update(f"{img.size}".encode())
                h.update(img.tobytes())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "samples": len(self.samples),
            "sha256": self.sha256(),
            "skipped": self.skipped,
        }


def load_calibration(
    source: str, n: int, minimum: int = 1, seed: int = 0, prompts_file: str | None = None
) -> CalibrationSet:
    """Up to n samples from `source`; raises when fewer than `minimum` usable ones remain."""
    if n < minimum:
        raise ValueError(f"--samples {n}: calibration needs at least {minimum} samples")
    if source in ("builtin", "shapes"):
        cal = CalibrationSet("builtin", list(_builtin(n, seed)))
    elif source.startswith("hf:"):
        cal = _from_records(source, _hf_records(source), n)
    elif os.path.isdir(source):
        cal = _from_folder(source, n, prompts_file)
    else:
        raise ValueError(
            f"calibration source {source!r}: expected 'builtin', a folder of images or 'hf:NAME[:SUBSET]'"
        )
    if len(cal.samples) < minimum:
        raise ValueError(
            f"calibration source {source!r} gave {len(cal.samples)} usable samples "
            f"(skipped: {cal.skipped or 'none'}); at least {minimum} are needed"
        )
    log.info("calibration: %d samples from %s (skipped %s)", len(cal.samples), source, cal.skipped or "none")
    return cal


def _builtin(n: int, seed: int) -> Iterator[CalibrationSample]:
    from core.shapes_dataset import ShapesDataset

    ds = ShapesDataset("validation", seed=seed)
    for i in range(n):
        s = ds[i]
        yield CalibrationSample([s.image], s.question)


def _from_folder(folder: str, n: int, prompts_file: str | None = None) -> CalibrationSet:
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    prompt_file = prompts_file or os.path.join(folder, "prompts.txt")
    if prompts_file and not os.path.exists(prompts_file):
        raise FileNotFoundError(f"prompts file not found: {prompts_file}")
    prompts = _lines(prompt_file) or [DEFAULT_PROMPT]
    texts = _lines(os.path.join(folder, TEXTS_FILE))
    cal = CalibrationSet(os.path.abspath(folder), [])
    images: list[CalibrationSample] = []
    for name in names:
        if len(images) >= n:
            break
        try:
            img = load_image(os.path.join(folder, name))
        except (ValueError, FileNotFoundError) as e:
            log.warning("calibration: skipping %s", e)
            cal.skipped["bad_image"] = cal.skipped.get("bad_image", 0) + 1
            continue
        images.append(CalibrationSample([img], prompts[len(images) % len(prompts)]))
    text_only = [CalibrationSample([], t) for t in texts]
    for k in range(max(len(images), len(text_only))):  # alternate, so any n takes some of each
        cal.samples += [*images[k : k + 1], *text_only[k : k + 1]]
    del cal.samples[n:]
    return cal


def _lines(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _hf_records(source: str) -> Iterator[dict[str, Any]]:
    from datasets import load_dataset

    name, _, subset = source[3:].partition(":")
    return iter(load_dataset(name, subset or None, split="train", streaming=True))


def _from_records(source: str, records: Iterator[dict[str, Any]], n: int) -> CalibrationSet:
    """the_cauldron / FineVision records -> samples (first image set, first user turn)."""
    from core.conversations import record_to_conversation

    cal = CalibrationSet(source, [])
    for record in records:
        if len(cal.samples) >= n:
            break
        conv = record_to_conversation(record)
        if not conv.turns:
            cal.skipped["no_prompt"] = cal.skipped.get("no_prompt", 0) + 1
            continue
        if not conv.images:
            cal.skipped["no_image"] = cal.skipped.get("no_image", 0) + 1
            continue
        try:
            images = [load_image(io.BytesIO(i.read()) if hasattr(i, "read") else i) for i in conv.images]
        except (ValueError, FileNotFoundError) as e:
            log.warning("calibration: skipping a record: %s", e)
            cal.skipped["bad_image"] = cal.skipped.get("bad_image", 0) + 1
            continue
        cal.samples.append(CalibrationSample(images, conv.turns[0][0]))
    return cal
