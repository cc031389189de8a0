"""OpenAI requests -> a checked prompt and sampling values; responses and stream chunks.

Accepted content parts (``where`` in errors is ``messages[m].content[p]``)::

    {"type": "text", "text": "..."}
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}, "max_pixels": 200704}
    {"type": "video_url", "video_url": {"url": "clip.mp4"}, "fps": 1, "max_frames": 8}
    {"type": "image", "image": "cat.png", "min_pixels": 3136}                # Qwen style
    {"type": "video", "video": ["f0.png", "f1.png"], "nframes": 2}           # Qwen style, frame list

Per-item options (``min_pixels``, ``max_pixels``, ``fps``, ``max_frames`` ... see
requests._MediaOptions) sit on the part itself or inside its ``image_url``/``video_url`` object;
``min_pixels``, ``max_pixels``, ``fps``, ``max_frames`` at the top level of the request are
defaults for every item that does not set them. The field types and ranges are in requests.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache

from ..agent.tools import stop_strings
from ..processing import Batch, MediaAccess, MediaError
from ..processing.sources import inside_media_dir, url_scheme
from .errors import APIError, media_error
from .requests import ChatCompletionRequest, CompletionRequest, parse, unknown_fields
from .tool_calls import check_tool_choice, check_tool_messages, tool_message

log = logging.getLogger("qwen2vl.serve")
REQUEST_MEDIA_DEFAULTS = ("min_pixels", "max_pixels", "fps", "max_frames")


@dataclass
class ChatRequest:
    """A checked request: a conversation (chat) or a raw ``prompt`` (text completions)."""

    conversation: list[dict] | None
    sampling: dict = field(default_factory=dict)  # keyword overrides for Engine.sampling_params
    max_tokens: int | None = None
    stream: bool = False
    include_usage: bool = False
    model: str | None = None
    media_items: int = 0
    n: int = 1
    logprobs: int | None = None  # None: off; k: the chosen token's logprob and k alternatives
    schema: dict | None = None  # response_format: the JSON schema the answer must follow
    add_generation_prompt: bool = True
    prompt: str | None = None
    echo: bool = False
    characters: int = 0  # characters of text in the prompt (the cheap budget check)
    ignored: list[str] = field(default_factory=list)  # unknown top-level fields (logged, then ignored)
    tools: list[dict] | None = None  # the functions of the request's tools (tool_calls.py)
    tool_choice: str = "none"  # none | auto | required | function (then tool_name)
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    tool_format: str = "hermes"

    @property
    def reads_tools(self) -> bool:
        """The tools are in the prompt and the answer is read for calls."""
        return self.tool_choice != "none"

    def forced_tools(self) -> tuple[list[dict], list[str], bool] | None:
        """``(functions, their names in errors, several calls allowed)`` a constrained answer must call;
        None when not forced. ``required``: any tool, several if ``parallel_tool_calls``; named: one call."""
        if self.tool_choice == "required":
            return self.tools, [f"tools[{i}]" for i in range(len(self.tools))], self.parallel_tool_calls
        if self.tool_choice == "function":
            i = next(i for i, f in enumerate(self.tools) if f["name"] == self.tool_name)
            return [self.tools[i]], [f"tools[{i}]"], False
        return None

    def needs_constraint(self) -> bool:
        return self.schema is not None or self.forced_tools() is not None


# ------------------------------------------------------------------------------------------ parse

def parse_chat_request(body: dict | bytes, policy: MediaAccess, tool_format: str = "hermes") -> ChatRequest:
    """Check a chat-completion body (raw JSON bytes or a parsed object); APIError naming the first bad field.

    ``tool_format`` is the server's tool-call format (hermes or qwen, tool_calls.py)."""
    r = parse(ChatCompletionRequest, body)
    request = _common(r, r.max_completion_tokens if r.max_completion_tokens is not None else r.max_tokens)
    request.tools, request.tool_choice, request.tool_name = check_tool_choice(r)
    request.parallel_tool_calls = r.parallel_tool_calls is not False
    request.tool_format = tool_format
    if request.forced_tools() is not None and request.schema is not None:
        raise APIError(400, "response_format cannot be combined with a required or named tool_choice (both "
                            "constrain the answer)", "invalid_value", "response_format")
    if request.reads_tools:
        request.sampling["stop"] += stop_strings(tool_format)
    if r.top_logprobs is not None and not r.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "invalid_value", "top_logprobs")
    request.logprobs = (r.top_logprobs or 0) if r.logprobs else None
    request.add_generation_prompt = r.add_generation_prompt
    defaults = {k: getattr(r, k) for k in REQUEST_MEDIA_DEFAULTS if getattr(r, k) is not None}
    request.conversation = [_message(m, f"messages[{i}]", policy, defaults) for i, m in enumerate(r.messages)]
    check_tool_messages(request.conversation, tool_format)
    request.characters = sum(len(p["text"]) if isinstance(p, dict) else len(p) for m in request.conversation
                             for p in (m["content"] if isinstance(m["content"], list) else [m["content"]])
                             if isinstance(p, str) or p.get("type") == "text")
    request.media_items = sum(1 for m in request.conversation if isinstance(m["content"], list)
                              for p in m["content"] if p["type"] in ("image", "video"))
    if request.media_items > policy.max_items:
        raise APIError(413, f"the request has {request.media_items} images and videos, over the limit of "
                            f"{policy.max_items} per request", "too_many_media_items", "messages")
    return request


def parse_completion_request(body: dict | bytes) -> ChatRequest:
    """Check a text-completion body (``/v1/completions``: a raw prompt, no chat template)."""
    r = parse(CompletionRequest, body)
    request = _common(r, r.max_tokens)
    if r.suffix:
        raise APIError(400, "suffix is not supported by this server", "unsupported_parameter", "suffix")
    if r.best_of is not None and r.best_of != r.n:
        raise APIError(400, f"best_of must equal n ({r.n}) on this server", "unsupported_parameter", "best_of")
    request.prompt = r.prompt if isinstance(r.prompt, str) else r.prompt[0]
    request.characters = len(request.prompt)
    request.logprobs, request.echo = r.logprobs, r.echo
    return request


def _common(r, max_tokens: int | None) -> ChatRequest:
    """The fields chat and text completions share: sampling, streaming, structured output."""
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(r, name):
            raise APIError(400, f"{name} must be 0 (not supported; use repetition_penalty)", "invalid_value", name)
    if r.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", "unsupported_parameter", "logit_bias")
    stop = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
    sampling = {"temperature": r.temperature, "top_p": r.top_p, "min_p": r.min_p, "seed": r.seed,
                "top_k": 0 if r.top_k == -1 else r.top_k, "repetition_penalty": r.repetition_penalty,
                "stop": stop, "min_tokens": r.min_tokens, "ignore_eos": r.ignore_eos,
                "skip_special_tokens": r.skip_special_tokens}
    if r.stop_token_ids:
        sampling["stop_token_ids"] = list(r.stop_token_ids)
    request = ChatRequest(conversation=None, sampling=sampling, max_tokens=max_tokens, stream=r.stream,
                          include_usage=bool(r.stream_options and r.stream_options.include_usage), model=r.model,
                          n=r.n, ignored=unknown_fields(r))
    request.schema = _schema(r.response_format)
    if request.ignored:
        log.warning("ignoring unknown request fields: %s", ", ".join(request.ignored[:20]))
    return request


def _schema(response_format) -> dict | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "object"}
    spec = response_format.json_schema
    if spec is None or spec.schema_ is None:
        raise APIError(400, "response_format.json_schema.schema is required for type json_schema",
                       "missing_field", "response_format.json_schema.schema")
    return spec.schema_


def _message(message, where: str, policy: MediaAccess, defaults: dict) -> dict:
    content = message.content
    if content is None:
        if message.role != "assistant":
            raise APIError(422, f"{where}.content is required", "missing_field", f"{where}.content")
        content = ""
    if isinstance(content, list):
        content = [_part(part, f"{where}.content[{p}]", policy, defaults) for p, part in enumerate(content)]
    out = {"role": message.role, "content": content}
    if message.tool_calls:
        if message.role != "assistant":
            raise APIError(400, f"{where}.tool_calls: only assistant messages hold tool calls", "invalid_value",
                           f"{where}.tool_calls")
        out["tool_calls"] = [_call(c, f"{where}.tool_calls[{k}]") for k, c in enumerate(message.tool_calls)]
    return out


def _call(call, where: str) -> dict:
    """An earlier tool call with its arguments read (a JSON string in OpenAI's form, or an object)."""
    arguments = call.function.arguments
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as err:
            raise APIError(400, f"{where}.function.arguments is not valid JSON ({err.msg} at character {err.pos})",
                           "invalid_value", f"{where}.function.arguments") from None
        if not isinstance(arguments, dict):
            raise APIError(400, f"{where}.function.arguments must be a JSON object, got {type(arguments).__name__}",
                           "invalid_value", f"{where}.function.arguments")
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}


def _part(part, where: str, policy: MediaAccess, defaults: dict) -> dict:
    if part.type == "text":
        return {"type": "text", "text": part.text}
    media = "image" if part.type in ("image", "image_url") else "video"
    options = dict(defaults)
    source, source_where = getattr(part, part.type), f"{where}.{part.type}"
    if part.type.endswith("_url") and not isinstance(source, str):
        options.update(source.media_options())
        source, source_where = source.url, f"{source_where}.url"
    options.update(part.media_options())
    if isinstance(source, list):
        if not source:
            raise APIError(400, f"{source_where} is an empty list of frames", "invalid_value", source_where)
        for i, frame in enumerate(source):
            check_source(frame, f"{source_where}[{i}]", policy)
    else:
        check_source(source, source_where, policy)
    return {"type": media, media: source, **options}


def check_source(source: str, where: str, policy: MediaAccess) -> None:
    """403 for sources the policy forbids, 400 for malformed ones; the processor checks the rest."""
    if not source:
        raise APIError(400, f"{where} is empty", "invalid_value", where)
    scheme = url_scheme(source)
    if scheme == "data":
        return
    if "\x00" in source:
        raise APIError(400, f"{where} contains a NUL character", "invalid_value", where)
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise APIError(403, f"{where}: remote media is disabled on this server (start it with "
                                f"--allow-remote-media); send the image as a data URL instead",
                           "remote_media_disabled", where)
        return
    if scheme not in (None, "file"):
        raise APIError(400, f"{where}: unsupported URL scheme {scheme!r}; use data:, http(s): or a file path",
                       "invalid_value", where)
    if policy.allowed_media_dir is None and policy.local_files:
        return
    if policy.allowed_media_dir is None:
        raise APIError(403, f"{where}: local files are disabled on this server (start it with "
                            f"--allowed-media-dir DIR); send the media as a data URL instead",
                       "local_media_disabled", where)
    path = source[len("file://"):] if scheme == "file" else source
    if inside_media_dir(policy.allowed_media_dir, path) is None:
        raise APIError(403, f"{where}: {source[:200]!r} is outside the allowed media directory",
                       "media_not_allowed", where)


# -------------------------------------------------------------------------------------- prepare

@lru_cache(maxsize=8)
def longest_token_chars(tokenizer) -> int:
    """The most characters any one token stands for, so a text of C characters takes >= C / this tokens."""
    backend = tokenizer.backend
    added = [t.content for t in backend.get_added_tokens_decoder().values()]
    return max(max((len(t) for t in backend.get_vocab(with_added_tokens=False)), default=1),
               max((len(t) for t in added), default=1))


def check_characters(tokenizer, request: ChatRequest, budget: int) -> None:
    """Refuse a prompt whose text alone must take more than ``budget`` tokens, before tokenizing it."""
    least = math.ceil(request.characters / longest_token_chars(tokenizer))
    if least > budget:
        raise APIError(400, f"the prompt has {request.characters} characters of text, at least {least} tokens, "
                            f"over the budget of {budget} tokens", "context_length_exceeded", "messages")


def prepare(engine, request: ChatRequest, capacity: int, default_max_tokens: int, access: MediaAccess | None = None,
            constraint_factory=None):
    """Run the processor under the context budget; return ``(batch, SamplingParams)`` of choice 0.

    Without ``max_tokens`` the answer may take up to ``default_max_tokens`` or what is left of the
    ``capacity``-token context after the prompt, whichever is less. ``access`` is the media policy
    of this request; ``constraint_factory(request)`` makes the constraint of a row (its
    ``response_format`` schema or its forced tool calls, constraints.constraint_factory).
    """
    reserve = request.max_tokens or 1
    if reserve >= capacity:
        raise APIError(400, f"max_tokens {reserve} leaves no room for a prompt in the {capacity}-token context",
                       "context_length_exceeded", "max_tokens")
    check_characters(engine.processor.tokenizer, request, capacity - reserve)
    try:
        if request.prompt is not None:
            batch = _text_batch(engine.processor.tokenizer, request.prompt, capacity - reserve)
        else:
            tools = {"tools": request.tools, "tool_format": request.tool_format,
                     "parallel_tool_calls": request.parallel_tool_calls} if request.reads_tools else {}
            batch = engine.processor([request.conversation], add_generation_prompt=request.add_generation_prompt,
                                     max_tokens=capacity - reserve, access=access, **tools)
    except (MediaError, ValueError) as err:
        raise media_error(err) from None
    prompt = batch["input_ids"].shape[1]
    max_new = request.max_tokens or min(default_max_tokens, capacity - prompt)
    overrides = {k: v for k, v in request.sampling.items() if v is not None}
    if request.logprobs is not None:
        overrides["logprobs"] = request.logprobs
    if request.needs_constraint():
        if constraint_factory is None:
            param = "response_format" if request.schema is not None else "tool_choice"
            raise APIError(400, f"{param} needs constrained decoding, which is not available here",
                           "unsupported_parameter", param)
        overrides["constraint"] = constraint_factory(request)
    try:
        params = engine.sampling_params(max_new_tokens=max_new, **overrides)
    except (TypeError, ValueError) as err:
        raise APIError(400, str(err), "invalid_value") from None
    return batch, params


def choice_params(params, request: ChatRequest, index: int, constraint_factory=None):
    """The sampling parameters of choice ``index`` (seed + index, a fresh constraint)."""
    changes = {}
    if params.seed is not None:
        changes["seed"] = params.seed + index
    if request.needs_constraint():
        changes["constraint"] = constraint_factory(request)
    return dataclasses.replace(params, **changes) if changes else params


def _text_batch(tokenizer, prompt: str, budget: int) -> Batch:
    import torch

    ids = tokenizer.encode(prompt, add_special_tokens=False)
    if not ids:
        raise APIError(400, "prompt must not be empty", "invalid_value", "prompt")
    if len(ids) > budget:
        raise MediaError(f"the prompt takes {len(ids)} tokens, over the budget of {budget}", "over_budget")
    input_ids = torch.tensor([ids], dtype=torch.long)
    return Batch(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))


# ------------------------------------------------------------------------------------ responses

def completion_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(result) -> dict:
    """Usage of one result, or of a list of the choices of one request (the prompt counted once)."""
    results = result if isinstance(result, list) else [result]
    generated = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": results[0].prompt_tokens, "completion_tokens": generated,
            "total_tokens": results[0].prompt_tokens + generated}


def chat_logprobs(tokenizer, entries: list[dict] | None) -> dict | None:
    """OpenAI's chat ``logprobs`` object for the core's per-token entries."""
    if entries is None:
        return None

    def item(token_id: int, logprob: float) -> dict:
        raw = tokenizer.token_bytes(token_id)
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**item(e["token_id"], e["logprob"]), "top_logprobs": [item(t, lp) for t, lp in e["top"]]}
                        for e in entries]}


def text_logprobs(tokenizer, entries: list[dict] | None, offset: int = 0) -> dict | None:
    """The legacy completions ``logprobs`` object (tokens, token_logprobs, top_logprobs, text_offset)."""
    if entries is None:
        return None
    tokens = [tokenizer.token_bytes(e["token_id"]).decode("utf-8", "replace") for e in entries]
    offsets, at = [], offset
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{tokenizer.token_bytes(t).decode("utf-8", "replace"): lp for t, lp in e["top"]}
                             for e in entries], "text_offset": offsets}


def completion(ident: str, model: str, result, tokenizer=None, request: ChatRequest | None = None) -> dict:
    """A ``chat.completion`` object for one finished GenerationResult or the list of a request's choices;
    when the ``request`` reads tools, each answer's calls become ``tool_calls`` (tool_calls.py)."""
    results = result if isinstance(result, list) else [result]
    choices = []
    for i, r in enumerate(results):
        message, reason = {"role": "assistant", "content": r.text}, r.finish_reason
        if request is not None and request.reads_tools:
            message, reason = tool_message(r.text, r.finish_reason, request.tool_format)
        choices.append({"index": i, "message": message, "finish_reason": reason,
                        "logprobs": chat_logprobs(tokenizer, getattr(r, "logprobs", None)) if tokenizer else None})
    return {"id": ident, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(results)}


def text_completion(ident: str, model: str, results: list, tokenizer, request: ChatRequest) -> dict:
    """A ``text_completion`` object (``/v1/completions``)."""
    prefix = request.prompt if request.echo else ""
    choices = [{"index": i, "text": prefix + r.text, "finish_reason": r.finish_reason,
                "logprobs": text_logprobs(tokenizer, getattr(r, "logprobs", None), len(prefix))}
               for i, r in enumerate(results)]
    return {"id": ident, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(results)}


def chunk(ident: str, model: str, created: int, delta: dict | None, finish_reason: str | None = None,
          usage_counts: dict | None = None, choices: bool = True, index: int = 0, logprobs: dict | None = None,
          with_usage: bool = False, text: bool = False) -> dict:
    """One stream chunk (``chat.completion.chunk``, or ``text_completion`` when ``text``).

    ``choices=False`` gives the final usage-only chunk. ``with_usage`` (the client asked for
    usage) puts ``"usage": null`` on every other chunk, as OpenAI does.
    """
    choice = {"index": index, "logprobs": logprobs, "finish_reason": finish_reason}
    if text:
        choice["text"] = (delta or {}).get("content", "")
    else:
        choice["delta"] = delta or {}
    body = {"id": ident, "object": "text_completion" if text else "chat.completion.chunk", "created": created,
            "model": model, "choices": [choice] if choices else []}
    if usage_counts is not None or with_usage:
        body["usage"] = usage_counts
    return body
