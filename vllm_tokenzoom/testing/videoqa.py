"""A synthetic video-QA task whose answers live in a few tokens of a few frames.

Each clip (``make_clip(seed)``) is 16-32 frames of 384x384 RGB (196 LLaVA-OneVision
tokens per frame, as the real model):
- a static, smooth, muted background with slow global lighting drift and pixel noise
  (temporal redundancy: most tokens barely change from frame to frame, what TTM exploits);
- one or two dim boxes drifting slowly (motion that is not asked about);
- 1-4 *flashes*: a bright square of a distinct colour visible in exactly one frame, in the
  left or right part of the frame, covering exactly 2x2 token cells of the 14x14 grid
  (every flash weighs the same 4 of the frame's 196 tokens, so counting flashes is
  counting what the tokens show, not guessing from how big each one looks).

Questions (``questions(clip)``) need the flashes' frames and regions: how many there are,
the colour of the first / last one, whether a colour appears, the order of two of them,
and on which side one was -- one short word each -- and, for methods that act between
sentences (ZoomVLM's ATA adjusts every few sentence ends), a description of every flash in
order, two short sentences per flash ("the red one. it is on the left.": lower case, words
the task's tokenizer knows), 2-8 sentences. Accuracy is exact match of the whole answer.

Splits come from disjoint seed ranges (``split_seeds``). Everything is a pure function of
the seed: the same seed gives the same pixels, questions and answers on every machine.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 384  # frame side in pixels: SigLIP's input size, so the processor does not rescale
GRID = 14  # token cells per frame side (27x27 SigLIP patches of 14 px, pooled 2x2 -> 196 tokens)
CELL = 27  # pixels per token cell: 2 patches of 14 px (the last 6 px of the frame are not seen)
COLOURS = {  # flash colour name -> RGB (saturated, bright: unlike the muted background)
    "red": (230, 30, 30), "green": (30, 210, 40), "blue": (40, 60, 235),
    "yellow": (240, 230, 30), "white": (250, 250, 250), "purple": (170, 40, 220),
}
NUMBERS = ["zero", "one", "two", "three", "four"]
KINDS = ("count", "first", "last", "presence", "order", "side", "describe")
ANSWER_TOKENS = {"describe": 24}  # generation budget per kind (4 flashes: 16 tokens + end); others: 6
VERSION = 2  # bumped whenever the pixels a seed gives change (feature caches are keyed by it)
SPLITS = {"train": 0, "val": 1_000_000, "test": 2_000_000}  # disjoint seed ranges


@dataclass(frozen=True)
class Flash:
    frame: int  # the one frame it is visible in
    colour: str
    row: int  # top-left token cell of the 2x2 cells it covers
    col: int

    @property
    def side(self) -> str:
        return "left" if self.col < GRID // 2 else "right"

    @property
    def pixels(self) -> tuple[slice, slice]:
        """(rows, cols) of the pixels it covers: exactly its 2x2 token cells."""
        return (slice(self.row * CELL, (self.row + 2) * CELL), slice(self.col * CELL, (self.col + 2) * CELL))


@dataclass(frozen=True)
class Clip:
    seed: int
    num_frames: int
    flashes: tuple[Flash, ...]  # in time order
    frames: np.ndarray | None  # [T, 384, 384, 3] uint8 RGB; None when not rendered


@dataclass(frozen=True)
class Question:
    kind: str  # one of KINDS
    text: str
    answer: str


def answer_tokens(kind: str) -> int:
    """Tokens to generate for an answer of this kind (the answer and its end of turn fit)."""
    return ANSWER_TOKENS.get(kind, 6)


def describe(flashes) -> str:
    """The ``describe`` answer: two one-word sentences per flash, in time order ("red. left.")."""
    return " ".join(f"{f.colour}. {f.side}." for f in flashes)


def trained_kinds(checkpoint) -> tuple[str, ...]:
    """The kinds a trained checkpoint was evaluated on (its ``train_metrics.json``): checkpoints
    trained before a kind was added do not know it. All kinds when the file is missing."""
    import json
    from pathlib import Path

    path = Path(checkpoint) / "train_metrics.json"
    if not path.exists():
        return KINDS
    return tuple(json.loads(path.read_text())["test_full"]["per_kind"])


def split_seeds(split: str, count: int) -> list[int]:
    """The first ``count`` clip seeds of a split (train / val / test never share a seed)."""
    return [SPLITS[split] + i for i in range(count)]


def _background(rng: np.random.Generator) -> np.ndarray:
    """[384, 384, 3] float: a few low-frequency waves around a muted colour."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    base = rng.uniform(70, 150, size=3)
    field = np.zeros((SIZE, SIZE, 3))
    for _ in range(3):
        fy, fx = rng.uniform(0.5, 3.0, size=2)
        phase = rng.uniform(0, 2 * np.pi)
        field += np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)[..., None] * rng.uniform(-12, 12, size=3)
    return base + field


def _flashes(rng: np.random.Generator, num_frames: int) -> tuple[Flash, ...]:
    count = int(rng.integers(1, 5))
    frames = sorted(rng.choice(np.arange(1, num_frames - 1, 2), size=count, replace=False).tolist())
    colours = rng.choice(list(COLOURS), size=count, replace=False).tolist()
    flashes = []
    for frame, colour in zip(frames, colours):
        left = rng.random() < 0.5
        # 2x2 cells clear of the middle: columns 0-5 on the left, 8-13 on the right
        col = int(rng.integers(0, GRID // 2 - 2) if left else rng.integers(GRID // 2 + 1, GRID - 1))
        row = int(rng.integers(0, GRID - 1))
        flashes.append(Flash(frame=int(frame), colour=colour, row=row, col=col))
    return tuple(flashes)


def make_clip(seed: int, num_frames: int | None = None, render: bool = True) -> Clip:
    """The clip for a seed; ``num_frames`` defaults to a seed-chosen 16..32. ``render=False``
    skips the pixels (questions need only the flashes)."""
    rng = np.random.default_rng(seed)
    num_frames = int(rng.integers(16, 33)) if num_frames is None else num_frames
    background = _background(rng)
    boxes = [dict(size=int(rng.integers(50, 90)), shade=rng.uniform(40, 90), pos=rng.uniform(0, 1, size=2),
                  velocity=rng.uniform(-0.012, 0.012, size=2)) for _ in range(int(rng.integers(1, 3)))]
    flashes = _flashes(rng, num_frames)
    drift = rng.uniform(-0.1, 0.1)
    if not render:
        return Clip(seed=seed, num_frames=num_frames, flashes=flashes, frames=None)
    frames = np.empty((num_frames, SIZE, SIZE, 3), dtype=np.uint8)
    for t in range(num_frames):
        frame = background * (1 + drift * t / num_frames)
        for box in boxes:
            s = box["size"]
            y, x = (np.abs((box["pos"] + t * box["velocity"]) % 2.0 - 1.0) * (SIZE - s)).astype(int)
            frame[y:y + s, x:x + s] = box["shade"]
        for flash in flashes:
            if flash.frame == t:
                frame[flash.pixels] = COLOURS[flash.colour]
        frame = frame + rng.normal(0, 3, size=frame.shape)
        frames[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return Clip(seed=seed, num_frames=num_frames, flashes=flashes, frames=frames)


def questions(clip: Clip, variant: int = 0) -> list[Question]:
    """One question of each kind (the order question only with two or more flashes).
    Colours asked about are drawn from the clip's seed and ``variant`` (0 for evaluation;
    training resamples the wording with other variants), so they are deterministic too."""
    rng = np.random.default_rng([clip.seed, 1, variant])
    flashes = clip.flashes
    shown = [f.colour for f in flashes]
    asked = str(rng.choice(list(COLOURS)))
    target = flashes[int(rng.integers(len(flashes)))]
    out = [
        Question("count", "How many flashes are there?", NUMBERS[len(flashes)]),
        Question("first", "What colour is the first flash?", flashes[0].colour),
        Question("last", "What colour is the last flash?", flashes[-1].colour),
        Question("presence", f"Is there a {asked} flash?", "yes" if asked in shown else "no"),
        Question("side", f"Where is the {target.colour} flash?", target.side),
    ]
    if len(flashes) >= 2:
        a, b = rng.choice(len(flashes), size=2, replace=False)
        out.append(Question("order", f"Is the {shown[a]} flash before the {shown[b]} flash?",
                            "yes" if a < b else "no"))
    out.append(Question("describe", "Describe every flash in order.", describe(flashes)))
    return out
