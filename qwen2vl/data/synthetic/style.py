"""Generator styles: ``plain`` (the original look) and ``varied`` (fonts, colours, backgrounds, layouts).

``plain`` draws nothing from the sample's rng and uses Pillow's bundled font, so it reproduces the
original samples byte for byte. ``varied`` draws every choice from the same per-sample rng (a
sample stays a pure function of ``(split, seed, index)``): a font from :data:`FACES` (matplotlib's
bundled TTFs, which the ``train`` extra installs, and Pillow's font), inks of any hue that pass a
contrast check against the pixels under the text, and backgrounds that are solid (light or dark),
linear gradients or faint textures, optionally with faint clutter. The ``train`` split never uses
the :data:`RESERVED_FONTS`; the ``eval`` split draws from all fonts, so held-out sets test unseen fonts.
"""

from __future__ import annotations

import colorsys
import functools
import importlib.util
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .common import BACKGROUNDS, font

STYLES = ("plain", "varied")
# Held out of the train split (the eval split uses them): an italic serif, an italic STIX, an oblique mono.
RESERVED_FONTS = ("DejaVu Serif Italic", "STIX General Italic", "DejaVu Sans Mono Oblique")
# Computer Modern's TeX encoding draws other glyphs for these ASCII characters: such texts fall back.
_TEX_UNSAFE = "\"'<>\\^_`{|}~"


@dataclass(frozen=True)
class Face:
    """A font: ``file`` in matplotlib's font folder (None: Pillow's bundled font); ``unsafe``: characters
    it draws wrongly (a text holding one is drawn in DejaVu Sans instead)."""

    name: str
    file: str | None
    unsafe: str = ""


FACES = (
    Face("Pillow Aileron", None),
    Face("DejaVu Sans", "DejaVuSans.ttf"), Face("DejaVu Sans Bold", "DejaVuSans-Bold.ttf"),
    Face("DejaVu Sans Oblique", "DejaVuSans-Oblique.ttf"),
    Face("DejaVu Sans Bold Oblique", "DejaVuSans-BoldOblique.ttf"),
    Face("DejaVu Serif", "DejaVuSerif.ttf"), Face("DejaVu Serif Bold", "DejaVuSerif-Bold.ttf"),
    Face("DejaVu Serif Italic", "DejaVuSerif-Italic.ttf"),
    Face("DejaVu Serif Bold Italic", "DejaVuSerif-BoldItalic.ttf"),
    Face("DejaVu Sans Mono", "DejaVuSansMono.ttf"), Face("DejaVu Sans Mono Bold", "DejaVuSansMono-Bold.ttf"),
    Face("DejaVu Sans Mono Oblique", "DejaVuSansMono-Oblique.ttf"),
    Face("DejaVu Sans Mono Bold Oblique", "DejaVuSansMono-BoldOblique.ttf"),
    Face("STIX General", "STIXGeneral.ttf"), Face("STIX General Bold", "STIXGeneralBol.ttf"),
    Face("STIX General Italic", "STIXGeneralItalic.ttf"),
    Face("STIX General Bold Italic", "STIXGeneralBolIta.ttf"),
    Face("Computer Modern Roman", "cmr10.ttf", _TEX_UNSAFE), Face("Computer Modern Sans", "cmss10.ttf", _TEX_UNSAFE),
    Face("Computer Modern Typewriter", "cmtt10.ttf", "'`"),
)
FALLBACK = FACES[1]
TRAIN_FACES = tuple(f for f in FACES if f.name not in RESERVED_FONTS)


@functools.lru_cache(maxsize=1)
def font_dir() -> Path:
    """matplotlib's bundled TTF folder (found without importing matplotlib)."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.origin:
        raise RuntimeError("style='varied' draws matplotlib's bundled fonts: install the train extra "
                           "(pip install 'qwen2vl[train]') or use style='plain'")
    return Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf"


@functools.lru_cache(maxsize=2048)
def load_font(file: str | None, px: int) -> ImageFont.FreeTypeFont:
    if file is None:
        return font(px)
    return ImageFont.truetype(str(font_dir() / file), int(px))


# ------------------------------------------------------------------------------------------ colours

def luminance(rgb) -> float:
    """WCAG relative luminance of an sRGB colour (0 black .. 1 white)."""
    lin = [(c / 255) / 12.92 if c <= 10 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast(a: float, b: float) -> float:
    """WCAG contrast ratio of two luminances (1 .. 21)."""
    return (max(a, b) + 0.05) / (min(a, b) + 0.05)


def hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def mix(a, b, t: float) -> tuple[int, int, int]:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def distance(a, b) -> float:
    return math.dist(a, b)


def random_colour(rng: random.Random, dark: bool | None = None, dark_tone=(0.7, 0.05, 0.35)) -> tuple[int, int, int]:
    """A colour of any hue: light (pale), dark, or either; ``dark_tone`` = (max saturation, min value,
    max value) of dark colours."""
    dark = rng.random() < 0.3 if dark is None else dark
    if dark:
        sat, lo, hi = dark_tone
        return hsv(rng.random(), rng.uniform(0.0, sat), rng.uniform(lo, hi))
    return hsv(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.82, 1.0))


def region_luminance(image: Image.Image, box=None) -> tuple[float, float]:
    """(darkest, lightest) luminance of ``image`` under ``box`` (grain smoothed over 4 px blocks)."""
    region = image.crop(tuple(int(v) for v in box)) if box else image
    if min(region.size) >= 16:
        region = region.reduce(4)
    lo, hi = region.convert("L").getextrema()
    return luminance((lo,) * 3), luminance((hi,) * 3)


def ink_for(rng: random.Random, lum: tuple[float, float], ratio: float = 4.5) -> tuple[int, int, int]:
    """An ink of random hue whose contrast with every luminance in ``lum`` = (lo, hi) is >= ``ratio``
    (black or white when no hue can reach it)."""
    lo, hi = lum
    dark_ok, light_ok = contrast(0.0, lo) >= ratio, contrast(1.0, hi) >= ratio
    if not (dark_ok or light_ok):
        return (0, 0, 0) if contrast(0.0, lo) >= contrast(1.0, hi) else (255, 255, 255)
    dark = dark_ok if not (dark_ok and light_ok) else rng.random() < 0.5
    h, s = rng.random(), rng.uniform(0.0, 1.0)
    for step in range(40):
        t = step / 39
        colour = hsv(h, s, rng.uniform(0.2, 0.6) * (1 - t)) if dark else mix(hsv(h, s, 1.0), (255, 255, 255), t)
        lum_c = luminance(colour)
        if min(contrast(lum_c, lo), contrast(lum_c, hi)) >= ratio:
            return colour
    return (0, 0, 0) if dark else (255, 255, 255)


def _segment_distance(p, a, b) -> float:
    """Distance from colour p to the segment of colours a..b (a gradient's range)."""
    ab = [y - x for x, y in zip(a, b)]
    den = sum(v * v for v in ab) or 1.0
    t = max(0.0, min(1.0, sum((pi - ai) * v for pi, ai, v in zip(p, a, ab)) / den))
    return distance(p, [ai + t * v for ai, v in zip(a, ab)])


# ------------------------------------------------------------------------------------------ backgrounds

def paint(rng: random.Random, size: tuple[int, int], avoid=(), min_dist: float = 0.0, dark: bool | None = None,
          clutter: float = 0.0, dark_tone=(0.7, 0.05, 0.35)) -> tuple[Image.Image, dict]:
    """A background: solid, linear gradient or faint texture of a random (light or dark) colour.

    Every pixel stays at least ``min_dist`` (RGB distance) from each colour in ``avoid``; with
    probability ``clutter`` faint lines, rings and boxes are scattered over it. Returns the image
    and its facts for the sample's meta.
    """
    w, h = size
    kind = rng.choices(["solid", "gradient", "texture"], weights=[4, 3, 3])[0]
    dark = rng.random() < 0.3 if dark is None else dark
    margin = 14.0 if kind == "texture" else 0.0
    for _ in range(100):
        a = random_colour(rng, dark, dark_tone)
        b = random_colour(rng, dark, dark_tone) if kind == "gradient" else a
        if all(_segment_distance(c, a, b) >= min_dist + margin for c in avoid):
            break
    else:  # no luck (a very crowded avoid list): the original light grey
        kind, a, b = "solid", BACKGROUNDS[2], BACKGROUNDS[2]
    facts = {"background": kind, "background_colour": list(a)}
    if kind == "solid":
        image = Image.new("RGB", size, a)
    else:
        np_rng = np.random.default_rng(rng.getrandbits(63))
        sw, sh = max(2, w // 8), max(2, h // 8)
        if kind == "gradient":
            angle = rng.uniform(0, 2 * math.pi)
            ys, xs = np.mgrid[0:sh, 0:sw]
            t = xs * math.cos(angle) * sh + ys * math.sin(angle) * sw
            t = (t - t.min()) / max(1e-9, t.max() - t.min())
            small = np.asarray(a, np.float32) + t[..., None] * (np.asarray(b, np.float32) - np.asarray(a, np.float32))
            facts["background_colour_2"] = list(b)
        else:
            blobs = np_rng.normal(0, 1, (max(2, sh // 4), max(2, sw // 4), 1)).astype(np.float32)
            blobs = np.asarray(Image.fromarray(blobs[..., 0]).resize((sw, sh), Image.BICUBIC))[..., None]
            small = np.asarray(a, np.float32) + 5.0 * blobs + np_rng.normal(0, 1.5, (sh, sw, 3))
        small = np.clip(small, 0, 255).astype(np.uint8)
        image = Image.fromarray(small, "RGB").resize(size, Image.BILINEAR)
    if clutter and rng.random() < clutter:
        facts["clutter"] = scatter_clutter(rng, image)
    return image, facts


def scatter_clutter(rng: random.Random, image: Image.Image) -> int:
    """Faint lines, rings and boxes (contrast about 1.1-1.3 with the paper): never text, never a shape colour."""
    w, h = image.size
    draw = ImageDraw.Draw(image)
    base = image.getpixel((w // 2, h // 2))
    tone = (0, 0, 0) if luminance(base) > 0.4 else (255, 255, 255)
    n = rng.randint(2, 10)
    for _ in range(n):
        colour = mix(base, mix(tone, random_colour(rng), 0.3), rng.uniform(0.06, 0.14))
        x1, y1 = rng.randrange(w), rng.randrange(h)
        x2, y2 = x1 + rng.randint(-w // 2, w // 2), y1 + rng.randint(-h // 2, h // 2)
        box = [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]
        what = rng.choice(["line", "ring", "box"])
        if what == "line":
            draw.line([x1, y1, x2, y2], fill=colour, width=rng.randint(1, 3))
        elif what == "ring":
            draw.ellipse(box, outline=colour, width=rng.randint(1, 2))
        else:
            draw.rectangle(box, outline=colour, width=1)
    return n


# ------------------------------------------------------------------------------------------ text

def text_mask(text: str, fnt: ImageFont.FreeTypeFont, angle: float = 0.0) -> tuple[Image.Image, tuple[int, int]]:
    """An ``L`` mask of ``text`` rotated by ``angle`` degrees (counter-clockwise) about its centre, and
    the offset of the mask's top-left from the unrotated text origin."""
    left, top, right, bottom = fnt.getbbox(text)
    pad = 2
    mask = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(mask).text((pad - left, pad - top), text, font=fnt, fill=255)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    rotated = mask.rotate(angle, resample=Image.BICUBIC, expand=True)
    return rotated, (round(cx - rotated.width / 2), round(cy - rotated.height / 2))


def paste_text(image: Image.Image, xy, text: str, fnt, fill, angle: float = 0.0) -> list[int]:
    """Draw ``text`` with its unrotated origin at ``xy``, rotated about its centre; returns its pixel
    box (x2, y2 exclusive) clipped to the image."""
    mask, (dx, dy) = text_mask(text, fnt, angle)
    x, y = int(round(xy[0] + dx)), int(round(xy[1] + dy))
    image.paste(Image.new("RGB", mask.size, tuple(fill)), (x, y), mask)
    x1, y1, x2, y2 = mask.getbbox() or (0, 0, 1, 1)
    w, h = image.size
    return [max(0, x + x1), max(0, y + y1), min(w, x + x2), min(h, y + y2)]


# ------------------------------------------------------------------------------------------ the style

@dataclass
class Style:
    """The look of one sample. ``plain`` changes nothing; otherwise ``face`` is its font and ``facts``
    collects what was drawn (font, background kind, ink...) for ``meta["style"]``."""

    name: str = "plain"
    face: Face = FACES[0]
    facts: dict = field(default_factory=dict)

    @property
    def plain(self) -> bool:
        return self.name == "plain"

    def face_for(self, text: str) -> Face:
        return FALLBACK if self.face.unsafe and any(c in self.face.unsafe for c in text) else self.face

    def font(self, px: int, text: str = "") -> ImageFont.FreeTypeFont:
        return font(px) if self.plain else load_font(self.face_for(text).file, int(px))

    def width(self, text: str, px: int) -> float:
        return self.font(px, text).getlength(text)

    def note(self, **facts) -> None:
        if not self.plain:
            self.facts.update({k: list(v) if isinstance(v, tuple) else v for k, v in facts.items()})


PLAIN = Style()


def style_mix(style: str | Mapping[str, float]) -> str | dict[str, float]:
    """A style name, or a mapping of style names to weights (a per-sample mix), checked."""
    if isinstance(style, str):
        if style not in STYLES:
            raise ValueError(f"style {style!r} is not one of {list(STYLES)}")
        return style
    mix = {str(k): v for k, v in dict(style).items()}
    unknown = sorted(set(mix) - set(STYLES))
    if unknown or not mix:
        raise ValueError(f"unknown or no styles {unknown} in a style mix; expected some of {list(STYLES)}")
    if any(not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0 for w in mix.values()) \
            or sum(mix.values()) <= 0:
        raise ValueError(f"style weights must be non-negative numbers with a positive sum, got {mix}")
    return {k: float(w) for k, w in mix.items()}


def pick_style(style: str | Mapping[str, float], split: str, seed: int, index: int) -> str:
    """The style of sample ``index``: ``style`` itself, or drawn from a mix with a random stream of its
    own, so that the sample's stream (and the sample) is what that one style gives.

    >>> pick_style({"plain": 0.5, "varied": 0.5}, "train", 0, 7) in STYLES
    True
    """
    style = style_mix(style)
    if isinstance(style, str):
        return style
    names = sorted(style)
    rng = random.Random(f"qwen2vl-synthetic-style:{split}:{int(seed)}:{int(index)}")
    return rng.choices(names, weights=[style[n] for n in names])[0]


def make_style(name: str, rng: random.Random, split: str) -> Style:
    """The style of one sample; ``varied`` draws its font from ``rng`` (train: without the reserved fonts)."""
    if name not in STYLES:
        raise ValueError(f"unknown generator style {name!r}; expected one of {list(STYLES)}")
    if name == "plain":
        return PLAIN
    font_dir()  # fails clearly without matplotlib
    face = rng.choice(TRAIN_FACES if split == "train" else FACES)
    return Style("varied", face, {"font": face.name})
