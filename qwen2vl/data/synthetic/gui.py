"""GUI screens: labelled buttons, links, tabs, text fields, checkboxes, menus and dialogs to click on.

A screen is a phone (portrait) or desktop (landscape) page in a light or dark theme: a title bar,
sometimes a tab row and a menu bar (one menu may be open), a form of fields, checkboxes, links and
buttons, and sometimes a modal dialog over a dimmed page (then only the dialog can be clicked).
Every label on a screen is unique, so an instruction names exactly one element.

Two kinds of sample (``meta.kind``):

* ``click``: "Click the "Save" button." -> one ``computer_use`` click at the centre of the target.
* ``multi``: "Type "alice" into the Username field, then press "Sign in"." -> three calls in one
  answer: click the field, type the text, click the button.

Answers are hermes tool calls (:func:`qwen2vl.agent.tools.format_call`) whose coordinates are the
box centres normalised with :func:`qwen2vl.agent.grounding.normalize` (``floor(x * 1000 / W)``).
``meta.steps`` holds each step with its pixel box (``box_px``, x2/y2 exclusive) for scoring.
With the ``varied`` style a screen has the sample's font, a tinted light or dark theme whose text
passes a contrast check, an accent of any hue (white text on it stays readable) and random margins.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from ...agent.grounding import normalize
from ...agent.tools import format_call
from .common import Sample, SizePolicy, pick_size
from .style import PLAIN, Style, contrast, hsv, ink_for, luminance, mix

BUTTONS = ["Submit", "OK", "Cancel", "Save", "Delete", "Next", "Back", "Sign in", "Sign up", "Continue", "Apply",
           "Close", "Send", "Upload", "Download", "Share", "Edit", "Done", "Retry", "Confirm", "Add", "Remove"]
TABS = ["Home", "Profile", "Settings", "Messages", "Files", "Photos", "Music", "Reports", "Orders", "Help",
        "Friends", "Videos"]
LINKS = ["Forgot password?", "Privacy policy", "Terms of service", "Learn more", "Contact us", "View details",
         "Sign out", "Read more", "Show all", "Get help"]
FIELDS = ["Username", "Email", "Password", "Search", "Name", "Phone", "City", "Address", "Amount", "Comment"]
CHECKS = ["Remember me", "Subscribe to newsletter", "I agree to the terms", "Enable notifications", "Dark mode",
          "Show hidden files", "Auto-save", "Keep me signed in"]
MENUS = {"File": ["New", "Open", "Save as", "Export", "Print", "Quit"], "Edit": ["Undo", "Redo", "Copy", "Paste"],
         "View": ["Zoom in", "Zoom out", "Full screen"], "Tools": ["Preferences", "Rename", "Extensions"]}
DIALOGS = ["Delete this file?", "Unsaved changes", "Confirm purchase", "Leave this page?", "Update available"]
VALUES = {"Username": ["alice", "bob42", "carol_w"], "Email": ["ann@example.com", "joe@mail.org"],
          "Password": ["hunter2", "s3cret!"], "Search": ["red shoes", "weather", "flights"], "Name": ["Ann Lee", "Tom"],
          "Phone": ["555 0142", "0612345678"], "City": ["Paris", "Lima", "Osaka"], "Address": ["12 Oak St"],
          "Amount": ["250", "19.99"], "Comment": ["Looks good", "Thanks!"]}

CLICK_Q = {"button": ['Click the "{x}" button.', 'Press "{x}".', 'Tap the {x} button.', 'Click on "{x}".'],
           "link": ['Click the "{x}" link.', 'Open the link "{x}".', 'Follow "{x}".', 'Tap "{x}".'],
           "tab": ['Switch to the "{x}" tab.', 'Open the {x} tab.', 'Click the tab "{x}".', 'Go to "{x}".'],
           "field": ['Click the {x} field.', 'Focus the "{x}" input.', 'Tap the {x} box.', 'Select the {x} field.'],
           "checkbox": ['Tick "{x}".', 'Check the box "{x}".', 'Click the checkbox for "{x}".', 'Toggle "{x}".'],
           "menu": ['Choose "{x}" in the menu.', 'Click the menu item "{x}".', 'Select "{x}".', 'Pick "{x}".'],
           "dialog": ['Press "{x}" in the dialog.', 'Click "{x}" in the popup.', 'Answer the dialog with "{x}".',
                      'Tap "{x}" in the dialog box.']}
MULTI_Q = ['Type "{v}" into the {f} field, then press "{b}".', 'Enter "{v}" as {f} and click "{b}".',
           'Fill in {f} with "{v}", then click the "{b}" button.', 'Write "{v}" in the {f} box and tap "{b}".']

THEMES = {"light": {"bg": (255, 255, 255), "panel": (242, 243, 245), "text": (25, 25, 28), "muted": (110, 110, 118),
                    "border": (190, 192, 198), "field": (255, 255, 255), "link": (20, 90, 200)},
          "dark": {"bg": (30, 31, 34), "panel": (45, 47, 52), "text": (235, 235, 238), "muted": (160, 160, 168),
                   "border": (90, 92, 100), "field": (22, 23, 26), "link": (120, 170, 255)}}
ACCENTS = [(37, 99, 235), (22, 163, 74), (220, 38, 38), (147, 51, 234), (234, 88, 12), (8, 145, 178), (219, 39, 119)]
SMALL, LARGE = 0.01, 0.04  # a target box below 1 % of the screen area is "small", above 4 % "large"


def size_class(box: list[int], size: tuple[int, int]) -> str:
    area = (box[2] - box[0]) * (box[3] - box[1]) / (size[0] * size[1])
    return "small" if area < SMALL else "large" if area > LARGE else "medium"


class _Screen:
    """Draws elements top to bottom and records each one's label, type and pixel box."""

    def __init__(self, rng: random.Random, size: tuple[int, int], theme: str, style: Style = PLAIN):
        self.rng, self.size, self.theme, self.colours, self.style = rng, size, theme, THEMES[theme], style
        w, h = size
        self.px = rng.randint(max(9, min(w, h) // 60), max(10, min(w, h) // 24))  # body font size
        self.accent = rng.choice(ACCENTS)
        self.bold = rng.random() < 0.4
        self.margin = max(6, w // 20)
        if not style.plain:
            self.colours, self.accent = varied_theme(rng, theme)
            self.margin = rng.randint(4, max(6, w // 10))
            style.note(background="solid", background_colour=self.colours["bg"], ink=self.colours["text"],
                       accent=self.accent)
        self.image = Image.new("RGB", size, self.colours["bg"])
        self.draw = ImageDraw.Draw(self.image)
        self.y = 0
        self.elements: list[dict] = []
        self.used: set[str] = set()

    def fresh(self, pool: list[str], k: int) -> list[str]:
        choices = [x for x in pool if x not in self.used]
        picked = self.rng.sample(choices, min(k, len(choices)))
        self.used.update(picked)
        return picked

    def text(self, xy, text: str, px: int, fill, bold: bool | None = None) -> list[int]:
        stroke = 1 if (self.bold if bold is None else bold) and px >= 12 else 0
        fnt = self.style.font(px, text)
        self.draw.text(xy, text, font=fnt, fill=fill, stroke_width=stroke, stroke_fill=fill)
        left, top, right, bottom = self.draw.textbbox(xy, text, font=fnt, stroke_width=stroke)
        return [int(left), int(top), int(right) + 1, int(bottom) + 1]

    def add(self, kind: str, label: str, box: list[int]) -> None:
        w, h = self.size
        box = [max(0, box[0]), max(0, box[1]), min(w, box[2]), min(h, box[3])]
        self.elements.append({"type": kind, "label": label, "box": box})

    def fits(self, height: int) -> bool:
        return self.y + height <= self.size[1] - self.margin // 2

    # -- parts
    def title_bar(self) -> None:
        w, _ = self.size
        bar = int(self.px * 2.4)
        self.draw.rectangle([0, 0, w, bar], fill=self.accent)
        self.text((self.margin, (bar - self.px) // 2), self.rng.choice(["Account", "Dashboard", "Checkout", "Notes",
                                                                       "Mail", "Store", "Editor"]),
                  int(self.px * 1.1), (255, 255, 255), bold=True)
        self.y = bar

    def menu_bar(self) -> dict | None:
        """A row of menu names; maybe one open as a dropdown (returned, drawn last)."""
        w, _ = self.size
        row = int(self.px * 1.9)
        self.draw.rectangle([0, self.y, w, self.y + row], fill=self.colours["panel"])
        x, opened = self.margin, None
        names = [n for n in MENUS if n not in self.used]
        open_name = self.rng.choice(names) if self.rng.random() < 0.6 else None
        for name in names:
            width = self.style.width(name, self.px)
            if x + width > w - self.margin:
                break
            self.used.add(name)
            self.text((x, self.y + (row - self.px) // 2), name, self.px, self.colours["text"])
            if name == open_name:
                opened = {"x": x - self.px // 2, "y": self.y + row, "items": self.fresh(MENUS[name], 6)}
            x += int(width + 1.6 * self.px)
        self.y += row
        return opened

    def tabs(self) -> None:
        w, _ = self.size
        row = int(self.px * 2.2)
        labels = self.fresh(TABS, self.rng.randint(2, 5))
        slot = (w - 2 * self.margin) / len(labels)
        if min(slot - 0.5 * self.px - self.style.width(t, self.px) for t in labels) < 0:
            return
        active = self.rng.randrange(len(labels))
        for k, label in enumerate(labels):
            x1, x2 = int(self.margin + k * slot), int(self.margin + (k + 1) * slot)
            colour = self.accent if k == active else self.colours["muted"]
            tx = x1 + (x2 - x1 - self.style.width(label, self.px)) / 2
            self.text((tx, self.y + (row - self.px) // 2), label, self.px, colour)
            if k == active:
                self.draw.rectangle([x1, self.y + row - 3, x2 - 1, self.y + row - 1], fill=self.accent)
            self.add("tab", label, [x1, self.y, x2, self.y + row])
        self.y += row + self.px // 2

    def field(self, label: str) -> None:
        w, _ = self.size
        height = int(self.px * 2.0)
        self.text((self.margin, self.y), label, int(self.px * 0.9), self.colours["muted"], bold=False)
        top = self.y + int(self.px * 1.3)
        width = self.rng.randint(int(0.45 * (w - 2 * self.margin)), w - 2 * self.margin)
        box = [self.margin, top, self.margin + width, top + height]
        self.draw.rounded_rectangle(box, radius=max(2, self.px // 4), fill=self.colours["field"],
                                    outline=self.colours["border"], width=1)
        self.add("field", label, [box[0], box[1], box[2] + 1, box[3] + 1])
        self.y = top + height + self.px

    def checkbox(self, label: str) -> None:
        side = max(8, int(self.px * 1.05))
        x, y = self.margin, self.y
        ticked = self.rng.random() < 0.4
        self.draw.rectangle([x, y, x + side, y + side], fill=self.accent if ticked else self.colours["field"],
                            outline=self.colours["border"])
        text = self.text((x + side + self.px // 2, y + (side - self.px) // 2), label, self.px, self.colours["text"],
                         bold=False)
        self.add("checkbox", label, [x, y, max(text[2], x + side + 1), max(text[3], y + side + 1)])
        self.y += side + self.px

    def link(self, label: str) -> None:
        box = self.text((self.margin, self.y), label, self.px, self.colours["link"], bold=False)
        self.draw.line([box[0], box[3], box[2] - 1, box[3]], fill=self.colours["link"])
        self.add("link", label, [box[0], box[1], box[2], box[3] + 1])
        self.y = box[3] + self.px

    def buttons(self, labels: list[str], top: int | None = None, x0: int | None = None, kind: str = "button",
                right: int | None = None) -> int:
        """A row of buttons (the first one filled); returns the row's bottom."""
        top = self.y if top is None else top
        x = self.margin if x0 is None else x0
        right = self.size[0] - self.margin if right is None else right
        pad_x, height = int(self.px * self.rng.uniform(0.8, 1.6)), int(self.px * self.rng.uniform(1.9, 2.8))
        for k, label in enumerate(labels):
            width = int(self.style.width(label, self.px) + 2 * pad_x)
            if x + width > right:
                break
            box = [x, top, x + width, top + height]
            filled = k == 0
            self.draw.rounded_rectangle(box, radius=self.rng.choice([0, 3, height // 2]),
                                        fill=self.accent if filled else self.colours["panel"],
                                        outline=self.accent if filled else self.colours["border"])
            ink = (255, 255, 255) if filled else self.colours["text"]
            self.text((x + pad_x, top + (height - self.px) // 2 - 1), label, self.px, ink)
            self.add(kind, label, [box[0], box[1], box[2] + 1, box[3] + 1])
            x += width + self.px
        return top + height

    def dropdown(self, menu: dict) -> None:
        """The open menu's list, over whatever lies below it; elements it covers are dropped."""
        item_h, w = int(self.px * 1.8), self.size[0]
        width = int(max(self.style.width(t, self.px) for t in menu["items"]) + 2 * self.px)
        x = min(menu["x"], w - width - 1)
        items = [t for k, t in enumerate(menu["items"]) if menu["y"] + (k + 1) * item_h < self.size[1] - 2]
        if not items or x < 0:
            return
        box = [x, menu["y"], x + width, menu["y"] + len(items) * item_h]
        self.elements = [e for e in self.elements if not _overlap(e["box"], box)]
        self.draw.rectangle(box, fill=self.colours["panel"], outline=self.colours["border"])
        for k, label in enumerate(items):
            top = box[1] + k * item_h
            self.text((x + self.px, top + (item_h - self.px) // 2), label, self.px, self.colours["text"], bold=False)
            self.add("menu", label, [x + 1, top, box[2], top + item_h])

    def dialog(self) -> None:
        """A modal over the dimmed page: afterwards only its buttons can be clicked."""
        w, h = self.size
        dim = Image.new("RGB", self.size, (0, 0, 0))
        self.image.paste(Image.blend(self.image, dim, 0.55))
        self.draw = ImageDraw.Draw(self.image)
        width = min(w - 2 * self.margin, int(self.px * 22))
        height = int(self.px * 7)
        x, y = (w - width) // 2, max(0, (h - height) // 2)
        self.draw.rounded_rectangle([x, y, x + width, y + height], radius=self.px // 2, fill=self.colours["bg"],
                                    outline=self.colours["border"])
        self.text((x + self.px, y + self.px), self.rng.choice(DIALOGS), int(self.px * 1.1), self.colours["text"], True)
        self.elements = []
        labels = self.fresh(["OK", "Cancel", "Yes", "No", "Discard", "Keep", "Later", "Install"], 2)
        self.buttons(labels, top=y + height - int(self.px * 3.2), x0=x + self.px, kind="dialog", right=x + width)


def varied_theme(rng: random.Random, theme: str) -> tuple[dict, tuple[int, int, int]]:
    """A tinted light or dark palette (text contrast >= 7, links >= 4.5) and an accent of any hue
    on which white text has contrast >= 4.5."""
    hue, tint = rng.random(), rng.uniform(0.0, 0.3)
    if theme == "dark":
        bg = hsv(hue, tint, rng.uniform(0.06, 0.22))
        panel, field = mix(bg, (255, 255, 255), 0.07), mix(bg, (0, 0, 0), 0.35)
    else:
        bg = hsv(hue, tint * 0.5, rng.uniform(0.92, 1.0))
        panel, field = mix(bg, (0, 0, 0), 0.05), rng.choice([(255, 255, 255), bg])
    lums = [luminance(c) for c in (bg, panel, field)]
    lum = (min(lums), max(lums))
    text = ink_for(rng, lum, 7.0)
    muted = mix(text, bg, 0.3)
    if min(contrast(luminance(muted), v) for v in lum) < 3.5:
        muted = text
    colours = {"bg": bg, "panel": panel, "text": text, "muted": muted, "border": mix(text, bg, 0.65),
               "field": field, "link": ink_for(rng, lum, 4.5)}
    return colours, ink_for(rng, (1.0, 1.0), 4.5)


def _overlap(a: list[int], b: list[int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def screen(rng: random.Random, policy: SizePolicy, style: Style = PLAIN) -> _Screen:
    """A random screen with its elements (phone or desktop; light or dark)."""
    phone = rng.random() < 0.45
    size = pick_size(rng, policy, aspect=(0.45, 0.62) if phone else (1.3, 1.8))
    s = _Screen(rng, size, rng.choice(sorted(THEMES)), style)
    s.title_bar()
    menu = s.menu_bar() if not phone and rng.random() < 0.4 else None
    if rng.random() < 0.5:
        s.tabs()
    s.y += s.px // 2
    rows = ["field"] * rng.randint(1, 3) + ["checkbox"] * rng.randint(0, 2) + ["link"] * rng.randint(0, 2)
    rng.shuffle(rows)
    for row in rows + ["buttons"]:
        need = {"field": 3.5, "checkbox": 2.1, "link": 2.1, "buttons": 3.0}[row] * s.px
        if not s.fits(int(need)):
            break
        if row == "buttons":
            s.buttons(s.fresh(BUTTONS, rng.randint(1, 3)))
        else:
            pool = {"field": FIELDS, "checkbox": CHECKS, "link": LINKS}[row]
            labels = s.fresh(pool, 1)
            if labels:
                getattr(s, row)(labels[0])
    if menu is not None:
        s.dropdown(menu)
    elif rng.random() < 0.15:
        s.dialog()
    return s


def _centre(box: list[int], size: tuple[int, int]) -> list[int]:
    return [normalize((box[0] + box[2]) / 2, size[0]), normalize((box[1] + box[3]) / 2, size[1])]


def click_call(box: list[int], size: tuple[int, int]) -> dict:
    return {"action": "click", "coordinate": _centre(box, size)}


def generate(rng: random.Random, policy: SizePolicy, style: Style = PLAIN) -> Sample:
    s = screen(rng, policy, style)
    while not s.elements:  # a screen too small for anything: draw another one
        s = screen(rng, policy, style)
    fields = [e for e in s.elements if e["type"] == "field"]
    buttons = [e for e in s.elements if e["type"] == "button"]
    if fields and buttons and rng.random() < 0.3:
        field, button = rng.choice(fields), rng.choice(buttons)
        value = rng.choice(VALUES[field["label"]])
        k = rng.randrange(len(MULTI_Q))
        question = MULTI_Q[k].format(v=value, f=field["label"], b=button["label"])
        calls = [click_call(field["box"], s.size), {"action": "type", "text": value}, click_call(button["box"], s.size)]
        steps = [{**calls[0], "box_px": field["box"]}, calls[1], {**calls[2], "box_px": button["box"]}]
        target, kind, pid = field, "multi", f"gui/multi/{k}"
    else:
        target = rng.choice(s.elements)
        templates = CLICK_Q[target["type"]]
        k = rng.randrange(len(templates))
        question = templates[k].format(x=target["label"])
        calls = [click_call(target["box"], s.size)]
        steps = [{**calls[0], "box_px": target["box"]}]
        kind, pid = "click", f"gui/{target['type']}/{k}"
    answer = "\n".join(format_call("computer_use", c) for c in calls)
    meta = {"kind": kind, "phrasing": pid, "element": target["type"], "label": target["label"],
            "size_class": size_class(target["box"], s.size), "size": list(s.size), "theme": s.theme, "steps": steps,
            "elements": s.elements}
    return Sample("gui", question, answer, meta, image=s.image)
