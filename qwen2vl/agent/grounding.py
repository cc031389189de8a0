"""Grounding: Qwen2-VL references, boxes and quads in model output; coordinate spaces; drawing; IoU.

Output syntax (spec §3.3)::

    <|object_ref_start|>red circle<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>

with integers in [0, 1000), (x1, y1) the top-left and (x2, y2) the bottom-right corner. Quads are
``<|quad_start|>(x1,y1),(x2,y2),(x3,y3),(x4,y4)<|quad_end|>``.

Coordinate spaces, for an image of original size ``(W, H)`` that the processor resized to ``(Wr, Hr)``:

* **original pixels**: continuous; (0, 0) is the top-left corner of the top-left pixel and pixel
  column ``c`` spans ``[c, c + 1)``, so a box around columns 10..19 has ``x1 = 10, x2 = 20``.
* **resized pixels**: the same in the resized image. A resize maps edge to edge, so
  ``xr = x * Wr / W`` and ``yr = y * Hr / H`` exactly (:func:`rescale`).
* **normalised**: integers in [0, 1000): ``n = floor(x * 1000 / W + 1e-9)``, clamped to [0, 999]
  (so ``x = W`` gives 999). The 1e-9 (a billionth of a bin) changes nothing for integer pixel
  coordinates on images under 10^8 px, where it is exactly ``(x * 1000) // W``, and it absorbs the
  float round-off of a rescaled coordinate: because ``x / W == xr / Wr``, a point normalises to
  the same ``n`` from original or from resized pixels.
* **back from normalised**: the centre of the bin, ``x = (n + 0.5) * W / 1000``. So
  ``normalize(denormalize(n)) == n`` for every ``n`` and size, and
  ``|denormalize(normalize(x)) - x| <= W / 2000`` (half a bin; at most 0.6 px for a 1200 px side).

Worked example, W = 640: x = 100 -> floor(100000 / 640) = floor(156.25) = 156 -> (156.5 * 640) / 1000
= 100.16 px; in a resize to Wr = 644 the same point is 100 * 644 / 640 = 100.625 px, which also
normalises to floor(100625 / 644) = 156.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

BINS = 1000

Box = tuple[int, int, int, int]
Quad = tuple[int, int, int, int, int, int, int, int]


@dataclass(frozen=True)
class Region:
    """One grounded thing in model output: its label (or None) and a normalised box or quad."""

    label: str | None
    box: Box | None = None
    quad: Quad | None = None

    @property
    def bounds(self) -> Box:
        """The box, or the quad's axis-aligned bounding box."""
        if self.box is not None:
            return self.box
        xs, ys = self.quad[0::2], self.quad[1::2]
        return (min(xs), min(ys), max(xs), max(ys))


# ---------------------------------------------------------------------------------------------- parse

_ELEMENT = re.compile(
    r"<\|object_ref_start\|>(?P<ref>.*?)<\|object_ref_end\|>"
    r"|<\|box_start\|>(?P<box>.*?)<\|box_end\|>"
    r"|<\|quad_start\|>(?P<quad>.*?)<\|quad_end\|>",
    re.DOTALL,
)
_POINT = re.compile(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)")
_BARE_BOX = re.compile(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,?\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)")


def _points(body: str, count: int) -> tuple[int, ...] | None:
    """``(a,b),(c,d)...`` with exactly ``count`` points and nothing else but spaces and commas."""
    points = _POINT.findall(body)
    if len(points) != count or _POINT.sub("", body).replace(",", "").strip():
        return None
    return tuple(int(v) for p in points for v in p)


def parse_regions(text: str) -> list[Region]:
    """All boxes and quads in ``text``, in order, each with the label of the latest reference before it.

    Spaces anywhere inside the coordinates are accepted; a malformed box (wrong number of points,
    other text inside) is skipped. If the text has no box or quad tokens at all (output decoded
    with special tokens skipped), bare ``(x1,y1),(x2,y2)`` pairs are read as unlabelled boxes.

    >>> parse_regions("<|object_ref_start|>cat<|object_ref_end|><|box_start|>(1, 2), (30,40)<|box_end|>")
    [Region(label='cat', box=(1, 2, 30, 40), quad=None)]
    """
    regions: list[Region] = []
    label = None
    saw_token = False
    for m in _ELEMENT.finditer(text):
        if m.group("ref") is not None:
            label = " ".join(m.group("ref").split()) or None
            continue
        saw_token = True
        if m.group("box") is not None:
            coords = _points(m.group("box"), 2)
            if coords is not None:
                regions.append(Region(label, box=coords))
        else:
            coords = _points(m.group("quad"), 4)
            if coords is not None:
                regions.append(Region(label, quad=coords))
    if not saw_token:
        regions = [Region(None, box=tuple(int(v) for v in m.groups())) for m in _BARE_BOX.finditer(text)]
    return regions


def format_box(box: Sequence[int], label: str | None = None) -> str:
    """The Qwen2-VL text of a normalised box, with its reference when a label is given."""
    x1, y1, x2, y2 = (int(v) for v in box)
    ref = f"<|object_ref_start|>{label}<|object_ref_end|>" if label is not None else ""
    return f"{ref}<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"


# ---------------------------------------------------------------------------------- coordinate spaces

def normalize(value: float, extent: float) -> int:
    """Pixel coordinate -> bin in [0, 1000): ``floor(value * 1000 / extent + 1e-9)``, clamped."""
    if extent <= 0:
        raise ValueError(f"image extent must be positive, got {extent}")
    n = math.floor(value * BINS / extent + 1e-9)
    return min(max(n, 0), BINS - 1)


def denormalize(n: int, extent: float) -> float:
    """Bin -> pixel coordinate at the bin's centre: ``(n + 0.5) * extent / 1000``."""
    if not 0 <= n < BINS:
        raise ValueError(f"normalised coordinate {n} is outside [0, {BINS})")
    return (2 * n + 1) * extent / (2 * BINS)


def normalize_coords(coords: Sequence[float], size: tuple[int, int]) -> tuple[int, ...]:
    """Alternating x, y pixel coordinates (a box, a quad) -> normalised; ``size`` is (width, height)."""
    return tuple(normalize(v, size[i % 2]) for i, v in enumerate(coords))


def denormalize_coords(coords: Sequence[int], size: tuple[float, float]) -> tuple[float, ...]:
    """Alternating x, y normalised coordinates -> pixels of an image of ``size`` (width, height)."""
    return tuple(denormalize(int(v), size[i % 2]) for i, v in enumerate(coords))


def rescale(coords: Sequence[float], from_size: tuple[float, float],
            to_size: tuple[float, float]) -> tuple[float, ...]:
    """Alternating x, y pixel coordinates from one image size to another (original <-> resized)."""
    return tuple(v * to_size[i % 2] / from_size[i % 2] for i, v in enumerate(coords))


# ------------------------------------------------------------------------------------------------ IoU

def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; corner order does not matter.

    Two identical empty boxes score 1, any other pair with an empty union 0.

    >>> iou((0, 0, 10, 10), (5, 0, 15, 10))
    0.3333333333333333
    """
    ax1, ax2 = sorted((a[0], a[2]))
    ay1, ay2 = sorted((a[1], a[3]))
    bx1, bx2 = sorted((b[0], b[2]))
    by1, by2 = sorted((b[1], b[3]))
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    if union <= 0:
        return 1.0 if (ax1, ay1, ax2, ay2) == (bx1, by1, bx2, by2) else 0.0
    return inter / union


# -------------------------------------------------------------------------------------------- drawing

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128)]


def draw_regions(image: Image.Image, regions: Sequence[Region], *, normalized: bool = True) -> Image.Image:
    """A copy of ``image`` with each region outlined and labelled; one colour per distinct label.

    ``normalized=True``: the regions are in [0, 1000) (model output); otherwise in pixels of ``image``.
    """
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    w, h = out.size
    width = max(2, round(min(w, h) / 200))
    font = ImageFont.load_default(size=max(10, round(min(w, h) / 32)))
    colours: dict[str | None, tuple[int, int, int]] = {}
    for i, region in enumerate(regions):
        key = region.label if region.label is not None else f"#{i}"
        colour = colours.setdefault(key, PALETTE[len(colours) % len(PALETTE)])
        coords = region.box if region.box is not None else region.quad
        pts = denormalize_coords(coords, (w, h)) if normalized else tuple(float(v) for v in coords)
        if region.box is not None:
            x1, x2 = sorted(pts[0::2])
            y1, y2 = sorted(pts[1::2])
            draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        else:
            draw.polygon(list(zip(pts[0::2], pts[1::2])), outline=colour, width=width)
            x1, y1 = min(pts[0::2]), min(pts[1::2])
        if region.label:
            _draw_label(draw, region.label, (x1, y1), colour, font, (w, h))
    return out


def _draw_label(draw: ImageDraw.ImageDraw, text: str, corner: tuple[float, float], colour: tuple[int, int, int],
                font: ImageFont.FreeTypeFont, size: tuple[int, int]) -> None:
    """The label on a filled tag above the box corner (inside the image), in black or white for contrast."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = 2
    tw, th = right - left + 2 * pad, bottom - top + 2 * pad
    x = min(max(0, corner[0]), max(0, size[0] - tw))
    y = corner[1] - th if corner[1] - th >= 0 else min(corner[1], max(0, size[1] - th))
    draw.rectangle([x, y, x + tw, y + th], fill=colour)
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
    draw.text((x + pad - left, y + pad - top), text, font=font, fill=ink)
