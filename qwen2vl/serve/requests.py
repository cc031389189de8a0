"""Request bodies as pydantic models: every field typed and bounded; errors in OpenAI's shape.

Parsing is strict (``"5"`` is not an integer, ``true`` is not a number), numbers must be finite
(``NaN``/``Infinity`` are refused), ``null`` means absent, and JSON nested deeper than pydantic's
parser allows (200 levels) or holding a lone surrogate is refused as invalid JSON. Fields this
server does not know are ignored; the top-level ones are reported by ``unknown_fields`` so the
caller can log them (vLLM and OpenAI clients send many).

``validation_error`` turns a pydantic ValidationError into an APIError naming the parameter as a
path (``messages[0].content[1].image_url.url``): 422 for a missing field or a wrong JSON type,
400 for a value out of range.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from .errors import APIError

MAX_STOP = 16
MAX_STOP_CHARS = 4096  # characters per stop string (each is matched against the text at every token)
MAX_MESSAGES = 8192
MAX_PARTS = 1024
MAX_STOP_TOKEN_IDS = 64
MAX_N = 16
MAX_TOP_LOGPROBS = 20
INT64 = 2 ** 63 - 1

Positive = Annotated[float, Field(gt=0, le=1e12)]
NonNegative = Annotated[float, Field(ge=0, le=1e12)]
Size = Annotated[int, Field(ge=1, le=1 << 16)]
Frames = Annotated[int, Field(ge=1, le=1 << 16)]


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class _MediaOptions(_Model):
    """Per-item sizing options (processor.py documents them)."""

    min_pixels: Positive | None = None
    max_pixels: Positive | None = None
    fps: Positive | None = None
    max_frames: Frames | None = None
    min_frames: Frames | None = None
    nframes: Frames | None = None
    total_pixels: Positive | None = None
    resized_height: Size | None = None
    resized_width: Size | None = None
    video_start: NonNegative | None = None
    video_end: NonNegative | None = None

    def media_options(self) -> dict:
        return {k: v for k in _MediaOptions.model_fields if (v := getattr(self, k)) is not None}




def _json_kind(value) -> str | None:
    return "str" if isinstance(value, str) else "list" if isinstance(value, list) else \
        "object" if isinstance(value, dict) else None


def either(**members):
    """A union chosen by the JSON kind of the value (``str``, ``list`` or ``object``), so an error
    is reported against the member that was meant, not against every member."""
    tagged = tuple(Annotated[kind, Tag(tag)] for tag, kind in members.items())
    return Annotated[Union[tagged], Discriminator(_json_kind)]  # noqa: UP007


# what a union field must be, for the error when its value is none of its members
_UNION_WORDS = {"content": "a string or a list of parts", "stop": "a string or a list of strings",
                "video": "a string or a list of frame sources", "image_url": "an object with a url, or a string",
                "video_url": "an object with a url, or a string", "prompt": "a string or a list of one string",
                "tool_choice": "a string or an object", "arguments": "a JSON string or an object"}


class MediaURL(_MediaOptions):
    url: str
    detail: str | None = None  # OpenAI's image detail: accepted, not used (sizes come from the options)


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImageURLPart(_MediaOptions):
    type: Literal["image_url"]
    image_url: either(object=MediaURL, str=str)


class VideoURLPart(_MediaOptions):
    type: Literal["video_url"]
    video_url: either(object=MediaURL, str=str)


class ImagePart(_MediaOptions):
    type: Literal["image"]
    image: str


class VideoPart(_MediaOptions):
    type: Literal["video"]
    video: either(str=str, list=Annotated[list[str], Field(max_length=MAX_PARTS)])


PART_TYPES = ("text", "image_url", "video_url", "image", "video")


def _part_tag(value) -> str | None:
    return value.get("type") if isinstance(value, dict) and value.get("type") in PART_TYPES else None


Part = Annotated[Annotated[TextPart, Tag("text")] | Annotated[ImageURLPart, Tag("image_url")] | Annotated[VideoURLPart, Tag("video_url")] | Annotated[ImagePart, Tag("image")] | Annotated[VideoPart, Tag("video")], Discriminator(_part_tag)]


Content = either(str=str, list=Annotated[list[Part], Field(max_length=MAX_PARTS)])


MAX_TOOLS = 128  # OpenAI's limit on tools per request
TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function names


class FunctionCall(_Model):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    arguments: either(str=str, object=dict[str, Any])  # OpenAI sends a JSON string


class ToolCall(_Model):
    """An earlier call in an assistant message of the history."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Model):
    role: Literal["system", "user", "assistant", "tool"]
    content: Content | None = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = None  # assistant
    tool_call_id: str | None = None  # tool: the call this message answers


class FunctionDefinition(_Model):
    name: Annotated[str, Field(pattern=TOOL_NAME)]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(_Model):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Model):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JSONSchemaFormat(_Model):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class _Sampling(_Model):
    """Sampling fields shared by chat and text completions (OpenAI's ranges; vLLM's extras)."""

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1, le=1 << 24)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=1 << 20)] | None = None
    min_p: Annotated[float, Field(ge=0, lt=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    seed: Annotated[int, Field(ge=-INT64 - 1, le=INT64)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: either(str=Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)],
                 list=Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
                                Field(max_length=MAX_STOP)]) | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extras
    min_tokens: Annotated[int, Field(ge=0, le=1 << 24)] = 0
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0, le=INT64)]],
                              Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    response_format: ResponseFormat | None = None


class ChatCompletionRequest(_Sampling):
    model_config = ConfigDict(extra="allow")
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=1 << 24)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: either(str=Literal["none", "auto", "required"], object=NamedToolChoice) | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True
    # request-wide defaults for every media item that does not set its own
    min_pixels: Positive | None = None
    max_pixels: Positive | None = None
    fps: Positive | None = None
    max_frames: Frames | None = None


class CompletionRequest(_Sampling):
    model_config = ConfigDict(extra="allow")
    prompt: either(str=str, list=Annotated[list[str], Field(min_length=1, max_length=1)])
    max_tokens: Annotated[int, Field(ge=1, le=1 << 24)] | None = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None


class TokenizeRequest(_Model):
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None  # rendered with messages
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Model):
    model: str | None = None
    tokens: Annotated[list[Annotated[int, Field(ge=0, le=INT64)]], Field(max_length=1 << 20)]


# OpenAI fields that are accepted and have no effect here (not logged as unknown)
KNOWN_UNUSED = ("store", "metadata", "service_tier", "modalities", "reasoning_effort", "id")


def parse(model: type[_Model], raw: bytes | dict) -> _Model:
    """Validate a JSON body (bytes) or an already-parsed object; raise APIError naming the field."""
    try:
        return model.model_validate_json(raw) if isinstance(raw, (bytes, bytearray)) else model.model_validate(raw)
    except ValidationError as err:
        raise validation_error(err) from None


def unknown_fields(request: _Model) -> list[str]:
    """Top-level fields of a parsed request that this server does not know (to be logged, then ignored)."""
    return sorted(k for k in (request.model_extra or {}) if k not in KNOWN_UNUSED)


_TYPE_WORDS = {"int_type": "an integer", "int_from_float": "an integer", "int_parsing": "an integer",
               "float_type": "a number", "float_parsing": "a number", "string_type": "a string",
               "bool_type": "true or false", "bool_parsing": "true or false", "list_type": "a list",
               "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object"}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _param(loc: tuple) -> str:
    """``('messages', 0, 'content', 'list', 1, 'image_url', 'image_url', 'url')`` ->
    ``messages[0].content[1].image_url.url`` (union tags dropped)."""
    out, prev = "", None
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif isinstance(prev, int) and item in PART_TYPES or item in ("str", "list", "object"):
            pass  # a union member's tag
        else:
            out += f".{item}" if out else item
        prev = item
    return out or "body"


def json_type(value) -> str:
    """A short description of a JSON value for error messages (never the whole value)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value!r}" if len(repr(value)) <= 24 else "a number"
    if isinstance(value, str):
        return f"the string {value[:40]!r}" + ("..." if len(value) > 40 else "")
    return "a list" if isinstance(value, list) else "an object" if isinstance(value, dict) else "a value"


def validation_error(err: ValidationError) -> APIError:
    """The APIError for the first problem of a ValidationError."""
    e = err.errors(include_url=False)[0]
    kind, loc, ctx, value = e["type"], tuple(e["loc"]), e.get("ctx") or {}, e.get("input")
    param = _param(loc)
    if kind == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {ctx.get('error', 'malformed')}",
                        "invalid_json", None)
    if not loc and kind in ("model_type", "model_attributes_type", "dict_type"):
        return APIError(422, f"the request body must be a JSON object, got {json_type(value)}", "invalid_type", None)
    if kind == "missing":
        return APIError(422, f"{param} is required", "missing_field", param)
    if kind in _TYPE_WORDS:
        return APIError(422, f"{param} must be {_TYPE_WORDS[kind]}, got {json_type(value)}", "invalid_type", param)
    if kind in ("union_tag_not_found", "union_tag_invalid"):
        if loc and loc[-1] in _UNION_WORDS:
            return APIError(422, f"{param} must be {_UNION_WORDS[loc[-1]]}, got {json_type(value)}",
                            "invalid_type", param)
        if not isinstance(value, dict):
            return APIError(422, f"{param} must be an object, got {json_type(value)}", "invalid_type", param)
        if value.get("type") is None:
            return APIError(422, f"{param}.type is required", "missing_field", f"{param}.type")
        return APIError(400, f"{param} has unknown type {str(value.get('type'))[:40]!r}; expected one of "
                             f"{', '.join(PART_TYPES)}", "unknown_part_type", f"{param}.type")
    if kind == "finite_number":
        return APIError(400, f"{param} must be a finite number", "invalid_value", param)
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return APIError(400, f"{param} must be {_BOUNDS[kind]} {bound}, got {value!r}",
                        "invalid_value", param)
    if kind == "literal_error":
        return APIError(400, f"{param} must be {ctx.get('expected')}, got {json_type(value)}", "invalid_value", param)
    if kind in ("too_long", "too_short"):
        count = ctx.get("actual_length")
        limit = ctx.get("max_length") if kind == "too_long" else ctx.get("min_length")
        if kind == "too_short" and limit == 1 and isinstance(value, (list, str)):
            return APIError(400, f"{param} must not be empty", "invalid_value", param)
        word = "over the limit of" if kind == "too_long" else "under the minimum of"
        return APIError(400, f"{param} has {count} items, {word} {limit}", "invalid_value", param)
    if kind == "string_pattern_mismatch":
        return APIError(400, f"{param} must match {ctx.get('pattern')}, got {json_type(value)}", "invalid_value", param)
    if kind in ("string_too_short", "string_too_long"):
        return APIError(400, f"{param} must not be empty" if kind == "string_too_short" else
                        f"{param} is longer than {ctx.get('max_length')} characters", "invalid_value", param)
    return APIError(400, f"{param}: {e['msg']}", "invalid_value", param)
