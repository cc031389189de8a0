"""The Qwen2-VL Instruct chat template, in Python (spec 3.1), plus what the processor needs from it.

Rendering a conversation gives the prompt text (one ``<|vision_start|><|image_pad|><|vision_end|>``
per image, ``<|video_pad|>`` per video), the media parts in order, and the character spans an
assistant loss covers (each assistant message's content and its ``<|im_end|>``)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n      (added if the first message
    <|im_start|>user\\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\\n
    <|im_start|>assistant\\nA cat.<|im_end|>\\n                         is not a system message)
    <|im_start|>assistant\\n                                           (add_generation_prompt)

Parts: ``{"type": "text", "text": ...}``; images as ``{"type": "image", "image": src}`` or
``{"type": "image_url", "image_url": {"url": src}}`` (or a plain url string); videos as
``{"type": "video", "video": src}`` or ``{"type": "video_url", "video_url": {"url": src}}``.
The Jinja template knows no ``video_url`` part and renders nothing for it; here it is a video.

Function calling (the Instruct template has no tools branch): ``render_chat(..., tools=[...],
tool_format="hermes" | "qwen")`` adds the tool block to the system turn and renders OpenAI-style
assistant ``tool_calls`` and ``tool`` messages; the formats are described in :mod:`qwen2vl.agent.tools`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..agent.tools import (
    FN_EXIT,
    FN_RESULT,
    RESPONSE_CLOSE,
    RESPONSE_OPEN,
    call_arguments,
    check_format,
    format_call,
    tools_block,
)
from .sources import MediaError

DEFAULT_SYSTEM = "You are a helpful assistant."
VISION_MARKERS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>")
_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


@dataclass
class MediaPart:
    """One image or video part of a conversation; ``options`` is the part dict (per-item overrides)."""

    kind: str  # "image" or "video"
    source: Any
    options: dict
    message_index: int
    part_index: int
    number: int  # 1-based, counted per kind over the conversation

    @property
    def where(self) -> str:
        return f"{self.kind} {self.number} (message {self.message_index}, part {self.part_index})"


@dataclass
class RenderedChat:
    text: str
    media: list[MediaPart] = field(default_factory=list)
    train_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) character spans


def classify_part(part: dict) -> str:
    """``"image"``, ``"video"``, ``"text"`` or ``"unknown"``, in the template's order of tests."""
    kind = part.get("type")
    if kind == "image" or "image" in part or "image_url" in part:
        return "image"
    if kind in ("video", "video_url") or "video" in part or "video_url" in part:
        return "video"
    if "text" in part:
        return "text"
    return "unknown"


def media_source(part: dict, kind: str, where: str):
    """The source of an image or video part: ``part[kind]``, else ``part[kind + "_url"]`` (a url string or
    ``{"url": ...}``); a clear error when there is none."""
    source = part.get(kind)
    if source is None:
        url = part.get(f"{kind}_url")
        source = url.get("url") if isinstance(url, dict) else url
    if source is None or (isinstance(source, str) and not source):
        raise MediaError(f"{where}: {kind} part has no source (expected '{kind}' or '{kind}_url')")
    return source


def _check_text(text, where: str) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{where}: text must be a string, got {type(text).__name__}")
    for marker in VISION_MARKERS:
        if marker in text:
            raise MediaError(f"{where}: text contains {marker!r}; images and videos must be given as "
                             f"parts, so placeholders would not match the media")
    return text


def render_chat(conversation: list[dict], add_generation_prompt: bool = True, add_vision_id: bool = False, *,
                tools: list | None = None, tool_format: str = "hermes",
                parallel_tool_calls: bool = False) -> RenderedChat:
    """Render a conversation with the Qwen2-VL Instruct template (see the module docstring).

    ``tools`` (OpenAI tool dicts) add the tool block of ``tool_format`` ("hermes" or "qwen", see
    :mod:`qwen2vl.agent.tools`) to the system turn, after the system text (or the default one) and a
    blank line. Assistant messages with OpenAI ``tool_calls`` and ``tool`` messages (content text or
    parts, images allowed) are rendered in that format whether or not ``tools`` are given.
    """
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError("a conversation must be a non-empty list of messages")
    check_format(tool_format)
    block = tools_block(tools, tool_format, parallel_tool_calls) if tools else None
    writer = _Writer(add_vision_id)
    turn_open = False  # the previous turn is still open (qwen: results or a reply continue the assistant turn)
    for m, message in enumerate(conversation):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"message {m} must be a dict with a string 'role'")
        role = message["role"]
        previous = conversation[m - 1]["role"] if m else None
        if m == 0 and role != "system":
            writer.text(f"<|im_start|>system\n{DEFAULT_SYSTEM}" + (f"\n\n{block}" if block else "") + "<|im_end|>\n")
        if role == "tool":
            nxt = conversation[m + 1].get("role") if m + 1 < len(conversation) and isinstance(conversation[m + 1], dict) else None
            turn_open = _tool_result(writer, message, m, (previous, nxt), tool_format, turn_open)
            continue
        if turn_open:
            if role == "assistant":  # qwen: the reply after the results, in the same turn
                writer.text(": ", train=True)
                _assistant_body(writer, message, m, tool_format, continued=True)
                if not _ends_open(conversation, m, tool_format):
                    writer.text("<|im_end|>", train=True)
                    writer.text("\n")
                    turn_open = False
                continue
            writer.text(": <|im_end|>\n")
            turn_open = False
        writer.text(f"<|im_start|>{role}\n")
        if role == "assistant":
            _assistant_body(writer, message, m, tool_format, continued=False)
            if _ends_open(conversation, m, tool_format):
                turn_open = True
                continue
            writer.text("<|im_end|>", train=True)
        else:
            writer.content(message.get("content"), m)
            if role == "system" and m == 0 and block:
                writer.text(f"\n\n{block}")
            writer.text("<|im_end|>")
        writer.text("\n")
    if turn_open:  # qwen: the answer continues after the results (the caller's ": " is left to the model)
        if not add_generation_prompt:
            writer.text(": <|im_end|>\n")
    elif add_generation_prompt:
        writer.text("<|im_start|>assistant\n")
    return writer.rendered()


class _Writer:
    """Accumulates the text, the media parts in order and the trained character spans."""

    def __init__(self, add_vision_id: bool):
        self.out: list[str] = []
        self.length = 0
        self.add_vision_id = add_vision_id
        self.media: list[MediaPart] = []
        self.spans: list[tuple[int, int]] = []
        self.counts = {"image": 0, "video": 0}
        self.train = False  # the text being written is trained on (assistant content)

    def text(self, text: str, train: bool | None = None) -> None:
        train = self.train if train is None else train
        if train and text:
            if self.spans and self.spans[-1][1] == self.length:
                self.spans[-1] = (self.spans[-1][0], self.length + len(text))
            else:
                self.spans.append((self.length, self.length + len(text)))
        self.out.append(text)
        self.length += len(text)

    def content(self, content, m: int, train: bool = False) -> None:
        """A message's content: a string, or text / image / video parts."""
        self.train = train
        try:
            if content is None:
                content = ""
            if isinstance(content, str):
                self.text(_check_text(content, f"message {m}"))
            elif isinstance(content, (list, tuple)):
                for p, part in enumerate(content):
                    self._part(part, m, p)
            else:
                raise ValueError(f"message {m}: content must be a string or a list of parts")
        finally:
            self.train = False

    def _part(self, part, m: int, p: int) -> None:
        where = f"message {m}, part {p}"
        if not isinstance(part, dict):
            raise ValueError(f"{where}: a content part must be a dict, got {type(part).__name__}")
        kind = classify_part(part)
        if kind in ("image", "video"):
            self.counts[kind] += 1
            source = media_source(part, kind, where)
            self.media.append(MediaPart(kind, source, part, m, p, self.counts[kind]))
            if self.add_vision_id:
                self.text(f"{'Picture' if kind == 'image' else 'Video'} {self.counts[kind]}: ")
            self.text(_IMAGE if kind == "image" else _VIDEO)
        elif kind == "text":
            self.text(_check_text(part["text"], where))
        else:
            raise ValueError(f"{where}: unsupported content part (type {part.get('type')!r}); "
                             f"expected text, image, image_url, video or video_url")

    def rendered(self) -> RenderedChat:
        return RenderedChat("".join(self.out), self.media, self.spans)


def _has_content(content) -> bool:
    return bool(content) if isinstance(content, (str, list, tuple)) else content is not None


def _assistant_body(writer: _Writer, message: dict, m: int, tool_format: str, continued: bool) -> None:
    """Content, then each of ``tool_calls`` in the format (all trained on); ``continued``: after qwen results."""
    content = message.get("content")
    writer.content(content, m, train=True)
    calls = message.get("tool_calls") or []
    if not isinstance(calls, (list, tuple)):
        raise ValueError(f"message {m}: tool_calls must be a list")
    for c, call in enumerate(calls):
        name, arguments = call_arguments(call, f"message {m}, tool call {c}")
        separator = "\n" if (c or continued or _has_content(content)) else ""
        writer.text(separator + format_call(name, arguments, tool_format), train=True)
    if calls and tool_format == "qwen":
        writer.text(f"\n{FN_RESULT}", train=True)  # the model's stop string before the results


def _ends_open(conversation: list[dict], m: int, tool_format: str) -> bool:
    """qwen: an assistant turn with calls stays open for the results that follow it."""
    nxt = conversation[m + 1] if m + 1 < len(conversation) else None
    return (tool_format == "qwen" and bool(conversation[m].get("tool_calls")) and isinstance(nxt, dict)
            and nxt.get("role") == "tool")


def _tool_result(writer: _Writer, message: dict, m: int, neighbours: tuple[str | None, str | None],
                 tool_format: str, turn_open: bool) -> bool:
    """One ``tool`` message (``neighbours``: the roles before and after it); returns whether the turn stays open."""
    previous, nxt = neighbours
    if tool_format == "hermes":  # consecutive results share one user turn
        writer.text("<|im_start|>user\n" if previous != "tool" else "\n")
        writer.text(f"{RESPONSE_OPEN}\n")
        writer.content(message.get("content"), m)
        writer.text(f"\n{RESPONSE_CLOSE}")
        if nxt != "tool":
            writer.text("<|im_end|>\n")
        return False
    if not turn_open:
        raise ValueError(f"message {m}: in the qwen tool format a tool message must follow an assistant "
                         f"message with tool_calls (or another tool message)")
    writer.text(": " if previous != "tool" else f"\n{FN_RESULT}: ")
    writer.content(message.get("content"), m)
    if nxt != "tool":
        writer.text(f"\n{FN_EXIT}")
    return True


def fold_tools(conversation: list[dict], tools: list, tool_format: str = "hermes",
               parallel_tool_calls: bool = False) -> list[dict]:
    """A copy of ``conversation`` with the tool block in its system message (added if missing).

    ``render_chat(fold_tools(c, tools))`` is ``render_chat(c, tools=tools)``: for code that renders
    through a processor that takes messages only (the engine, a server).
    """
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError("a conversation must be a non-empty list of messages")
    block = "\n\n" + tools_block(tools, tool_format, parallel_tool_calls)
    first = conversation[0]
    if isinstance(first, dict) and first.get("role") == "system":
        content = first.get("content") or ""
        content = content + block if isinstance(content, str) else [*content, {"type": "text", "text": block}]
        return [{**first, "content": content}, *conversation[1:]]
    return [{"role": "system", "content": DEFAULT_SYSTEM + block}, *conversation]


def apply_chat_template(conversation: list[dict], add_generation_prompt: bool = True,
                        add_vision_id: bool = False) -> str:
    """The prompt text of ``conversation`` (same as transformers' ``apply_chat_template`` with this template)."""
    return render_chat(conversation, add_generation_prompt, add_vision_id).text
