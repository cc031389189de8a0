"""Shared pieces of the synthetic generators: samples, seeding, fonts, colours, sizes, phrasing.

Every sample is a pure function of ``(split, seed, index)``: :func:`sample_rng` seeds a
``random.Random`` from a string, which Python hashes with SHA-512, so the stream is the same on
every machine and Python version. The ``split`` is a namespace: ``"train"`` and ``"eval"`` never
share a random stream, whatever seeds are used.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field

from PIL import Image, ImageFont

SPLITS = ("train", "eval")


@dataclass
class Sample:
    """One question about one image (``image``) or one clip (``frames``), with its short answer.

    ``meta`` holds what scoring and analysis need: the subtask ``kind``, the ``phrasing`` id of
    the question template, and task facts (boxes, counts, values, ``small_text``...).
    ``followups``: more (question, answer) pairs about the same media, asked in later turns
    (:mod:`.followups`; none unless asked for).
    """

    task: str
    question: str
    answer: str
    meta: dict = field(default_factory=dict)
    image: Image.Image | None = None
    frames: list[Image.Image] | None = None
    followups: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class SizePolicy:
    """Image sides are drawn from ``[min_side, max_side]`` (log-uniform long side).

    ``task_max_side`` lowers ``max_side`` for some tasks, e.g. ``(("counting", 320),)``: scenes of
    a few shapes need fewer pixels (and vision tokens) than a page of text.
    """

    min_side: int = 100
    max_side: int = 1200
    task_max_side: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        if not 28 <= self.min_side <= self.max_side:
            raise ValueError(f"size policy needs 28 <= min_side <= max_side, got {self.min_side}, {self.max_side}")
        for task, side in self.task_max_side:
            if not self.min_side <= side <= self.max_side:
                raise ValueError(f"size policy: max side {side} of task {task!r} is outside "
                                 f"[{self.min_side}, {self.max_side}]")

    def for_task(self, task: str) -> SizePolicy:
        """The policy one task's images are drawn with (its own max side, if it has one)."""
        side = dict(self.task_max_side).get(task)
        return self if side is None else SizePolicy(self.min_side, side)


SIZE_POLICIES = {
    "varied": SizePolicy(100, 1200),  # the range: sides from about 100 to 1200 px
    "compact": SizePolicy(100, 512),  # cheaper in vision tokens, for CPU training budgets
    # compact, with shape scenes and charts at most 320 px: they hold no detail that needs more
    "per-task": SizePolicy(100, 512, (("counting", 320), ("grounding", 320), ("chart", 384), ("basics", 224),
                                      ("scenes", 320), ("words", 320), ("letters", 224))),
}


def size_policy(policy: str | SizePolicy) -> SizePolicy:
    if isinstance(policy, SizePolicy):
        return policy
    if policy not in SIZE_POLICIES:
        raise ValueError(f"unknown image size policy {policy!r}; expected one of {sorted(SIZE_POLICIES)}")
    return SIZE_POLICIES[policy]


def sample_rng(split: str, seed: int, index: int) -> random.Random:
    """The random stream of sample ``index`` of ``(split, seed)``; splits never share a stream."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return random.Random(f"qwen2vl-synthetic:{split}:{int(seed)}:{int(index)}")


@functools.lru_cache(maxsize=256)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font (Aileron Regular) at ``size`` px; needs Pillow >= 10.1 with FreeType."""
    loaded = ImageFont.load_default(size=int(size))
    if not isinstance(loaded, ImageFont.FreeTypeFont):
        raise RuntimeError("the synthetic data needs Pillow >= 10.1 built with FreeType (scalable default font)")
    return loaded


def text_width(text: str, size: int) -> float:
    return font(size).getlength(text)


# Saturated colours for shapes and ink; names are the words used in questions and answers.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 0),
    "orange": (245, 130, 20),
    "purple": (130, 50, 170),
    "pink": (240, 110, 180),
    "brown": (120, 70, 30),
    "black": (20, 20, 20),
}

# Light backgrounds that none of the shape colours is close to.
BACKGROUNDS = [(255, 255, 255), (245, 245, 240), (235, 235, 235), (225, 232, 240), (240, 235, 225),
               (230, 240, 230), (250, 245, 250), (215, 215, 215)]


def pick_size(rng: random.Random, policy: SizePolicy, aspect: tuple[float, float] = (0.5, 2.0),
              long_side: tuple[int, int] | None = None) -> tuple[int, int]:
    """(width, height): long side log-uniform within the policy (or ``long_side``), w/h in ``aspect``.

    >>> pick_size(random.Random(0), SizePolicy(100, 1200))
    (815, 570)
    """
    lo, hi = long_side or (policy.min_side, policy.max_side)
    lo, hi = max(lo, policy.min_side), min(hi, policy.max_side)
    if lo > hi:
        lo = hi
    long = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
    ratio = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))  # width / height
    if ratio >= 1:
        w, h = long, long / ratio
    else:
        w, h = long * ratio, long
    return int(max(policy.min_side, round(w))), int(max(policy.min_side, round(h)))


def phrase(rng: random.Random, name: str, templates: list[str], **fields) -> tuple[str, str]:
    """A random template filled with ``fields``, and its id ``"name/k"`` for the sample's meta."""
    k = rng.randrange(len(templates))
    return templates[k].format(**fields), f"{name}/{k}"


def with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")
