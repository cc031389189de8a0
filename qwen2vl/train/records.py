"""JSONL training records -> conversations in the Qwen message form, with media paths resolved.

Two record forms are accepted, one JSON object per line:

* Qwen / OpenAI messages::

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                               {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": "A cat."}]}

  (``{"type": "image_url", "image_url": {"url": "a.png"}}`` parts are read as images too);

* LLaVA / ShareGPT::

    {"images": ["a.png"], "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                                            {"from": "gpt", "value": "A cat."}]}

  Each ``<image>`` / ``<video>`` tag takes the next item of ``images`` / ``videos`` (``image`` /
  ``video`` hold a single item). Without any tag, all media go before the first user turn's text.

Relative media paths are relative to the JSONL file. A record that cannot be read raises
:class:`RecordError` with a message naming the problem; the caller adds ``file:line``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..processing.chat import classify_part, media_source
from ..processing.sources import MediaError, url_scheme

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "model": "assistant", "bot": "assistant"}
REMOTE = ("http", "https", "data", "file")  # URL schemes kept as they are (any case)
TAG = re.compile(r"<(image|video)>")


class RecordError(ValueError):
    """A record that cannot be used (malformed, missing media, too long, nothing to learn)."""


@dataclass
class Record:
    """One conversation and where it came from (``source`` = ``"name.jsonl:12"``)."""

    source: str
    messages: list[dict[str, Any]]


def read_jsonl(path: str | Path) -> list[tuple[str, Record | RecordError]]:
    """Every non-blank line of a JSONL file as ``(source, Record)`` or ``(source, RecordError)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    out = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            source = f"{path.name}:{number}"
            try:
                obj = json.loads(line)
                out.append((source, Record(source, to_messages(obj, path.parent))))
            except json.JSONDecodeError as e:
                out.append((source, RecordError(f"not valid JSON ({e.msg} at column {e.colno})")))
            except RecordError as e:
                out.append((source, e))
    return out


def to_messages(obj: Any, base: Path) -> list[dict[str, Any]]:
    """A record in either form -> Qwen messages with resolved media paths (checked to exist)."""
    if not isinstance(obj, dict):
        raise RecordError(f"a record must be a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = _qwen_messages(obj["messages"], base)
    elif "conversations" in obj:
        messages = _sharegpt_messages(obj, base)
    else:
        raise RecordError(f"a record needs 'messages' or 'conversations'; found keys {sorted(obj)}")
    if not any(m["role"] == "assistant" and _has_text(m["content"]) for m in messages):
        raise RecordError("no assistant message with text: nothing to learn from")
    return messages


def _has_text(content) -> bool:
    if isinstance(content, str):
        return bool(content)
    return any(part.get("type") == "text" and part["text"] for part in content)


def _role(raw: Any, where: str) -> str:
    if raw not in ROLES:
        raise RecordError(f"{where}: unknown role {raw!r}; expected one of {sorted(ROLES)}")
    return ROLES[raw]


def _qwen_messages(raw: Any, base: Path) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise RecordError("'messages' must be a non-empty list")
    messages = []
    for i, message in enumerate(raw):
        where = f"message {i}"
        if not isinstance(message, dict) or "content" not in message:
            raise RecordError(f"{where}: expected an object with 'role' and 'content'")
        role = _role(message.get("role"), where)
        content = message["content"]
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
        elif isinstance(content, list):
            messages.append({"role": role, "content": [_part(p, base, f"{where} part {j}")
                                                       for j, p in enumerate(content)]})
        else:
            raise RecordError(f"{where}: content must be a string or a list of parts")
    return messages


def _part(part: Any, base: Path, where: str) -> dict[str, Any]:
    """A part of a record as the processor takes it, media made absolute; kinds as the chat template
    tells them apart (:func:`classify_part`)."""
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict):
        raise RecordError(f"{where}: a part must be an object, got {type(part).__name__}")
    kind = classify_part(part)
    if kind in ("image", "video"):
        try:
            source = media_source(part, kind, f"{where} {kind}")
        except MediaError as err:
            raise RecordError(str(err)) from None
        extra = {k: v for k, v in part.items() if k not in ("type", "image", "image_url", "video", "video_url", "text")}
        return {"type": kind, kind: resolve_media(source, base, f"{where} {kind}"), **extra}
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise RecordError(f"{where}: 'text' must be a string")
        return {"type": "text", "text": part["text"]}
    raise RecordError(f"{where}: unknown part type {part.get('type')!r}; expected image, video or text")


def resolve_media(source: Any, base: Path, where: str) -> str | list[str]:
    """A media reference made absolute against ``base``; a list (video frames) resolves item by item."""
    if isinstance(source, list):
        if not source:
            raise RecordError(f"{where}: an empty list of frames")
        return [resolve_media(item, base, f"{where} frame {i}") for i, item in enumerate(source)]
    if not isinstance(source, str) or not source:
        raise RecordError(f"{where}: expected a path or URL, got {source!r}")
    if url_scheme(source) in REMOTE:
        return source
    path = Path(source).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise RecordError(f"{where}: file {source!r} not found (looked in {path.parent})")
    return str(path)


def _media_list(obj: dict, plural: str, singular: str) -> list[Any]:
    items = obj.get(plural, obj.get(singular, []))
    items = items if isinstance(items, list) else [items]
    if plural == "videos" and singular in obj and isinstance(obj[singular], list) and plural not in obj:
        items = [obj[singular]]  # "video": [frames...] is one video given as frames
    return items


def _sharegpt_messages(obj: dict, base: Path) -> list[dict[str, Any]]:
    turns = obj["conversations"]
    if not isinstance(turns, list) or not turns:
        raise RecordError("'conversations' must be a non-empty list")
    media = {"image": _media_list(obj, "images", "image"), "video": _media_list(obj, "videos", "video")}
    used = {"image": 0, "video": 0}
    tagged = any(isinstance(t, dict) and TAG.search(str(t.get("value", t.get("content", "")))) for t in turns)
    messages = []
    if isinstance(obj.get("system"), str):
        messages.append({"role": "system", "content": obj["system"]})
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(f"{where}: expected an object with 'from' and 'value'")
        role = _role(turn.get("from", turn.get("role")), where)
        text = turn.get("value", turn.get("content"))
        if not isinstance(text, str):
            raise RecordError(f"{where}: 'value' must be a string")
        parts: list[dict[str, Any]] = []
        if not tagged and role == "user" and not any(m["role"] == "user" for m in messages):
            for kind in ("image", "video"):
                for item in media[kind]:
                    parts.append({"type": kind, kind: resolve_media(item, base, f"{kind} {used[kind]}")})
                    used[kind] += 1
        pieces = TAG.split(text) if tagged else [text]  # odd positions hold the tag names
        for j, piece in enumerate(pieces):
            if j % 2:
                if used[piece] >= len(media[piece]):
                    raise RecordError(f"{where}: more <{piece}> tags than {piece}s ({len(media[piece])})")
                item = media[piece][used[piece]]
                parts.append({"type": piece, piece: resolve_media(item, base, f"{piece} {used[piece]}")})
                used[piece] += 1
            elif piece:
                parts.append({"type": "text", "text": piece})
        if role == "assistant" and all(p["type"] == "text" for p in parts):
            messages.append({"role": role, "content": "".join(p["text"] for p in parts)})
        else:
            messages.append({"role": role, "content": parts})
    for kind in ("image", "video"):
        if used[kind] != len(media[kind]):
            raise RecordError(f"{len(media[kind])} {kind}s listed but {used[kind]} placed "
                              f"(<{kind}> tags or a user turn to hold them are missing)")
    return messages
