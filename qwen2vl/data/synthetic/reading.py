"""Reading: documents, receipts and signs with random words and strings to read back.

Text size is chosen in one of two modes. *Normal* text stays readable after the image is squashed
to 224x224 (the answer's font is at least 8 px there); *small* text is readable natively (at least
10 px) but under 5 px after that squash. Each sample's meta records the answer's ``font_px``, its
size after the squash ``text_px_224 = font_px * 224 / max(width, height)`` and
``small_text = text_px_224 < SMALL_TEXT_PX``, computed from what was actually drawn.
With the ``varied`` style pages get painted backgrounds (maybe faint clutter), inks of any hue
that pass a contrast check against the page under the text, random margins, and signs any colours
and sometimes a slight tilt (``text_box`` is then the tilted text's pixel box).
"""

from __future__ import annotations

import math
import random
import string

from PIL import Image, ImageDraw

from . import vocabulary as vocab
from .common import Sample, SizePolicy, phrase, pick_size
from .style import PLAIN, Style, hsv, ink_for, luminance, paint, paste_text, random_colour, region_luminance

SMALL_TEXT_PX = 6.0  # answer font size (px) after the forced 224x224 resize below which text is "small"
SMALL_RATE = 0.35  # share of reading samples that ask for small text (when the image can hold it)
NATIVE_MIN_PX = 10  # smallest font drawn for an answer
SMALL_MAX_PX_224 = 5.0
NORMAL_MIN_PX_224 = 8.0

TITLE_Q = ["What is the title of this document?", "What is the document's title?", "Read the title of the document.",
           "What heading is printed at the top?", "What does the heading say?",
           "Which title appears at the top of the page?", "Tell me the title of this page.",
           "What is written in the title?", "What is the heading of this document?",
           "Give the title shown on the document.", "What's the title?"]
FIELD_Q = ["What is the {field}?", "What is the {field} on this document?", "Read the {field} from the document.",
           "Which {field} is written on the page?", "What {field} does the document show?",
           "Find the {field} in the document. What is it?", "Tell me the {field}.",
           "What value is given for the {field}?", "What does the document say the {field} is?",
           "Look at the document: what is the {field}?", "What's the {field}?"]
TOTAL_Q = ["What is the total?", "What is the total amount on the receipt?", "How much is the total?",
           "What total does the receipt show?", "Read the total from the receipt.", "How much was paid in total?",
           "What is the grand total?", "What's the total on this receipt?", "Tell me the receipt total.",
           "What amount is printed next to TOTAL?"]
PRICE_Q = ["How much does the {item} cost?", "What is the price of the {item}?", "What was paid for the {item}?",
           "Read the price of the {item}.", "What does the receipt charge for {item}?",
           "How much is the {item} on this receipt?", "What amount is listed for {item}?",
           "Tell me the price of the {item}.", "What's the cost of the {item}?",
           "Find {item} on the receipt. What is its price?"]
STORE_Q = ["What is the name of the store?", "Which shop issued this receipt?", "What store is this receipt from?",
           "Read the store name at the top.", "What is the shop called?", "Where was this receipt printed?",
           "What business name is on the receipt?", "Tell me the name of the store.",
           "Which store does this receipt belong to?", "What's the store's name?"]
SIGN_Q = ["What does the sign say?", "Read the text on the sign.", "What is written on the sign?",
          "What text is shown in the image?", "Read the sign.", "What words are on the sign?",
          "Transcribe the text in the image.", "What does the text say?", "What is printed on the sign?",
          "Which words can you read on the sign?", "What's written here?"]

INKS = [(0, 0, 0), (30, 30, 30), (20, 30, 90), (60, 60, 60), (90, 20, 20)]
PAPERS = [(255, 255, 255), (250, 248, 240), (245, 245, 245), (255, 253, 235), (240, 244, 250)]
SIGN_STYLES = [((20, 110, 60), (255, 255, 255)), ((20, 60, 150), (255, 255, 255)), ((240, 200, 0), (0, 0, 0)),
               ((200, 30, 30), (255, 255, 255)), ((255, 255, 255), (0, 0, 0)), ((40, 40, 40), (255, 220, 0)),
               ((250, 130, 20), (0, 0, 0))]


def text_px_224(font_px: float, size: tuple[int, int]) -> float:
    """Font size after the forced 224x224 resize: the tighter of the two axis scales."""
    return font_px * 224 / max(size)


def pick_font_px(rng: random.Random, long_side: int, small: bool, cap: int) -> int:
    """A font size for the answer: small mode under 5 px at 224, normal mode at least 8 px there."""
    if small:
        hi = min(cap, math.ceil(SMALL_MAX_PX_224 * long_side / 224) - 1)
        return rng.randint(NATIVE_MIN_PX, max(NATIVE_MIN_PX, hi))
    lo = max(NATIVE_MIN_PX, math.ceil(NORMAL_MIN_PX_224 * long_side / 224))
    return rng.randint(lo, max(lo, min(cap, int(lo * 1.3))))


def small_possible(policy: SizePolicy) -> bool:
    return policy.max_side * SMALL_MAX_PX_224 / 224 >= NATIVE_MIN_PX + 1


def generate(rng: random.Random, policy: SizePolicy, style: Style = PLAIN) -> Sample:
    small = small_possible(policy) and rng.random() < SMALL_RATE
    kind = rng.choices(["document", "receipt", "sign"], weights=[4, 3, 3])[0]
    sample = {"document": document, "receipt": receipt, "sign": sign}[kind](rng, policy, small, style)
    if sample is None:  # nothing of the page fitted: a sign always does
        sample = sign(rng, policy, small, style)
    return _with_text_size(sample)


def words(rng: random.Random, policy: SizePolicy, style: Style = PLAIN) -> Sample:
    """The start of a reading curriculum: a sign filling the image, its short text (one to three sign
    words, a word or a code) in the largest font that fits. A ``reading`` sample of kind ``sign``."""
    return _with_text_size(sign(rng, policy, False, style))


def letters(rng: random.Random, policy: SizePolicy, style: Style = PLAIN) -> Sample:
    """The reading curriculum's first step: a sign filling the image with one to four random characters
    (capitals and digits, or lower-case letters), so the answer is spelt character by character and
    no word can be guessed from its length. A ``reading`` sample of kind ``sign``."""
    alphabet = string.ascii_uppercase + string.digits if rng.random() < 0.6 else string.ascii_lowercase
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
    return _with_text_size(sign(rng, policy, False, style, text))


def _with_text_size(sample: Sample) -> Sample:
    """``sample`` with the size facts of its answer's text in its meta (see the module's docstring)."""
    w, h = sample.image.size
    px = sample.meta["font_px"]
    sample.meta.update(size=[w, h], text_px_224=round(text_px_224(px, (w, h)), 2),
                       small_text=text_px_224(px, (w, h)) < SMALL_TEXT_PX)
    return sample


def _long_side(rng: random.Random, policy: SizePolicy, small: bool) -> tuple[int, int] | None:
    """Range for the long side: small text needs a large image to vanish at 224."""
    if small:
        need = math.ceil((NATIVE_MIN_PX + 1) * 224 / SMALL_MAX_PX_224)
        return (need, policy.max_side)
    return None


def _write_lines(draw: ImageDraw.ImageDraw, lines: list[tuple[str, int, tuple]], x: int, y: int,
                 max_w: int, max_y: int, spacing: float = 1.45,
                 style: Style = PLAIN) -> list[tuple[str, int, list[int]]]:
    """Draw (text, px, ink) lines down from (x, y); lines too wide are skipped. Returns what was drawn."""
    drawn = []
    for text, px, ink in lines:
        if y + px > max_y:
            break
        if text and style.width(text, px) <= max_w:
            draw.text((x, y), text, font=style.font(px, text), fill=ink)
            drawn.append((text, px, _box(draw, (x, y), text, px, style)))
        y += int(px * spacing)
    return drawn


def _box(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, px: int, style: Style = PLAIN) -> list[int]:
    x1, y1, x2, y2 = draw.textbbox(xy, text, font=style.font(px, text))
    return [int(x1), int(y1), int(x2), int(y2)]


def _page(rng: random.Random, size: tuple[int, int], margin: int, style: Style):
    """Varied style: a painted page, a random text area (x, y, max_w, max_y) and an ink that reads on it."""
    w, h = size
    image, facts = paint(rng, size, clutter=0.5)
    x = rng.randint(2, max(2, min(int(0.3 * w), 3 * margin)))
    y = rng.randint(2, max(2, min(int(0.3 * h), 3 * margin)))
    max_w, max_y = w - x - rng.randint(2, max(2, 2 * margin)), h - rng.randint(2, max(2, 2 * margin))
    ink = ink_for(rng, region_luminance(image, (x, y, x + max(1, max_w), max(y + 1, max_y))))
    style.note(ink=ink, **facts)
    return image, (x, y, max_w, max_y), ink


def document(rng: random.Random, policy: SizePolicy, small: bool, style: Style = PLAIN) -> Sample | None:
    w, h = pick_size(rng, policy, aspect=(0.6, 1.5), long_side=_long_side(rng, policy, small))
    margin = max(4, int(0.06 * min(w, h)))
    px = pick_font_px(rng, max(w, h), small, cap=max(NATIVE_MIN_PX, (h - 2 * margin) // 5))
    title_px = px if small else int(px * rng.uniform(1.0, 1.4))
    ink = rng.choice(INKS)
    title = rng.choice([rng.choice(vocab.DOC_TITLES),
                        f"{vocab.word(rng).capitalize()} {rng.choice(vocab.DOC_TITLES)}"])
    fields = rng.sample(sorted(vocab.FIELDS), k=rng.randint(2, 6))
    values = {f: vocab.FIELDS[f](rng) for f in fields}
    filler = [" ".join(vocab.word(rng) for _ in range(rng.randint(3, 9))) for _ in range(rng.randint(0, 6))]
    lines = [(title, title_px, ink), ("", px, ink)]
    field_lines = {f"{f.capitalize()}: {values[f]}": f for f in fields}
    lines += [(text, px, ink) for text in field_lines]
    lines += [(_trim(t, px, w - 2 * margin, style), px, ink) for t in filler]
    if style.plain:
        image = Image.new("RGB", (w, h), rng.choice(PAPERS))
        drawn = _write_lines(ImageDraw.Draw(image), lines, margin, margin, w - 2 * margin, h - margin)
    else:
        image, (x, y, max_w, max_y), ink = _page(rng, (w, h), margin, style)
        lines = [(text, p, ink) for text, p, _ in lines]
        drawn = _write_lines(ImageDraw.Draw(image), lines, x, y, max_w, max_y, style=style)
    asked = [(t, p, b) for t, p, b in drawn if t == title or t in field_lines]
    if not asked:
        return None
    text, used_px, box = rng.choice(asked)
    if text == title:
        question, pid = phrase(rng, "reading/title", TITLE_Q)
        answer = title
    else:
        field = field_lines[text]
        question, pid = phrase(rng, "reading/field", FIELD_Q, field=field)
        answer = values[field]
    meta = {"kind": "document", "phrasing": pid, "font_px": used_px, "text_box": box}
    return Sample("reading", question, answer, meta, image=image)


def _trim(text: str, px: int, max_w: int, style: Style = PLAIN) -> str:
    words = text.split()
    while words and style.width(" ".join(words), px) > max_w:
        words.pop()
    return " ".join(words)


def receipt(rng: random.Random, policy: SizePolicy, small: bool, style: Style = PLAIN) -> Sample | None:
    w, h = pick_size(rng, policy, aspect=(0.3, 0.8), long_side=_long_side(rng, policy, small))
    margin = max(3, int(0.05 * w)) if style.plain else rng.randint(2, max(3, int(0.12 * w)))
    text_width = style.width
    px = pick_font_px(rng, max(w, h), small, cap=max(NATIVE_MIN_PX, (h - 2 * margin) // 6))
    items = rng.sample(vocab.GROCERIES, k=rng.randint(2, 7))
    prices = {it: vocab.amount(rng, 0.5, 20) for it in items}
    store = f"{vocab.word(rng).upper()} {rng.choice(vocab.SHOP_KINDS)}"
    total = f"{sum(round(float(p) * 100) for p in prices.values()) / 100:.2f}"
    inner = w - 2 * margin
    # Shrink the font (honestly re-tagged later) until the widest row fits the paper.
    widest = max(text_width(f"{it}  {p}", px) for it, p in prices.items())
    while px > NATIVE_MIN_PX and max(widest, text_width(store, px), text_width(f"TOTAL  {total}", px)) > inner:
        px -= 1
        widest = max(text_width(f"{it}  {p}", px) for it, p in prices.items())
    if style.plain:
        image = Image.new("RGB", (w, h), rng.choice(PAPERS[:3]))
        ink = rng.choice(INKS[:2])
    else:
        image, facts = paint(rng, (w, h), clutter=0.4)
        ink = ink_for(rng, region_luminance(image, (margin, margin, w - margin, h - margin)))
        style.note(ink=ink, **facts)
    draw = ImageDraw.Draw(image)
    step = int(px * 1.45)
    rows = [(store, None, "store"), (vocab.date(rng), None, None), ("", None, None)]
    rows += [(it, prices[it], it) for it in items] + [("", None, None), ("TOTAL", total, "total")]
    y, drawn = margin, {}
    for left, right, key in rows:
        if y + px > h - margin:
            break
        if text_width(left, px) + (text_width(f"  {right}", px) if right else 0) <= inner:
            draw.text((margin, y), left, font=style.font(px, left), fill=ink)
            if right is not None:
                rx = w - margin - int(math.ceil(text_width(right, px)))
                draw.text((rx, y), right, font=style.font(px, right), fill=ink)
                drawn[key] = _box(draw, (rx, y), right, px, style)
            elif key:
                drawn[key] = _box(draw, (margin, y), left, px, style)
        y += step
    if not drawn:
        return None
    key = rng.choice(sorted(drawn))
    if key == "store":
        question, pid = phrase(rng, "reading/store", STORE_Q)
        answer = store
    elif key == "total":
        question, pid = phrase(rng, "reading/total", TOTAL_Q)
        answer = total
    else:
        question, pid = phrase(rng, "reading/price", PRICE_Q, item=key)
        answer = prices[key]
    meta = {"kind": "receipt", "phrasing": pid, "font_px": px, "text_box": drawn[key]}
    return Sample("reading", question, answer, meta, image=image)


def _sign_text(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.45:
        return " ".join(rng.choice(vocab.SIGN_WORDS) for _ in range(rng.randint(1, 3)))
    if r < 0.75:
        return vocab.word(rng).upper() if rng.random() < 0.6 else vocab.word(rng).capitalize()
    return vocab.code(rng)


def _fit_words(text: str, max_w: float, style: Style = PLAIN) -> str:
    """Drop trailing words until the text fits ``max_w`` at the smallest font (one word always stays)."""
    words = text.split()
    while len(words) > 1 and style.width(" ".join(words), NATIVE_MIN_PX) > max_w:
        words.pop()
    return " ".join(words)


def sign(rng: random.Random, policy: SizePolicy, small: bool, style: Style = PLAIN, text: str | None = None) -> Sample:
    """A sign filling the image, or (small text) a small sign somewhere in a large scene; its text drawn
    from sign words, words and codes unless given."""
    text = _sign_text(rng) if text is None else text
    bg, ink = rng.choice(SIGN_STYLES)
    text_width, angle = style.width, 0.0
    if not style.plain:
        bg = hsv(rng.random(), rng.uniform(0.0, 1.0), rng.uniform(0.15, 1.0))
        ink = ink_for(rng, (luminance(bg),) * 2)
        angle = rng.uniform(-6.0, 6.0) if not small and rng.random() < 0.4 else 0.0
        style.note(background="sign", background_colour=bg, ink=ink, angle=round(angle, 2))
    if small:
        w, h = pick_size(rng, policy, aspect=(0.6, 2.0), long_side=_long_side(rng, policy, True))
        text = _fit_words(text, 0.8 * w, style)
        px = pick_font_px(rng, max(w, h), True, cap=max(NATIVE_MIN_PX, h // 4))
        while px > NATIVE_MIN_PX and text_width(text, px) > 0.8 * w:
            px -= 1
        sky, ground = (170, 200, 235), rng.choice([(120, 150, 100), (140, 140, 140), (190, 170, 130)])
        if not style.plain:
            sky, ground = random_colour(rng), random_colour(rng)
        image = Image.new("RGB", (w, h), sky)
        draw = ImageDraw.Draw(image)
        horizon = int(h * rng.uniform(0.4, 0.8))
        draw.rectangle([0, horizon, w, h], fill=ground)
        pad = max(2, px // 2)
        tw = int(math.ceil(text_width(text, px)))
        sw, sh = tw + 2 * pad, px + 2 * pad
        x0 = rng.randint(0, max(0, w - sw - 1))
        y0 = rng.randint(0, max(0, h - sh - 1))
    else:
        w, h = pick_size(rng, policy, aspect=(0.8, 4.0))
        text = _fit_words(text, 0.84 * w, style)
        px = fit_sign_px(text, w, h, style)
        if angle:  # room for the tilt
            px = max(NATIVE_MIN_PX, int(px * 0.85))
        pad = max(2, int(0.08 * min(w, h)))
        x0, y0, sw, sh = 0, 0, w, h
        image = Image.new("RGB", (w, h), bg)
        draw = ImageDraw.Draw(image)
    draw.rectangle([x0, y0, x0 + sw - 1, y0 + sh - 1], fill=bg, outline=ink, width=max(1, px // 12))
    tw = text_width(text, px)
    _, top, _, bottom = style.font(px, text).getbbox(text)
    tx = x0 + int((sw - tw) / 2)
    ty = y0 + int((sh - (bottom + top)) / 2)
    if angle:
        box = paste_text(image, (tx, ty), text, style.font(px, text), ink, angle)
    else:
        draw.text((tx, ty), text, font=style.font(px, text), fill=ink)
        box = _box(draw, (tx, ty), text, px, style)
    question, pid = phrase(rng, "reading/sign", SIGN_Q)
    return Sample("reading", question, text, {"kind": "sign", "phrasing": pid, "font_px": px, "text_box": box},
                  image=image)


def fit_sign_px(text: str, w: int, h: int, style: Style = PLAIN) -> int:
    """The largest font whose text fits 84 % of the width and 60 % of the height (at least NATIVE_MIN_PX)."""
    px = max(NATIVE_MIN_PX, int(0.6 * h))
    while px > NATIVE_MIN_PX and style.width(text, px) > 0.84 * w:
        px = max(NATIVE_MIN_PX, min(px - 1, int(px * 0.84 * w / style.width(text, px))))
    return px
