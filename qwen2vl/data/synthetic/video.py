"""Videos: short clips (4, 6 or 8 frames) of shapes; direction of motion, which shape appears first or last.

Frames are meant to play at ``FPS`` (2 per second), the sampling rate Qwen's video loader uses by
default, so an mp4 written at that rate is sampled back frame for frame. Sides are even (yuv420p).
"""

from __future__ import annotations

import random

from .common import COLOURS, Sample, SizePolicy, phrase, pick_size
from .shapes import MIN_SIDE, SHAPES, background, look, place, render, shape_mask
from .style import PLAIN, Style

FPS = 2.0
MAX_VIDEO_SIDE = 480  # frames are cheaper than images: the long side stays within this
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

DIRECTION_Q = ["In which direction is the {label} moving?", "Which way does the {label} move?",
               "Where is the {label} going: left, right, up or down?", "What direction does the {label} travel in?",
               "Is the {label} moving left, right, up or down?", "Describe the direction of motion of the {label}.",
               "Which direction is the {label} heading?", "How does the {label} move across the video?",
               "Tell me the direction the {label} moves.", "In the video, which way is the {label} going?"]
FIRST_Q = ["Which shape appears first?", "What appears first in the video?", "Which object shows up first?",
           "What is the first shape to appear?", "Which shape comes first?", "Which object is shown before the others?",
           "Which shape appears earliest in the video?", "Name the shape that appears first.",
           "What is the first object you see in the clip?", "Which of the shapes appears first?"]
LAST_Q = ["Which shape appears last?", "What appears last in the video?", "Which object shows up last?",
          "What is the last shape to appear?", "Which shape comes last?", "Which object is shown after the others?",
          "Which shape appears latest in the video?", "Name the shape that appears last.",
          "What is the last object to show up in the clip?", "Which of the shapes appears last?"]


def generate(rng: random.Random, policy: SizePolicy, style: Style = PLAIN) -> Sample:
    outline, _ = look(rng, style)
    n_frames = rng.choice([4, 6, 8])
    w, h = pick_size(rng, policy, aspect=(0.6, 1.8), long_side=(policy.min_side, MAX_VIDEO_SIDE))
    size = (w - w % 2, h - h % 2)
    kind = rng.choices(["direction", "first", "last"], weights=[2, 1, 1])[0]
    if kind == "direction":
        frames, question, answer, meta = _direction(rng, size, n_frames, style, outline)
    else:
        frames, question, answer, meta = _order(rng, size, n_frames, kind, style, outline)
    meta.update(kind=kind, n_frames=n_frames, size=list(size), fps=FPS)
    return Sample("video", question, answer, meta, frames=frames)


def _direction(rng: random.Random, size: tuple[int, int], n_frames: int, style: Style, outline: int):
    w, h = size
    colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
    direction = rng.choice(sorted(DIRECTIONS))
    dx, dy = DIRECTIONS[direction]
    side = max(MIN_SIDE, int(min(w, h) * rng.uniform(0.12, 0.22)))
    travel_room = (w if dx else h) - side
    travel = int(travel_room * rng.uniform(0.5, 0.9))
    start = rng.randint(0, travel_room - travel)
    cross = rng.randint(0, (h if dx else w) - side)  # the fixed coordinate across the motion
    path = []
    for t in range(n_frames):
        along = start + round(travel * t / (n_frames - 1))
        if dx < 0 or dy < 0:
            along = start + travel - (along - start)
        path.append([along, cross] if dx else [cross, along])
    xs, ys = [p[0] for p in path], [p[1] for p in path]
    swept = [min(xs), min(ys), max(xs) + side, max(ys) + side]
    others = []
    for _ in range(rng.randint(0, 3)):
        while (spec := (rng.choice(sorted(COLOURS)), rng.choice(SHAPES))) == (colour, shape):
            pass
        others.append(spec)
    try:
        statics = place(rng, size, others, max(MIN_SIDE, side), occupied=(swept,))
    except ValueError:  # no room beside the path: a clip with the moving shape alone
        statics = []
    paper = background(rng, size, style)
    frames = [render(size, statics + [{"colour": colour, "shape": shape, "side": side, "xy": xy}], paper, outline)
              for xy in path]
    label = f"{colour} {shape}"
    question, pid = phrase(rng, "video/direction", DIRECTION_Q, label=label)
    _, (bx1, by1, bx2, by2) = shape_mask(shape, side)
    boxes = [[x + bx1, y + by1, x + bx2, y + by2] for x, y in path]
    meta = {"phrasing": pid, "label": label, "choices": sorted(DIRECTIONS), "boxes": boxes}
    return frames, question, direction, meta


def _order(rng: random.Random, size: tuple[int, int], n_frames: int, kind: str, style: Style, outline: int):
    k = rng.randint(2, min(4, n_frames))
    specs: list[tuple[str, str]] = []
    while len(specs) < k:
        spec = (rng.choice(sorted(COLOURS)), rng.choice(SHAPES))
        if spec not in specs:
            specs.append(spec)
    appear = sorted([0] + rng.sample(range(1, n_frames), k - 1))  # distinct frames; the first at frame 0
    objects = place(rng, size, specs, max(MIN_SIDE, int(min(size) * 0.25)))
    paper = background(rng, size, style)
    frames = [render(size, [o for o, a in zip(objects, appear) if a <= t], paper, outline) for t in range(n_frames)]
    labels = [f"{c} {s}" for c, s in specs]
    answer = labels[0] if kind == "first" else labels[-1]
    question, pid = phrase(rng, f"video/{kind}", FIRST_Q if kind == "first" else LAST_Q)
    meta = {"phrasing": pid, "label": answer, "choices": sorted(labels), "appear": dict(zip(labels, appear)),
            "boxes": {label: o["box"] for label, o in zip(labels, objects)}}
    return frames, question, answer, meta
