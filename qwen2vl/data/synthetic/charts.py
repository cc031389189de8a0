"""Charts: simple vertical bar charts; read a bar's value, or name the highest or lowest bar.

Half the charts print each value above its bar; the others only have a y axis with gridlines, and
their values are multiples of ``axis_max / 10`` (on a gridline or halfway between two).
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from . import vocabulary as vocab
from .common import COLOURS, Sample, SizePolicy, font, phrase, pick_size, text_width

VALUE_Q = ["What is the value of {cat}?", "How high is the {cat} bar?", "What value does the {cat} bar show?",
           "Read the value for {cat} from the chart.", "What is the {title} for {cat}?",
           "How much is {cat} in the chart?", "According to the chart, what is the value of {cat}?",
           "What number does the bar for {cat} reach?", "Tell me the value of the {cat} bar.",
           "What does the chart show for {cat}?"]
MAX_Q = ["Which category has the highest value?", "Which bar is the tallest?", "Which category is the largest?",
         "Which label has the biggest value?", "Which bar is highest?", "What category leads the chart?",
         "Which category has the most {title}?", "Name the category with the largest bar.",
         "Which bar reaches the highest value?", "What is the top category in this chart?"]
MIN_Q = ["Which category has the lowest value?", "Which bar is the shortest?", "Which category is the smallest?",
         "Which label has the smallest value?", "Which bar is lowest?", "What category comes last in the chart?",
         "Which category has the least {title}?", "Name the category with the smallest bar.",
         "Which bar reaches the lowest value?", "What is the bottom category in this chart?"]

AXIS_MAXES = [10, 20, 50, 100, 200, 500, 1000]
SHORT_WORDS = [w for w in vocab.WORDS if len(w) <= 5]


def generate(rng: random.Random, policy: SizePolicy) -> Sample:
    w, h = pick_size(rng, policy, aspect=(0.8, 2.2))
    px = max(8, min(28, round(min(w, h) / 18)))
    title = rng.choice(vocab.CHART_TITLES)
    axis_max = rng.choice(AXIS_MAXES)
    labelled = rng.random() < 0.5
    left = int(text_width(str(axis_max), px)) + px
    top, bottom, right = int(px * (2.8 if labelled else 2.0)), int(px * 1.8), max(4, px // 2)
    plot_w, plot_h = w - left - right, h - top - bottom
    n = rng.randint(3, max(3, min(6, plot_w // (3 * px))))
    cats = rng.sample(SHORT_WORDS, n)
    while px > 8 and max(text_width(c, px) for c in cats) > 0.95 * plot_w / n:
        px -= 1
    values = _values(rng, n, axis_max, labelled)
    image = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    f = font(px)
    draw.text((left, max(1, px // 4)), title, font=f, fill=(0, 0, 0))
    base = top + plot_h
    for k in range(6):  # gridlines and y tick labels at 0, 1/5 ... 5/5 of axis_max
        y = base - round(plot_h * k / 5)
        draw.line([left, y, left + plot_w, y], fill=(215, 215, 215))
        label = str(axis_max * k // 5)
        draw.text((left - 4 - text_width(label, px), y - px // 2), label, font=f, fill=(60, 60, 60))
    draw.line([left, top, left, base], fill=(0, 0, 0))
    draw.line([left, base, left + plot_w, base], fill=(0, 0, 0))
    slot = plot_w / n
    single = rng.random() < 0.5
    colour = rng.choice(list(COLOURS.values())[:8])
    bars = []
    for i, (cat, value) in enumerate(zip(cats, values)):
        x0 = left + slot * i + slot * 0.18
        x1 = left + slot * (i + 1) - slot * 0.18
        y0 = min(base - 1, base - round(plot_h * value / axis_max))  # at least one pixel tall
        draw.rectangle([x0, y0, x1, base - 1], fill=colour if single else list(COLOURS.values())[i % 8])
        bars.append([round(x0), y0, round(x1), base])
        cx = left + slot * (i + 0.5)
        draw.text((cx - text_width(cat, px) / 2, base + px // 3), cat, font=f, fill=(0, 0, 0))
        if labelled:
            draw.text((cx - text_width(str(value), px) / 2, y0 - px * 1.3), str(value), font=f, fill=(0, 0, 0))
    kind = rng.choices(["value", "max", "min"], weights=[6, 2, 2])[0]
    if kind == "value":
        i = rng.randrange(n)
        question, pid = phrase(rng, "chart/value", VALUE_Q, cat=cats[i], title=title.lower())
        answer = str(values[i])
    else:
        pick = max if kind == "max" else min
        i = values.index(pick(values))
        question, pid = phrase(rng, f"chart/{kind}", MAX_Q if kind == "max" else MIN_Q, title=title.lower())
        answer = cats[i]
    meta = {"kind": kind, "phrasing": pid, "category": cats[i], "values": dict(zip(cats, values)),
            "axis_max": axis_max, "labelled": labelled, "size": [w, h], "font_px": px,
            "plot": [left, top, left + plot_w, base], "bars": bars}
    return Sample("chart", question, answer, meta, image=image)


def _values(rng: random.Random, n: int, axis_max: int, labelled: bool) -> list[int]:
    """n integer values in (0, axis_max] with a unique maximum and minimum."""
    step = 1 if labelled else axis_max // 10
    while True:
        values = [step * rng.randint(1, axis_max // step) for _ in range(n)]
        if values.count(max(values)) == 1 and values.count(min(values)) == 1:
            return values

