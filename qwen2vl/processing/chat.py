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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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


def _media_source(part: dict, kind: str, where: str):
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


def render_chat(conversation: list[dict], add_generation_prompt: bool = True,
                add_vision_id: bool = False) -> RenderedChat:
    """Render a conversation with the Qwen2-VL Instruct template (see the module docstring)."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError("a conversation must be a non-empty list of messages")
    out: list[str] = []
    length = 0
    rendered = RenderedChat(text="")
    counts = {"image": 0, "video": 0}

    def emit(text: str) -> None:
        nonlocal length
        out.append(text)
        length += len(text)

    for m, message in enumerate(conversation):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"message {m} must be a dict with a string 'role'")
        role = message["role"]
        if m == 0 and role != "system":
            emit(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
        emit(f"<|im_start|>{role}\n")
        start = length
        content = message.get("content")
        if content is None:
            content = ""
        if isinstance(content, str):
            emit(_check_text(content, f"message {m}"))
        elif isinstance(content, (list, tuple)):
            for p, part in enumerate(content):
                where = f"message {m}, part {p}"
                if not isinstance(part, dict):
                    raise ValueError(f"{where}: a content part must be a dict, got {type(part).__name__}")
                kind = classify_part(part)
                if kind in ("image", "video"):
                    counts[kind] += 1
                    source = _media_source(part, kind, where)
                    rendered.media.append(MediaPart(kind, source, part, m, p, counts[kind]))
                    if add_vision_id:
                        emit(f"{'Picture' if kind == 'image' else 'Video'} {counts[kind]}: ")
                    emit(_IMAGE if kind == "image" else _VIDEO)
                elif kind == "text":
                    emit(_check_text(part["text"], where))
                else:
                    raise ValueError(f"{where}: unsupported content part (type {part.get('type')!r}); "
                                     f"expected text, image, image_url, video or video_url")
        else:
            raise ValueError(f"message {m}: content must be a string or a list of parts")
        emit("<|im_end|>")
        if role == "assistant":
            rendered.train_spans.append((start, length))
        emit("\n")
    if add_generation_prompt:
        emit("<|im_start|>assistant\n")
    rendered.text = "".join(out)
    return rendered


def apply_chat_template(conversation: list[dict], add_generation_prompt: bool = True,
                        add_vision_id: bool = False) -> str:
    """The prompt text of ``conversation`` (same as transformers' ``apply_chat_template`` with this template)."""
    return render_chat(conversation, add_generation_prompt, add_vision_id).text
