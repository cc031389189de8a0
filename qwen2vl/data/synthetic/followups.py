"""Follow-up questions: more questions about a sample's own image, asked in later turns of its conversation.

A scene of shapes can be asked to count or locate any of its objects, a bar chart for each bar's value
and its extremes, a GUI screen for a click on each of its elements. Training on several answers per
image spreads the cost of its vision tokens (most of a sample's tokens) over all of them: a counting
scene of ~75 vision tokens and ~25 tokens per question-answer pair carries four answers in ~175
tokens instead of one in ~100.

Follow-ups are built from ``sample.meta`` alone, with a random stream of their own, so the first
question, the image and the meta are those of the single-question sample, byte for byte. Reading and
video samples have none (their meta names only the asked fact).

    >>> from qwen2vl.data.synthetic import generate_sample
    >>> s = generate_sample(7, 0, "train", {"counting": 1}, "per-task", questions=3)
    >>> len(s.followups)   # (question, answer) pairs about the same scene
    2
"""

from __future__ import annotations

import random
from collections import Counter

from ...agent.grounding import format_box, normalize_coords
from ...agent.tools import format_call
from .charts import MAX_Q, MIN_Q, VALUE_Q
from .common import COLOURS, Sample
from .gui import CLICK_Q, click_call
from .shapes import COUNT_Q, GROUND_Q, SHAPES, count_target


def followup_rng(split: str, seed: int, index: int) -> random.Random:
    """The follow-ups' own random stream (the sample's stream is left as it was)."""
    return random.Random(f"qwen2vl-synthetic-followups:{split}:{int(seed)}:{int(index)}")


def followups(sample: Sample, rng: random.Random, k: int) -> list[tuple[str, str]]:
    """Up to ``k`` (question, answer) pairs about ``sample``'s image, each about another thing
    (another object, count, bar or element) than the others and than the sample's own question."""
    make = {"counting": _shape_question, "grounding": _shape_question, "basics": _shape_question,
            "chart": _chart_question, "gui": _gui_question}.get(sample.task)
    if make is None or k <= 0:
        return []
    asked, out = {_first_key(sample)}, []
    for _ in range(4 * k):  # a few draws repeat a thing or find nothing to ask
        drawn = make(sample.meta, rng)
        if drawn is not None and drawn[2] not in asked:
            asked.add(drawn[2])
            out.append(drawn[:2])
            if len(out) == k:
                break
    return out


def _first_key(sample: Sample) -> tuple:
    """What the sample's own question asks about, in the keys the makers below use."""
    meta = sample.meta
    if sample.task == "grounding":
        return ("box", meta["label"])
    if sample.task == "chart":
        return ("chart", meta["kind"], meta["category"] if meta["kind"] == "value" else None)
    if sample.task == "gui" and meta["kind"] == "click":
        return ("click", meta["label"])
    if sample.task == "counting":
        return ("count", count_target(meta["kind"], meta["target"]["colour"], meta["target"]["shape"])[1])
    return ("question", sample.question)


def _shape_question(meta: dict, rng: random.Random) -> tuple[str, str, tuple]:
    """Count a kind of object (mostly one that is there), or locate an object unique in the scene."""
    objects = meta["objects"]
    kinds = Counter((o["colour"], o["shape"]) for o in objects)
    unique = [o for o in objects if kinds[(o["colour"], o["shape"])] == 1]
    if unique and rng.random() < 0.5:
        o = rng.choice(unique)
        label = f"{o['colour']} {o['shape']}"
        box = normalize_coords(o["box"], tuple(meta["size"]))
        return rng.choice(GROUND_Q).format(label=label), format_box(box, label), ("box", label)
    present = rng.choice(objects) if objects and rng.random() < 0.8 else None
    colour = present["colour"] if present else rng.choice(sorted(COLOURS))
    shape = present["shape"] if present else rng.choice(SHAPES)
    mode = rng.choices(["combo", "shape", "colour", "all"], weights=[4, 3, 2, 1])[0]
    matches, things = count_target(mode, colour, shape)
    question = rng.choice(COUNT_Q).format(things=things or rng.choice(["shapes", "objects"]))
    return question, str(sum(matches(o["colour"], o["shape"]) for o in objects)), ("count", things)


def _chart_question(meta: dict, rng: random.Random) -> tuple[str, str, tuple]:
    """A bar's value, or the highest or lowest category (templates that need no chart title)."""
    values = meta["values"]
    kind = rng.choices(["value", "max", "min"], weights=[6, 2, 2])[0]
    if kind == "value":
        cat = rng.choice(sorted(values))
        template = rng.choice([t for t in VALUE_Q if "{title}" not in t])
        return template.format(cat=cat), str(values[cat]), ("chart", "value", cat)
    pick = max if kind == "max" else min
    template = rng.choice([t for t in (MAX_Q if kind == "max" else MIN_Q) if "{title}" not in t])
    return template, pick(values, key=values.get), ("chart", kind, None)


def _gui_question(meta: dict, rng: random.Random) -> tuple[str, str, tuple] | None:
    """A click on an element whose label no other element of the screen has."""
    labels = Counter(e["label"] for e in meta["elements"])
    candidates = [e for e in meta["elements"] if labels[e["label"]] == 1]
    if not candidates:
        return None
    e = rng.choice(candidates)
    question = rng.choice(CLICK_Q[e["type"]]).format(x=e["label"])
    return question, format_call("computer_use", click_call(e["box"], tuple(meta["size"]))), ("click", e["label"])
