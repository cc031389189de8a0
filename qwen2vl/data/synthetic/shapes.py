"""Counting and grounding: scenes of coloured shapes to count and to locate.

Shapes are drawn without anti-aliasing through a cached mask per (shape, side), so every drawn
pixel has exactly the shape's colour and each object's box is the mask's exact pixel bounding
box (edge coordinates: x2, y2 exclusive). Objects never overlap and keep a gap of at least 2 px.
Grounding answers use :func:`qwen2vl.agent.grounding.normalize_coords` (``floor(x * 1000 / W)``).
With the ``varied`` style the background is any solid, gradient or textured colour at least
``MIN_COLOUR_DIST`` from every named shape colour, shapes may have a darker outline (inside their box)
and counting/grounding shapes come in a wider range of sizes.
"""

from __future__ import annotations

import functools
import math
import random

from PIL import Image, ImageChops, ImageDraw, ImageFilter

from ...agent.grounding import format_box, normalize_coords
from .common import BACKGROUNDS, COLOURS, Sample, SizePolicy, phrase, pick_size, plural
from .style import PLAIN, Style, mix, paint

SHAPES = ["circle", "square", "triangle", "star", "diamond", "hexagon"]
MIN_SIDE = 12  # smallest shape drawn (px)
GAP = 2
MIN_COLOUR_DIST = 70  # varied backgrounds keep this RGB distance from every named shape colour

COUNT_Q = ["How many {things} are there?", "How many {things} are in the image?", "Count the {things}.",
           "How many {things} can you see?", "What is the number of {things}?", "Count the {things} in the picture.",
           "How many {things} does the image contain?", "Tell me how many {things} there are.",
           "How many {things} are shown?", "Give the number of {things} in the image.", "Number of {things}?",
           "How many {things}?"]
GROUND_Q = ["Where is the {label}?", "Locate the {label}.", "Find the {label} in the image.",
            "Give the bounding box of the {label}.", "Detect the {label}.", "Output the box of the {label}.",
            "Where is the {label} in this picture?", "Draw a box around the {label}.",
            "Point out the {label} with a bounding box.", "What are the coordinates of the {label}?",
            "Show me where the {label} is.", "Find the {label} and give its box."]


def _polygon(shape: str, s: int) -> list[tuple[float, float]] | None:
    """Vertices of ``shape`` inscribed in an s x s square of pixel centres 0..s-1 (None: ellipse/rect)."""
    c, r = (s - 1) / 2, (s - 1) / 2
    if shape == "triangle":
        return [(c, 0), (s - 1, s - 1), (0, s - 1)]
    if shape == "diamond":
        return [(c, 0), (s - 1, c), (c, s - 1), (0, c)]
    if shape == "hexagon":
        return [(c + r * math.cos(math.radians(a)), c + r * math.sin(math.radians(a))) for a in range(0, 360, 60)]
    if shape == "star":
        return [(c + (r if k % 2 == 0 else 0.45 * r) * math.sin(math.radians(36 * k)),
                 c - (r if k % 2 == 0 else 0.45 * r) * math.cos(math.radians(36 * k))) for k in range(10)]
    return None


@functools.lru_cache(maxsize=2048)
def shape_mask(shape: str, side: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """A binary ``L`` mask of the shape in a side x side square, and its exact pixel bbox (x2, y2 exclusive)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    points = _polygon(shape, side)
    if shape == "circle":
        draw.ellipse([0, 0, side - 1, side - 1], fill=255)
    elif shape == "square":
        draw.rectangle([0, 0, side - 1, side - 1], fill=255)
    else:
        draw.polygon(points, fill=255)
    return mask, mask.getbbox()


def place(rng: random.Random, size: tuple[int, int], specs: list[tuple[str, str]], max_side: int,
          occupied: tuple[list[int], ...] = (), min_side: int = MIN_SIDE) -> list[dict]:
    """Place (colour, shape) objects without overlap (also clear of ``occupied`` boxes).

    Each object gets a ``side``, its top-left ``xy`` and its exact pixel ``box``. Sides are drawn
    from [min_side, max_side]; an object that does not fit after many tries is retried smaller, and
    a scene that cannot hold MIN_SIDE objects raises ValueError.
    """
    w, h = size
    placed: list[dict] = []
    for colour, shape in specs:
        side = rng.randint(min(min_side, max_side), max(MIN_SIDE, max_side))
        while True:
            spot = _find_spot(rng, size, side, [*occupied, *(o["box"] for o in placed)])
            if spot is not None:
                break
            if side == MIN_SIDE:
                raise ValueError(f"cannot place {len(specs)} shapes in a {w}x{h} image")
            side = max(MIN_SIDE, int(side * 0.8))
        x, y = spot
        _, (bx1, by1, bx2, by2) = shape_mask(shape, side)
        placed.append({"colour": colour, "shape": shape, "side": side, "xy": [x, y],
                       "box": [x + bx1, y + by1, x + bx2, y + by2]})
    return placed


def _find_spot(rng: random.Random, size: tuple[int, int], side: int,
               boxes: list[list[int]]) -> tuple[int, int] | None:
    w, h = size
    if side > w or side > h:
        return None
    for _ in range(60):
        x, y = rng.randint(0, w - side), rng.randint(0, h - side)
        if all(x + side + GAP <= b[0] or b[2] + GAP <= x or y + side + GAP <= b[1] or b[3] + GAP <= y for b in boxes):
            return x, y
    return None


@functools.lru_cache(maxsize=4096)
def ring_mask(shape: str, side: int, width: int) -> Image.Image:
    """The outer ``width`` px of the shape's mask: its outline, inside its box."""
    mask, _ = shape_mask(shape, side)
    return ImageChops.subtract(mask, mask.filter(ImageFilter.MinFilter(2 * width + 1)))


def outline_width(outline: int, side: int) -> int:
    return min(outline, max(1, side // 10)) if outline else 0


def render(size: tuple[int, int], objects: list[dict], background, outline: int = 0) -> Image.Image:
    """The scene on ``background`` (a colour or an image of ``size``); ``outline``: px of darker edge."""
    image = background.copy() if isinstance(background, Image.Image) else Image.new("RGB", size, background)
    for o in objects:
        mask, _ = shape_mask(o["shape"], o["side"])
        x, y = o["xy"]
        area = (x, y, x + o["side"], y + o["side"])
        image.paste(COLOURS[o["colour"]], area, mask)
        if width := outline_width(outline, o["side"]):
            image.paste(mix(COLOURS[o["colour"]], (0, 0, 0), 0.45), area, ring_mask(o["shape"], o["side"], width))
    return image


def look(rng: random.Random, style: Style) -> tuple[int, float]:
    """(outline px, shape size scale) of a sample: (0, 1.0) for plain, drawn from ``rng`` for varied."""
    if style.plain:
        return 0, 1.0
    outline, scale = rng.choice([0, 0, 1, 2, 3]), rng.uniform(0.45, 1.0)
    style.facts.pop("font", None)  # no text in these scenes
    style.note(outline=outline)
    return outline, scale


def background(rng: random.Random, size: tuple[int, int], style: Style):
    """The scene's background: a light colour from BACKGROUNDS (plain) or a painted image (varied)."""
    if style.plain:
        return rng.choice(BACKGROUNDS)
    image, facts = paint(rng, size, avoid=list(COLOURS.values()), min_dist=MIN_COLOUR_DIST, dark=rng.random() < 0.25,
                         dark_tone=(0.3, 0.35, 0.6))  # dark scenes are slate: far from black and brown
    style.note(**facts)
    return image


def _max_side(size: tuple[int, int], n: int) -> int:
    """The largest shape side that leaves room for ``n`` objects in an image of ``size``."""
    w, h = size
    return max(MIN_SIDE, int(min(0.35 * min(w, h), math.sqrt(w * h / (4.0 * max(n, 1))))))


def _capacity(w: int, h: int) -> int:
    return max(1, min(12, (w * h) // (5 * (MIN_SIDE + GAP) ** 2)))


def _other(rng: random.Random, avoid) -> tuple[str, str]:
    """A random (colour, shape) for which ``avoid(colour, shape)`` is false."""
    while True:
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        if not avoid(colour, shape):
            return colour, shape


def count_target(mode: str, colour: str | None, shape: str | None):
    """What a counting question of ``mode`` counts: ``(matches(colour, shape) -> bool, its name)``;
    the name is None for "all" (the question says "shapes" or "objects")."""
    if mode == "combo":
        return (lambda c, s: c == colour and s == shape), plural(f"{colour} {shape}")
    if mode == "shape":
        return (lambda c, s: s == shape), plural(shape)
    if mode == "colour":
        return (lambda c, s: c == colour), f"{colour} shapes"
    return (lambda c, s: True), None


def counting(rng: random.Random, policy: SizePolicy, style: Style = PLAIN, most: tuple[int, int] = (9, 6),
             min_frac: float = 0.0) -> Sample:
    """Count the shapes of a colour, a kind, both, or all: up to ``most`` = (targets, others) objects,
    sides at least ``min_frac`` of the image's short side (and MIN_SIDE)."""
    outline, scale = look(rng, style)
    mode = rng.choices(["combo", "shape", "colour", "all"], weights=[4, 3, 2, 1])[0]
    colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
    size = pick_size(rng, policy, aspect=(0.5, 2.0))
    cap = _capacity(*size)
    k = 0 if (mode != "all" and rng.random() < 0.06) else rng.randint(1, min(most[0], cap))
    m = 0 if mode == "all" else rng.randint(0, max(0, min(most[1], cap - k)))
    matches, things = count_target(mode, colour, shape)
    things = things or rng.choice(["shapes", "objects"])
    targets = [(colour if mode in ("combo", "colour") else rng.choice(sorted(COLOURS)),
                shape if mode in ("combo", "shape") else rng.choice(SHAPES)) for _ in range(k)]
    specs = targets + [_other(rng, matches) for _ in range(m)]
    rng.shuffle(specs)
    objects = _place_scaled(rng, size, specs, scale, min_frac)
    image = render(size, objects, background(rng, size, style), outline)
    question, pid = phrase(rng, f"counting/{mode}", COUNT_Q, things=things)
    count = sum(matches(o["colour"], o["shape"]) for o in objects)
    target = {"colour": colour if mode in ("combo", "colour") else None,
              "shape": shape if mode in ("combo", "shape") else None}
    meta = {"kind": mode, "phrasing": pid, "count": count, "target": target, "size": list(size),
            "objects": _public(objects)}
    return Sample("counting", question, str(count), meta, image=image)


def grounding(rng: random.Random, policy: SizePolicy, style: Style = PLAIN, most: int = 7,
              min_frac: float = 0.0) -> Sample:
    """Locate the one shape of a colour and kind among up to ``most`` others (sides as in counting)."""
    outline, scale = look(rng, style)
    colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
    size = pick_size(rng, policy, aspect=(0.5, 2.0))
    m = rng.randint(0, max(0, min(most, _capacity(*size) - 1)))
    specs = [(colour, shape)] + [_other(rng, lambda c, s: c == colour and s == shape) for _ in range(m)]
    rng.shuffle(specs)
    objects = _place_scaled(rng, size, specs, scale, min_frac)
    image = render(size, objects, background(rng, size, style), outline)
    target = next(o for o in objects if (o["colour"], o["shape"]) == (colour, shape))
    label = f"{colour} {shape}"
    box = normalize_coords(target["box"], size)
    question, pid = phrase(rng, "grounding", GROUND_Q, label=label)
    meta = {"kind": "box", "phrasing": pid, "label": label, "box": list(box), "box_px": target["box"],
            "size": list(size), "objects": _public(objects)}
    return Sample("grounding", question, format_box(box, label), meta, image=image)


def _place_scaled(rng: random.Random, size: tuple[int, int], specs: list[tuple[str, str]], scale: float,
                  min_frac: float) -> list[dict]:
    """Place a counting/grounding scene: sides up to the room ``len(specs)`` objects leave (times the
    style's ``scale``), from at least ``min_frac`` of the short side (0: MIN_SIDE, the tasks' default)."""
    largest = max(MIN_SIDE, int(_max_side(size, len(specs)) * scale))
    if min_frac <= 0:
        return place(rng, size, specs, largest)
    smallest = max(MIN_SIDE, int(min(size) * min_frac))
    return place(rng, size, specs, max(largest, smallest), min_side=smallest)


def scenes(rng: random.Random, policy: SizePolicy, style: Style = PLAIN) -> Sample:
    """The step between ``basics`` and the full tasks: a counting or a grounding question about a scene
    of two to seven shapes (at most four targets and three others), each side at least an eighth of
    the image's short side. Its task name is that of the question asked."""
    if rng.random() < 0.5:
        return counting(rng, policy, style, most=(4, 3), min_frac=0.125)
    return grounding(rng, policy, style, most=3, min_frac=0.125)


def _public(objects: list[dict]) -> list[dict]:
    return [{"colour": o["colour"], "shape": o["shape"], "box": o["box"]} for o in objects]


COLOUR_Q = ["What colour is the shape?", "What is the colour of the shape?", "Which colour is the shape?",
            "What colour is the object?", "Name the colour of the shape."]
SHAPE_Q = ["What shape is this?", "Which shape is shown?", "What is the shape?", "Name the shape.",
           "What kind of shape is in the image?"]


def basics(rng: random.Random, policy: SizePolicy, style: Style = PLAIN) -> Sample:
    """Large, clear items for the start of training: the colour or the kind of one big shape, or a
    count of one to four big shapes (each side at least a quarter of the image's short side where they fit)."""
    outline, _ = look(rng, style)  # basics keep their big shapes
    size = pick_size(rng, policy, aspect=(0.6, 1.6))
    mode = rng.choice(["colour", "shape", "count"])
    n = rng.randint(1, 4) if mode == "count" else 1
    specs = [(rng.choice(sorted(COLOURS)), rng.choice(SHAPES)) for _ in range(n)]
    side = max(MIN_SIDE, int(min(size) * (0.6 if n == 1 else 0.3)))
    objects = place(rng, size, specs, side, min_side=max(MIN_SIDE, min(size) // 4))
    image = render(size, objects, background(rng, size, style), outline)
    if mode == "colour":
        question, pid = phrase(rng, "basics/colour", COLOUR_Q)
        answer = objects[0]["colour"]
    elif mode == "shape":
        question, pid = phrase(rng, "basics/shape", SHAPE_Q)
        answer = objects[0]["shape"]
    else:
        question, pid = phrase(rng, "basics/count", COUNT_Q, things=rng.choice(["shapes", "objects"]))
        answer = str(len(objects))
    meta = {"kind": mode, "phrasing": pid, "count": len(objects), "size": list(size), "objects": _public(objects)}
    return Sample("basics", question, answer, meta, image=image)
