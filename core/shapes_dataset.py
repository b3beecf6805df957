"""The built-in visual question answering data: rendered shapes, generated on the fly, no download.

Each image holds 1-6 objects in the cells of a 4x4 grid, every one a different colour, one of them
clearly the largest. Five question types with short exact answers:

    count     How many objects are there?                  1..6
    colour    What colour is the largest object?           a colour
    shape     What shape is the largest object?            circle / square / triangle / diamond
    left      Is the largest object left of the middle?    yes / no
    above     Is the largest object above the middle?      yes / no

Answers are balanced per question type (uniform counts, colours and shapes; the largest object sits
in a uniformly drawn cell, so yes/no is 50/50), so the question text alone gives little away:
`blind_baseline` measures what the best text-only guesser (the majority answer for each question)
scores.

Every question is about an object the model can find without reading a colour word: the tiny
default does not learn to bind a colour word to an object within its training budget
(docs/training.md).

Sample `i` of a split depends only on (seed, split, i): deterministic, shardable, resumable.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "cyan": (40, 220, 230),
}
SHAPES = ("circle", "square", "triangle", "diamond")
QUESTIONS = {
    "count": "How many objects are there?",
    "colour": "What colour is the largest object?",
    "shape": "What shape is the largest object?",
    "left": "Is the largest object left of the middle?",
    "above": "Is the largest object above the middle?",
}
QUESTION_TYPES = tuple(QUESTIONS)
SPLIT_OFFSETS = {"train": 0, "validation": 1_000_003, "test": 2_000_003}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    x: float  # centre, in [0, 1]
    y: float
    r: float  # half-size, in [0, 1]


@dataclass
class Sample:
    image: Image.Image
    question: str
    answer: str
    qtype: str


GRID = 4  # objects sit in the cells of a 4x4 grid, one per cell, jittered a little


def _place(rng: random.Random, n: int) -> list[tuple[float, float, float]]:
    """n objects (x, y, r) in distinct grid cells; a cell is one image token of the tiny model.

    The layout keeps every question answerable by eye (no overlaps; "left of" and "above" pairs
    differ by at least a cell) and lets a small model learn from few samples.
    """
    cells = rng.sample(range(GRID * GRID), n)
    out = []
    for c in cells:
        cx, cy = (c % GRID + 0.5) / GRID, (c // GRID + 0.5) / GRID
        out.append(
            (cx + rng.uniform(-0.015, 0.015), cy + rng.uniform(-0.015, 0.015), rng.uniform(0.05, 0.085))
        )
    return out


def _with_largest(rng: random.Random, objects: list[Obj]) -> list[Obj]:
    """Make one object clearly the largest (radius 0.105 against at most 0.085)."""
    k = rng.randrange(len(objects))
    o = objects[k]
    return [Obj(o.shape, o.colour, o.x, o.y, 0.105) if j == k else p for j, p in enumerate(objects)]


def render(objects: list[Obj], size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), (20, 20, 24))
    draw = ImageDraw.Draw(img)
    for o in objects:
        cx, cy, r = o.x * size, o.y * size, o.r * size
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o.shape == "square":
            s = r * 0.9
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
        else:  # diamond
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return img


class ShapesDataset:
    """Map-style: `ds[i]` -> Sample. `length` bounds what an epoch means; samples exist for any i."""

    def __init__(self, split: str = "train", seed: int = 0, image_size: int = 128, length: int = 200_000):
        if split not in SPLIT_OFFSETS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_OFFSETS)}")
        self.split, self.seed, self.image_size, self.length = split, seed, image_size, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Sample:
        rng = random.Random((self.seed * 7_919 + SPLIT_OFFSETS[self.split] + i) * 2_654_435_761)
        qtype = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        # 1-6 objects for counting; otherwise at least two, so that "the largest" compares sizes
        objects = _objects(rng, rng.randint(1, 6) if qtype == "count" else rng.randint(2, 6))
        return Sample(render(objects, self.image_size), QUESTIONS[qtype], answer(objects, qtype), qtype)


def _objects(rng: random.Random, n: int) -> list[Obj]:
    """n objects of distinct colours in distinct cells, one of them made clearly the largest."""
    spots = _place(rng, n)
    colours = rng.sample(list(COLOURS), n)
    objects = [Obj(rng.choice(SHAPES), c, x, y, r) for c, (x, y, r) in zip(colours, spots, strict=True)]
    return _with_largest(rng, objects)


def answer(objects: list[Obj], qtype: str) -> str:
    """The exact answer to QUESTIONS[qtype] about these objects."""
    if qtype == "count":
        return str(len(objects))
    largest = max(objects, key=lambda o: o.r)
    if qtype == "colour":
        return largest.colour
    if qtype == "shape":
        return largest.shape
    # object centres sit in grid cells, at least 0.11 from the middle line: never ambiguous
    if qtype == "left":
        return "yes" if largest.x < 0.5 else "no"
    if qtype == "above":
        return "yes" if largest.y < 0.5 else "no"
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")


def scene_questions(ds: ShapesDataset, i: int) -> tuple[Image.Image, list[tuple[str, str]]]:
    """One image with every question type about it, in random order (training data).

    Five answers per image give the vision path five times the signal per encoded image.
    """
    objects, qa = scene(ds, i)
    return render(objects, ds.image_size), qa


def scene(ds: ShapesDataset, i: int) -> tuple[list[Obj], list[tuple[str, str]]]:
    """The objects of training scene i and its questions (scene_questions without rendering)."""
    rng = random.Random((ds.seed * 7_919 + SPLIT_OFFSETS[ds.split] + i) * 40_503 + 17)
    objects = _objects(rng, rng.randint(1, 6))
    qa = [(QUESTIONS[q], answer(objects, q)) for q in QUESTION_TYPES]
    rng.shuffle(qa)
    return objects, qa


def corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Questions and answers of the training split, for fitting the tokenizer (no images rendered)."""
    ds = ShapesDataset("train", seed=seed, image_size=8)
    texts = []
    for i in range(n):
        s = ds[i]
        texts += [s.question, s.answer]
    return texts


def blind_baseline(samples: list[Sample], reference: list[Sample]) -> float:
    """Accuracy of answering every question with the majority answer to that question text, learnt
    on `reference`: the best a text-only model can do (each question type is one fixed text)."""
    by_question: dict[str, Counter] = {}
    for s in reference:
        by_question.setdefault(s.question, Counter())[s.answer] += 1
    overall = Counter(s.answer for s in reference)
    hits = 0
    for s in samples:
        counts = by_question.get(s.question, overall)
        hits += counts.most_common(1)[0][0] == s.answer
    return hits / max(len(samples), 1)


def split_blind_baseline(split: str, n: int, seed: int = 0, reference: int = 5000) -> float:
    """blind_baseline on the first n questions of a split, learnt on `reference` training questions.

    Images are rendered at 8 px: only the questions and answers matter here.
    """
    target, train = (
        ShapesDataset(split, seed=seed, image_size=8),
        ShapesDataset("train", seed=seed, image_size=8),
    )
    return blind_baseline([target[i] for i in range(n)], [train[i] for i in range(reference)])
