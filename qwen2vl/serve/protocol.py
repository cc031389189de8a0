"""OpenAI chat-completion requests -> a checked conversation and sampling values; responses and chunks.

Accepted content parts (``where`` in errors is ``messages[m].content[p]``)::

    {"type": "text", "text": "..."}
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}, "max_pixels": 200704}
    {"type": "video_url", "video_url": {"url": "clip.mp4"}, "fps": 1, "max_frames": 8}
    {"type": "image", "image": "cat.png", "min_pixels": 3136}                # Qwen style
    {"type": "video", "video": ["f0.png", "f1.png"], "nframes": 2}           # Qwen style, frame list

Per-item options (``min_pixels``, ``max_pixels``, ``fps``, ``max_frames`` ... see MEDIA_OPTIONS) sit on
the part itself (or inside its ``image_url``/``video_url`` object); the same four keys at the top
level of the request are defaults for every item that does not set them. Extensions beyond
OpenAI's fields: ``top_k`` (-1 or 0 = off), ``min_p``, ``repetition_penalty``, ``ignore_eos``.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field

from ..processing import MediaError
from ..processing.sources import inside_media_dir
from .errors import APIError, media_error

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "image_url", "video_url", "image", "video")
MEDIA_OPTIONS = ("min_pixels", "max_pixels", "fps", "max_frames", "min_frames", "nframes", "total_pixels",
                 "resized_height", "resized_width", "video_start", "video_end")
REQUEST_MEDIA_DEFAULTS = ("min_pixels", "max_pixels", "fps", "max_frames")
NUMBER_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
INT_FIELDS = ("max_tokens", "max_completion_tokens", "top_k", "seed", "n")
ZERO_ONLY = ("frequency_penalty", "presence_penalty")  # accepted for compatibility, only at their neutral value
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "logit_bias",
               "top_logprobs", "audio", "modalities", "prediction")
IGNORED = ("user", "store", "metadata", "service_tier", "parallel_tool_calls", "id")
MAX_STOP = 16
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


@dataclass
class MediaPolicy:
    """Which media sources a request may name.

    ``local_files``: any local path may be read (offline batch). Otherwise local paths are readable
    only under ``allowed_media_dir`` (relative paths are taken relative to it), and not at all
    without one. ``allow_remote``: http(s) URLs may be fetched.
    """

    allow_remote: bool = False
    allowed_media_dir: str | None = None
    local_files: bool = False
    max_items: int = 16


@dataclass
class ChatRequest:
    conversation: list[dict]
    sampling: dict = field(default_factory=dict)  # keyword overrides for Engine.sampling_params
    max_tokens: int | None = None
    stream: bool = False
    include_usage: bool = False
    model: str | None = None
    media_items: int = 0


# ------------------------------------------------------------------------------------------ parse

def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object (400 when it is not JSON, 422 when it is not an object)."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}", "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(422, f"the request body must be a JSON object, got {_json_type(body)}", "invalid_type")
    return body


def parse_chat_request(body: dict, policy: MediaPolicy) -> ChatRequest:
    """Check every field of a chat-completion body; raise APIError naming the first bad one."""
    for key in body:
        if key in UNSUPPORTED:
            raise APIError(400, f"{key} is not supported by this server", "unsupported_parameter", key)
        if key not in ("messages", "model", "stream", "stream_options", "stop", "ignore_eos", "logprobs",
                       *NUMBER_FIELDS, *INT_FIELDS, *REQUEST_MEDIA_DEFAULTS, *IGNORED):
            raise APIError(400, f"unrecognized request argument: {key}", "unknown_parameter", key)
    if "messages" not in body:
        raise APIError(422, "messages is required", "missing_field", "messages")
    request = ChatRequest(conversation=[])
    if body.get("model") is not None:
        request.model = _typed(body, "model", str, "a string")
    request.stream = bool(_typed(body, "stream", bool, "true or false", default=False))
    options = _typed(body, "stream_options", dict, "an object", default=None) or {}
    request.include_usage = bool(_typed(options, "include_usage", bool, "true or false", default=False,
                                        name="stream_options.include_usage"))
    request.sampling, request.max_tokens = _sampling(body)
    defaults = {}
    for key in REQUEST_MEDIA_DEFAULTS:
        if body.get(key) is not None:
            defaults[key] = _media_option(body[key], key)
    request.conversation = _messages(body["messages"], policy, defaults)
    request.media_items = sum(1 for m in request.conversation if isinstance(m["content"], list)
                              for p in m["content"] if p["type"] in ("image", "video"))
    if request.media_items > policy.max_items:
        raise APIError(413, f"the request has {request.media_items} images and videos, over the limit of "
                            f"{policy.max_items} per request", "too_many_media_items", "messages")
    return request


def _sampling(body: dict) -> tuple[dict, int | None]:
    for key in NUMBER_FIELDS:
        if body.get(key) is not None:
            value = body[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise APIError(422, f"{key} must be a number, got {_json_type(value)}", "invalid_type", key)
            if not math.isfinite(value):
                raise APIError(400, f"{key} must be a finite number, got {value}", "invalid_value", key)
    for key in INT_FIELDS:
        if body.get(key) is not None and (isinstance(body[key], bool) or not isinstance(body[key], int)):
            raise APIError(422, f"{key} must be an integer, got {_json_type(body[key])}", "invalid_type", key)
    get = body.get
    checks = [
        ("temperature", lambda v: v >= 0, "a number >= 0"),
        ("top_p", lambda v: 0 < v <= 1, "a number in (0, 1]"),
        ("top_k", lambda v: v >= -1, "an integer >= 0 (0 or -1: off)"),
        ("min_p", lambda v: 0 <= v < 1, "a number in [0, 1)"),
        ("repetition_penalty", lambda v: v > 0, "a number > 0"),
        ("max_tokens", lambda v: v >= 1, "an integer >= 1"),
        ("max_completion_tokens", lambda v: v >= 1, "an integer >= 1"),
        ("n", lambda v: v == 1, "1 (one choice per request)"),
        ("frequency_penalty", lambda v: v == 0, "0 (not supported; use repetition_penalty)"),
        ("presence_penalty", lambda v: v == 0, "0 (not supported; use repetition_penalty)"),
    ]
    for key, ok, expected in checks:
        if get(key) is not None and not ok(get(key)):
            raise APIError(400, f"{key} must be {expected}, got {get(key)!r}", "invalid_value", key)
    if get("logprobs") not in (None, False):
        raise APIError(400, "logprobs is not supported by this server", "unsupported_parameter", "logprobs")
    ignore_eos = _typed(body, "ignore_eos", bool, "true or false", default=False)
    sampling = {"temperature": get("temperature"), "top_p": get("top_p"), "min_p": get("min_p"),
                "top_k": 0 if get("top_k") == -1 else get("top_k"), "seed": get("seed"),
                "repetition_penalty": get("repetition_penalty"), "stop": _stop(get("stop"))}
    if ignore_eos:
        sampling["stop_token_ids"] = []
    max_tokens = get("max_completion_tokens") if get("max_completion_tokens") is not None else get("max_tokens")
    return sampling, max_tokens


def _stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(422, f"stop must be a string or a list of strings, got {_json_type(stop)}", "invalid_type",
                       "stop")
    if len(stops) > MAX_STOP:
        raise APIError(400, f"stop has {len(stops)} strings, over the limit of {MAX_STOP}", "invalid_value", "stop")
    if any(not s for s in stops):
        raise APIError(400, "stop strings must not be empty", "invalid_value", "stop")
    return stops


def _messages(messages, policy: MediaPolicy, defaults: dict) -> list[dict]:
    if not isinstance(messages, list):
        raise APIError(422, f"messages must be a list of message objects, got {_json_type(messages)}",
                       "invalid_type", "messages")
    if not messages:
        raise APIError(400, "messages must not be empty", "invalid_value", "messages")
    conversation = []
    for m, message in enumerate(messages):
        where = f"messages[{m}]"
        if not isinstance(message, dict):
            raise APIError(422, f"{where} must be an object, got {_json_type(message)}", "invalid_type", where)
        if "role" not in message:
            raise APIError(422, f"{where}.role is required", "missing_field", f"{where}.role")
        role = message["role"]
        if not isinstance(role, str):
            raise APIError(422, f"{where}.role must be a string, got {_json_type(role)}", "invalid_type",
                           f"{where}.role")
        if role not in ROLES:
            raise APIError(400, f"{where}.role {role!r} is not one of {', '.join(ROLES)}", "invalid_value",
                           f"{where}.role")
        content = message.get("content")
        if content is None:
            if role != "assistant":
                raise APIError(422, f"{where}.content is required", "missing_field", f"{where}.content")
            content = ""
        if isinstance(content, list):
            content = [_part(part, f"{where}.content[{p}]", policy, defaults) for p, part in enumerate(content)]
        elif not isinstance(content, str):
            raise APIError(422, f"{where}.content must be a string or a list of parts, got {_json_type(content)}",
                           "invalid_type", f"{where}.content")
        conversation.append({"role": role, "content": content})
    return conversation


def _part(part, where: str, policy: MediaPolicy, defaults: dict) -> dict:
    if not isinstance(part, dict):
        raise APIError(422, f"{where} must be an object, got {_json_type(part)}", "invalid_type", where)
    kind = part.get("type")
    if kind is None:
        raise APIError(422, f"{where}.type is required", "missing_field", f"{where}.type")
    if not isinstance(kind, str):
        raise APIError(422, f"{where}.type must be a string, got {_json_type(kind)}", "invalid_type", f"{where}.type")
    if kind not in PART_TYPES:
        raise APIError(400, f"{where} has unknown type {kind!r}; expected one of {', '.join(PART_TYPES)}",
                       "unknown_part_type", f"{where}.type")
    if kind == "text":
        if "text" not in part:
            raise APIError(422, f"{where}.text is required", "missing_field", f"{where}.text")
        if not isinstance(part["text"], str):
            raise APIError(422, f"{where}.text must be a string, got {_json_type(part['text'])}", "invalid_type",
                           f"{where}.text")
        return {"type": "text", "text": part["text"]}
    media = "image" if kind in ("image", "image_url") else "video"
    options = dict(defaults)
    if kind.endswith("_url"):
        if kind not in part:
            raise APIError(422, f"{where}.{kind} is required", "missing_field", f"{where}.{kind}")
        holder = part[kind]
        if isinstance(holder, dict):
            options.update({k: _media_option(holder[k], k, f"{where}.{kind}") for k in MEDIA_OPTIONS if k in holder})
            if "url" not in holder:
                raise APIError(422, f"{where}.{kind}.url is required", "missing_field", f"{where}.{kind}.url")
            source, source_where = holder["url"], f"{where}.{kind}.url"
        else:
            source, source_where = holder, f"{where}.{kind}"
    else:
        if kind not in part:
            raise APIError(422, f"{where}.{kind} is required", "missing_field", f"{where}.{kind}")
        source, source_where = part[kind], f"{where}.{kind}"
    options.update({k: _media_option(part[k], k, where) for k in MEDIA_OPTIONS if k in part})
    if media == "video" and isinstance(source, list) and kind == "video":
        if not source:
            raise APIError(400, f"{source_where} is an empty list of frames", "invalid_value", source_where)
        for i, frame in enumerate(source):
            _check_source(frame, f"{source_where}[{i}]", policy)
    else:
        _check_source(source, source_where, policy)
    return {"type": media, media: source, **options}


def _media_option(value, key: str, where: str = "request") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(422, f"{where}: {key} must be a number, got {_json_type(value)}", "invalid_type", key)
    return value


def _check_source(source, where: str, policy: MediaPolicy) -> None:
    """403 for sources the policy forbids; the processor checks the rest (base64, decoding)."""
    if not isinstance(source, str):
        raise APIError(422, f"{where} must be a string (a data URL, URL or file path), got {_json_type(source)}",
                       "invalid_type", where)
    if not source:
        raise APIError(400, f"{where} is empty", "invalid_value", where)
    if source.startswith("data:"):
        return
    scheme = _SCHEME.match(source)
    if scheme and scheme.group(1).lower() in ("http", "https"):
        if not policy.allow_remote:
            raise APIError(403, f"{where}: remote media is disabled on this server (start it with "
                                f"--allow-remote-media); send the image as a data URL instead",
                           "remote_media_disabled", where)
        return
    if scheme and scheme.group(1).lower() != "file":
        raise APIError(400, f"{where}: unsupported URL scheme {scheme.group(1)!r}; use data:, http(s): or a "
                            f"file path", "invalid_value", where)
    if policy.local_files:
        return
    if policy.allowed_media_dir is None:
        raise APIError(403, f"{where}: local files are disabled on this server (start it with "
                            f"--allowed-media-dir DIR); send the media as a data URL instead",
                       "local_media_disabled", where)
    if inside_media_dir(policy.allowed_media_dir, source[len("file://"):] if scheme else source) is None:
        raise APIError(403, f"{where}: {source!r} is outside the allowed media directory", "media_not_allowed", where)


def _typed(obj: dict, key: str, kind: type, expected: str, default=None, name: str | None = None):
    if obj.get(key) is None:
        return default
    value = obj[key]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise APIError(422, f"{name or key} must be {expected}, got {_json_type(value)}", "invalid_type", name or key)
    return value


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    return "a list" if isinstance(value, list) else "an object" if isinstance(value, dict) else type(value).__name__


# -------------------------------------------------------------------------------------- prepare

def prepare(engine, request: ChatRequest, capacity: int, default_max_tokens: int):
    """Run the processor under the context budget; return ``(batch, SamplingParams)``.

    Without ``max_tokens`` the answer may take up to ``default_max_tokens`` or what is left of the
    ``capacity``-token context after the prompt, whichever is less.
    """
    reserve = request.max_tokens or 1
    if reserve >= capacity:
        raise APIError(400, f"max_tokens {reserve} leaves no room for a prompt in the {capacity}-token context",
                       "context_length_exceeded", "max_tokens")
    try:
        batch = engine.processor([request.conversation], add_generation_prompt=True, max_tokens=capacity - reserve)
    except (MediaError, ValueError) as err:
        raise media_error(err) from None
    prompt = batch["input_ids"].shape[1]
    max_new = request.max_tokens or min(default_max_tokens, capacity - prompt)
    try:
        params = engine.sampling_params(max_new_tokens=max_new, **request.sampling)
    except ValueError as err:
        raise APIError(400, str(err), "invalid_value") from None
    return batch, params


# ------------------------------------------------------------------------------------ responses

def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def completion(ident: str, model: str, result) -> dict:
    """A ``chat.completion`` object for one finished GenerationResult."""
    return {"id": ident, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "logprobs": None, "finish_reason": result.finish_reason}],
            "usage": usage(result)}


def chunk(ident: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
          usage_counts: dict | None = None, choices: bool = True) -> dict:
    """A ``chat.completion.chunk``; ``choices=False`` gives the final usage-only chunk."""
    body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
            if choices else []}
    if usage_counts is not None:
        body["usage"] = usage_counts
    return body
