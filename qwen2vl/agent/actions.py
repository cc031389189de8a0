"""GUI actions: one ``computer_use`` tool on Qwen2-VL's [0, 1000) grounding scale, parsed into :class:`Action`.

Coordinates are integers in [0, 1000), x first, relative to the screenshot the model saw (so they
survive smart_resize and any aspect change). A target may also be a box in the grounding syntax,
``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` or ``[x1, y1, x2, y2]``: its centre. Bins become pixels at
their centres with :func:`qwen2vl.agent.grounding.denormalize` (``(n + 0.5) * W / 1000``); a box's
centre is the midpoint of its corners' bin centres. A reply without a tool call but with a grounding
box is read as a click on it (what a grounding model answers to "click X").

Example call (hermes)::

    <tool_call>
    {"name": "computer_use", "arguments": {"action": "click", "coordinate": [512, 300]}}
    </tool_call>
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .grounding import BINS, denormalize, parse_regions
from .tools import parse_tool_output

ACTIONS = ("click", "double_click", "long_press", "type", "key", "scroll", "drag", "wait", "answer", "terminate")
POINTED = ("click", "double_click", "long_press", "scroll", "drag")  # actions with a target
DIRECTIONS = ("up", "down", "left", "right")
MAX_TEXT = 2000  # characters of a type/answer text
MAX_SECONDS = 30.0  # longest wait / long_press

_COORD = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": BINS - 1}, "minItems": 2,
          "maxItems": 2}
COMPUTER_USE = {"type": "function", "function": {
    "name": "computer_use",
    "description": ("Use the mouse and keyboard on the screen of the latest screenshot. Coordinates are integers "
                    "in [0, 1000): x from the left edge, y from the top edge, relative to the screenshot, x first."),
    "parameters": {"type": "object", "properties": {
        "action": {"type": "string", "enum": list(ACTIONS), "description": (
            "click / double_click / long_press at coordinate; type text (into the focused field); key: press "
            "keys such as 'Enter' or 'ctrl+a'; scroll the area at coordinate in direction; drag from coordinate "
            "to coordinate2; wait time seconds; answer the user with text; terminate the task with status.")},
        "coordinate": {**_COORD, "description": "(x, y) target on the [0, 1000) scale"},
        "coordinate2": {**_COORD, "description": "(x, y) end point of a drag"},
        "text": {"type": "string", "description": "the text to type or the answer"},
        "key": {"type": "string", "description": "keys to press, '+' between keys pressed together"},
        "direction": {"type": "string", "enum": list(DIRECTIONS)},
        "time": {"type": "number", "minimum": 0, "maximum": MAX_SECONDS,
                 "description": "seconds to wait or to hold a long press"},
        "status": {"type": "string", "enum": ["success", "failure"]},
    }, "required": ["action"]}}}


class ActionError(ValueError):
    """A reply that is not a usable action (a format error: the step does nothing)."""


@dataclass(frozen=True)
class Action:
    """One GUI action; points are (x, y) bins in [0, 1000) of the screenshot (``point2``: drag end)."""

    kind: str
    point: tuple[float, float] | None = None  # a box target gives a half-bin centre such as 150.5
    point2: tuple[float, float] | None = None
    text: str | None = None
    key: str | None = None
    direction: str | None = None
    seconds: float | None = None
    status: str | None = None

    def pixels(self, size: tuple[float, float], second: bool = False) -> tuple[float, float]:
        """The target in pixels of a screenshot of ``size`` (width, height), at the bin centre."""
        point = self.point2 if second else self.point
        if point is None:
            raise ActionError(f"{self.kind} has no {'coordinate2' if second else 'coordinate'}")
        return tuple(_to_pixels(v, size[i]) for i, v in enumerate(point))

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def call_arguments(self) -> dict:
        """The ``computer_use`` arguments that express this action (the inverse of :func:`action_from_call`)."""
        args: dict = {"action": self.kind}
        for name, value in (("coordinate", self.point), ("coordinate2", self.point2)):
            if value is not None:
                args[name] = [int(v) for v in value]
        for name, value in (("text", self.text), ("key", self.key), ("direction", self.direction),
                            ("time", self.seconds), ("status", self.status)):
            if value is not None:
                args[name] = value
        return args


def _to_pixels(value: float, extent: float) -> float:
    """A bin (or the midpoint of two, ``k + 0.5``) -> pixels at the bin centre(s)."""
    low = int(value)
    if value == low:
        return denormalize(low, extent)
    return (denormalize(low, extent) + denormalize(low + 1, extent)) / 2


def _point(value, field: str) -> tuple[float, float]:
    """[x, y], a box [x1, y1, x2, y2] or a grounding box string -> a point in bins."""
    if isinstance(value, str):
        regions = parse_regions(value)
        if not regions:
            raise ActionError(f"{field}: {value[:80]!r} is neither [x, y] nor a grounding box")
        value = list(regions[0].bounds)
    if not isinstance(value, (list, tuple)) or len(value) not in (2, 4):
        raise ActionError(f"{field} must be [x, y] or a box [x1, y1, x2, y2], got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or not 0 <= v < BINS:
            raise ActionError(f"{field}: {v!r} is not an integer in [0, {BINS})")
    value = [int(v) for v in value]
    if len(value) == 2:
        return (value[0], value[1])
    return ((value[0] + value[2]) / 2, (value[1] + value[3]) / 2)


def action_from_call(arguments: dict) -> Action:
    """The :class:`Action` of ``computer_use`` arguments; :class:`ActionError` naming the bad field."""
    if not isinstance(arguments, dict):
        raise ActionError("computer_use arguments must be an object")
    kind = arguments.get("action")
    if kind not in ACTIONS:
        raise ActionError(f"action {kind!r} is not one of {', '.join(ACTIONS)}")
    fields: dict = {"kind": kind}
    if kind in POINTED:
        if "coordinate" not in arguments:
            raise ActionError(f"{kind} needs a coordinate")
        fields["point"] = _point(arguments["coordinate"], "coordinate")
    if kind == "drag":
        if "coordinate2" not in arguments:
            raise ActionError("drag needs coordinate2 (the end point)")
        fields["point2"] = _point(arguments["coordinate2"], "coordinate2")
    if kind in ("type", "answer"):
        text = arguments.get("text")
        if not isinstance(text, str) or len(text) > MAX_TEXT:
            raise ActionError(f"{kind} needs a text string of at most {MAX_TEXT} characters")
        fields["text"] = text
    if kind == "key":
        key = arguments.get("key", arguments.get("text"))
        if not isinstance(key, str) or not key.strip():
            raise ActionError("key needs a key string such as 'Enter' or 'ctrl+a'")
        fields["key"] = key.strip()
    if kind == "scroll":
        direction = arguments.get("direction", "down")
        if direction not in DIRECTIONS:
            raise ActionError(f"scroll direction {direction!r} is not one of {', '.join(DIRECTIONS)}")
        fields["direction"] = direction
    if kind in ("wait", "long_press"):
        seconds = arguments.get("time", 1.0)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= MAX_SECONDS:
            raise ActionError(f"time must be a number of seconds in [0, {MAX_SECONDS}]")
        fields["seconds"] = float(seconds)
    if kind == "terminate":
        status = arguments.get("status", "success")
        if status not in ("success", "failure"):
            raise ActionError(f"terminate status {status!r} is not 'success' or 'failure'")
        fields["status"] = status
    return Action(**fields)


def action_from_text(text: str, tool_format: str = "hermes") -> Action:
    """The first ``computer_use`` call of a model reply, else a click on its first grounding box."""
    parsed = parse_tool_output(text, tool_format)
    for call in parsed.calls:
        if call["name"] == "computer_use":
            return action_from_call(call["arguments"])
    if parsed.calls:
        raise ActionError(f"no computer_use call (got {', '.join(c['name'] for c in parsed.calls)})")
    regions = parse_regions(text)
    if regions:
        x1, y1, x2, y2 = regions[0].bounds
        if all(0 <= v < BINS for v in (x1, y1, x2, y2)):
            return Action("click", point=((x1 + x2) / 2, (y1 + y2) / 2))
    raise ActionError("the reply has no computer_use call and no grounding box"
                      + (" (a tool call was malformed)" if parsed.malformed else ""))
