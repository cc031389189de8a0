"""Charts: simple vertical bar charts; read a bar's value, or name the highest or lowest bar.

Half the charts print each value above its bar; the others only have a y axis with gridlines, and
their values are multiples of ``axis_max / 10`` (on a gridline or halfway between two).
With the ``varied`` style: the font, a painted (light or dark) background and an ink that reads on
it, bar colours of any hue, gridlines off on some labelled charts, and category labels printed
upright or turned 90 degrees.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from . import vocabulary as vocab
from .common import COLOURS, Sample, SizePolicy, phrase, pick_size
from .style import PLAIN, Style, distance, hsv, ink_for, mix, paint, paste_text, region_luminance

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


def generate(rng: random.Random, policy: SizePolicy, style: Style = PLAIN) -> Sample:
    text_width = style.width
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
    ink, tick, grid, vertical = (0, 0, 0), (60, 60, 60), (215, 215, 215), False
    if style.plain:
        image = Image.new("RGB", (w, h), (255, 255, 255))
    else:
        longest = max(text_width(c, px) for c in cats)
        vertical = rng.random() < 0.35 and h - top - int(longest + px) >= 4 * px
        if vertical:
            bottom = int(longest + px)
            plot_h = h - top - bottom
        image, facts = paint(rng, (w, h))
        ink = ink_for(rng, region_luminance(image))
        tick, grid = mix(ink, facts["background_colour"], 0.25), mix(ink, facts["background_colour"], 0.75)
        grid = grid if not labelled or rng.random() < 0.6 else None
        style.note(ink=ink, gridlines=grid is not None, vertical_labels=vertical, **facts)
    draw = ImageDraw.Draw(image)
    f = style.font(px)
    draw.text((left, max(1, px // 4)), title, font=f, fill=ink)
    base = top + plot_h
    for k in range(6):  # gridlines and y tick labels at 0, 1/5 ... 5/5 of axis_max
        y = base - round(plot_h * k / 5)
        if grid is not None:
            draw.line([left, y, left + plot_w, y], fill=grid)
        else:
            draw.line([left - 3, y, left, y], fill=ink)  # a tick mark
        label = str(axis_max * k // 5)
        draw.text((left - 4 - text_width(label, px), y - px // 2), label, font=f, fill=tick)
    draw.line([left, top, left, base], fill=ink)
    draw.line([left, base, left + plot_w, base], fill=ink)
    slot = plot_w / n
    single = rng.random() < 0.5
    colour = rng.choice(list(COLOURS.values())[:8])
    palette = list(COLOURS.values())[:8]
    if not style.plain:
        palette = _palette(rng, image.getpixel((left + plot_w // 2, top + plot_h // 2)))
        colour = palette[0]
    bars = []
    for i, (cat, value) in enumerate(zip(cats, values)):
        x0 = left + slot * i + slot * 0.18
        x1 = left + slot * (i + 1) - slot * 0.18
        y0 = min(base - 1, base - round(plot_h * value / axis_max))  # at least one pixel tall
        draw.rectangle([x0, y0, x1, base - 1], fill=colour if single else palette[i % len(palette)])
        bars.append([round(x0), y0, round(x1), base])
        cx = left + slot * (i + 0.5)
        if vertical:  # turned 90 degrees, reading upwards, its end just below the axis
            mask_w = text_width(cat, px)
            paste_text(image, (cx - mask_w / 2, base + px // 3 + mask_w / 2 - px / 2), cat, f, ink, 90)
        else:
            draw.text((cx - text_width(cat, px) / 2, base + px // 3), cat, font=f, fill=ink)
        if labelled:
            draw.text((cx - text_width(str(value), px) / 2, y0 - px * 1.3), str(value), font=f, fill=ink)
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


def _palette(rng: random.Random, background) -> list[tuple[int, int, int]]:
    """Eight bar colours of evenly spread hues (random start), each far from the background."""
    h0, sat, val = rng.random(), rng.uniform(0.45, 1.0), rng.uniform(0.45, 0.95)
    colours = []
    for k in range(8):
        colour = hsv(h0 + k * 0.382, sat, val)  # golden-ratio steps: neighbours differ in hue
        if distance(colour, background) < 90:
            colour = hsv(h0 + k * 0.382, sat, 1.35 - val)
        colours.append(colour)
    return colours


def _values(rng: random.Random, n: int, axis_max: int, labelled: bool) -> list[int]:
    """n integer values in (0, axis_max] with a unique maximum and minimum."""
    step = 1 if labelled else axis_max // 10
    while True:
        values = [step * rng.randint(1, axis_max // step) for _ in range(n)]
        if values.count(max(values)) == 1 and values.count(min(values)) == 1:
            return values

