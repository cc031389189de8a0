"""Function calling: the tool prompts of two formats, and a parser (complete and incremental) of tool calls.

``hermes`` (canonical; what Qwen uses from Qwen2.5 on): the tools go into the system turn as one JSON
signature per line between ``<tools></tools>``; the model answers with
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` (several allowed); results come back in
a user turn, each wrapped in ``<tool_response>\\n...\\n</tool_response>``.

``qwen`` (Qwen-Agent's format of the Qwen2 era, which Qwen2-VL-Instruct was used with): a ``# Tools``
section with one description per tool, then inside the assistant turn::

    ✿FUNCTION✿: get_weather
    ✿ARGS✿: {"city": "Paris"}
    ✿RESULT✿: sunny          <- the result, written by the caller into the same assistant turn
    ✿RETURN✿: It is sunny.   <- the model's reply after the results

The model stops at ``✿RESULT✿`` / ``✿RETURN✿`` (:func:`stop_strings`).

Rendering the turns (system block, assistant calls, tool results with images) is
:func:`qwen2vl.processing.chat.render_chat`'s ``tools=`` / ``tool_format=``; this module holds the
strings and the parsing. Calls are ``{"name": str, "arguments": dict}``;
:func:`to_openai_tool_calls` gives OpenAI's ``tool_calls`` (``call_...`` ids, JSON-string arguments).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

TOOL_FORMATS = ("hermes", "qwen")

HERMES_TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                     "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
HERMES_TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                     "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                     '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"

FN_NAME, FN_ARGS, FN_RESULT, FN_EXIT = "✿FUNCTION✿", "✿ARGS✿", "✿RESULT✿", "✿RETURN✿"
QWEN_TOOLS_HEAD = "# Tools\n\n## You have access to the following tools:\n\n"
QWEN_FORMAT = (f"## When you need to call a tool, please insert the following command in your reply, which can be "
               f"called zero or multiple times according to your needs:\n\n"
               f"{FN_NAME}: The tool to use, should be one of [{{names}}]\n{FN_ARGS}: The input of the tool\n"
               f"{FN_RESULT}: Tool results\n{FN_EXIT}: Reply based on tool results. Images need to be rendered as "
               f"![](url)")
QWEN_FORMAT_PARALLEL = (f"## Insert the following command in your reply when you need to call N tools in parallel:\n\n"
                        f"{FN_NAME}: The name of tool 1, should be one of [{{names}}]\n{FN_ARGS}: The input of tool 1\n"
                        f"{FN_NAME}: The name of tool 2\n{FN_ARGS}: The input of tool 2\n...\n"
                        f"{FN_NAME}: The name of tool N\n{FN_ARGS}: The input of tool N\n"
                        f"{FN_RESULT}: The result of tool 1\n{FN_RESULT}: The result of tool 2\n...\n"
                        f"{FN_RESULT}: The result of tool N\n"
                        f"{FN_EXIT}: Reply based on tool results. Images need to be rendered as ![](url)")


def check_format(tool_format: str) -> str:
    if tool_format not in TOOL_FORMATS:
        raise ValueError(f"unknown tool format {tool_format!r}; expected one of {TOOL_FORMATS}")
    return tool_format


def stop_strings(tool_format: str) -> list[str]:
    """Text at which generation must stop for this format (the results are the caller's to write)."""
    return [FN_RESULT, FN_EXIT] if check_format(tool_format) == "qwen" else []


# ------------------------------------------------------------------------------------------ prompts

def function_of(tool, index: int) -> dict:
    """The function dict of an OpenAI tool (``{"type": "function", "function": {...}}``) or of a bare function."""
    if not isinstance(tool, dict):
        raise ValueError(f"tool {index} must be a dict, got {type(tool).__name__}")
    function = tool.get("function", tool) if tool.get("type", "function") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise ValueError(f"tool {index} must be {{'type': 'function', 'function': {{'name': ..., ...}}}} "
                         f"with a non-empty string name")
    return function


def tools_block(tools: list, tool_format: str = "hermes", parallel_tool_calls: bool = False) -> str:
    """The text the tools add to the system turn (after the system text and a blank line)."""
    check_format(tool_format)
    if not isinstance(tools, (list, tuple)) or not tools:
        raise ValueError("tools must be a non-empty list")
    functions = [function_of(t, i) for i, t in enumerate(tools)]
    if tool_format == "hermes":
        lines = "".join("\n" + json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions)
        return HERMES_TOOLS_HEAD + lines + HERMES_TOOLS_TAIL
    descriptions = "\n\n".join(_qwen_description(f) for f in functions)
    names = ",".join(f.get("name_for_model", f["name"]) for f in functions)
    fmt = QWEN_FORMAT_PARALLEL if parallel_tool_calls else QWEN_FORMAT
    return QWEN_TOOLS_HEAD + descriptions + "\n\n" + fmt.replace("{names}", names)


def _qwen_description(function: dict) -> str:
    name = function.get("name_for_model", function["name"])
    human = function.get("name_for_human", name)
    parameters = json.dumps(function.get("parameters", {}), ensure_ascii=False)
    fmt = function.get("args_format", "Format the arguments as a JSON object.")
    return (f"### {human}\n\n{name}: {function.get('description', '')} Parameters: {parameters} {fmt}").rstrip()


def call_arguments(call, where: str) -> tuple[str, dict]:
    """(name, arguments dict) of an OpenAI tool call (arguments a JSON string) or of ``{"name", "arguments"}``."""
    if not isinstance(call, dict):
        raise ValueError(f"{where}: a tool call must be a dict")
    function = call.get("function", call)
    name, arguments = function.get("name"), function.get("arguments", {})
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: a tool call needs a non-empty string name")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: arguments are not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}: arguments must be a JSON object, got {type(arguments).__name__}")
    return name, arguments


def format_call(name: str, arguments: dict, tool_format: str = "hermes") -> str:
    """The text of one call as the model writes it (hermes: the whole ``<tool_call>`` block)."""
    args = json.dumps(arguments, ensure_ascii=False)
    if check_format(tool_format) == "hermes":
        return f"{CALL_OPEN}\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + f"\n{CALL_CLOSE}"
    return f"{FN_NAME}: {name}\n{FN_ARGS}: {args}"


# ------------------------------------------------------------------------------------------ parsing

@dataclass
class ContentDelta:
    """Text outside tool calls that is now safe to show."""

    text: str


@dataclass
class ToolCallStart:
    """Call ``index`` has begun and its name is known."""

    index: int
    id: str
    name: str


@dataclass
class ToolCallArguments:
    """More of call ``index``'s argument text (the pieces of one call concatenate to its JSON arguments)."""

    index: int
    text: str


@dataclass
class ToolParse:
    content: str
    calls: list[dict] = field(default_factory=list)
    malformed: bool = False  # some call text could not be read; it stays in ``content``
    ids: list[str] = field(default_factory=list)


_HERMES_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_QWEN_STOP = (FN_RESULT, FN_EXIT)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _partial_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``markers``."""
    best = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:k]):
                best = k
                break
    return best


class ToolCallStreamParser:
    """Incremental tool-call parsing for one answer: ``feed(delta) -> events``, then ``finish()``.

    Events are :class:`ContentDelta`, :class:`ToolCallStart` and :class:`ToolCallArguments`.
    Content events concatenate to ``finish().content`` when no call is malformed (surrounding
    whitespace is held back until more content follows). A call is only checked when it is
    complete; a malformed one (not a JSON object with a string ``name`` and object ``arguments``)
    is returned as content, raw, with ``malformed=True``: a server then reports it as text with
    its own finish reason, after the started events it may already have sent.
    """

    def __init__(self, tool_format: str = "hermes"):
        self.format = check_format(tool_format)
        self.opener = CALL_OPEN if self.format == "hermes" else FN_NAME
        self.buffer = ""  # unclassified text (content mode) or the current call's body (call mode)
        self.in_call = False
        self.stopped = False  # qwen: a result marker was written; the rest is not the model's answer
        self.content: list[str] = []
        self.pending_space = ""  # whitespace after shown content, shown only when more content follows
        self.shown_any = False
        self.calls: list[dict] = []
        self.ids: list[str] = []
        self.malformed = False
        self.started = False  # the current call's start event was sent
        self.args_sent = 0  # characters of the current call's argument text sent

    # -- public
    def feed(self, delta: str) -> list:
        if self.stopped or not delta:
            return []
        self.buffer += delta
        events: list = []
        while self._step(events, final=False):
            pass
        return events

    def flush(self) -> list:
        """The events the end of the answer releases: held-back content, the call the end closes."""
        events: list = []
        while self._step(events, final=True):
            pass
        return events

    def finish(self) -> ToolParse:
        """The whole answer: content, calls, and whether any call text was malformed."""
        self.flush()
        text = "".join(self.content).strip()
        return ToolParse(text, list(self.calls), self.malformed, list(self.ids))

    # -- internals
    def _show(self, text: str, events: list) -> None:
        """Queue content, holding back leading and trailing whitespace."""
        if not text:
            return
        stripped = text.rstrip()
        trailing = text[len(stripped):]
        if stripped:
            if not self.shown_any:
                stripped = stripped.lstrip()
                if self.format == "qwen" and stripped.startswith(":"):  # the ": " after a prompt's ✿RETURN✿
                    stripped = stripped[1:].lstrip()
                    if not stripped:
                        return
            piece = (self.pending_space if self.shown_any else "") + stripped
            self.shown_any = True
            self.pending_space = trailing
            self.content.append(piece)
            events.append(ContentDelta(piece))
        else:
            self.pending_space += trailing

    def _step(self, events: list, final: bool) -> bool:
        if self.stopped:
            return False
        if not self.in_call:
            return self._content_step(events, final)
        return self._hermes_step(events, final) if self.format == "hermes" else self._qwen_step(events, final)

    def _content_step(self, events: list, final: bool) -> bool:
        markers = (self.opener, *(_QWEN_STOP if self.format == "qwen" else ()))
        hits = [(self.buffer.find(m), m) for m in markers if m in self.buffer]
        if hits:
            at, marker = min(hits)
            self._show(self.buffer[:at], events)
            if marker != self.opener:  # a qwen result marker: the answer ends here
                self.buffer, self.stopped = "", True
                return False
            self.buffer = self.buffer[at + len(marker):]
            self.in_call, self.started, self.args_sent = True, False, 0
            return True
        keep = 0 if final else _partial_suffix(self.buffer, markers)
        self._show(self.buffer[:len(self.buffer) - keep], events)
        self.buffer = self.buffer[len(self.buffer) - keep:]
        return False

    def _progress(self, events: list, name: str | None, args: str) -> None:
        """Send the start event once the name is known, then any new argument text."""
        if name is None:
            return
        if not self.started:
            self.ids.append(new_call_id())
            events.append(ToolCallStart(len(self.calls), self.ids[-1], name))
            self.started = True
        if len(args) > self.args_sent:
            events.append(ToolCallArguments(len(self.calls), args[self.args_sent:]))
            self.args_sent = len(args)

    def _hermes_step(self, events: list, final: bool) -> bool:
        end = self.buffer.find(CALL_CLOSE)
        body = self.buffer if end < 0 else self.buffer[:end]
        head = _HERMES_HEAD.match(body)
        if end < 0 and not final:
            if head:
                visible = body[:len(body) - _partial_suffix(body, (CALL_CLOSE,))]
                args = visible[head.end():]
                args = args[:len(args.rstrip())]
                if args.endswith("}"):  # it may be the wrapper's closing brace: hold it back
                    args = args[:-1].rstrip()
                self._progress(events, _unescape(head.group(1)), args)
            return False
        call = _read_hermes(body)
        raw = CALL_OPEN + body + (CALL_CLOSE if end >= 0 else "")
        self.buffer = "" if end < 0 else self.buffer[end + len(CALL_CLOSE):]
        raw_args = body[head.end():].rstrip()[:-1].rstrip() if head else None
        self._close_call(call, raw, events, raw_args)
        return end >= 0

    def _qwen_step(self, events: list, final: bool) -> bool:
        markers = (FN_NAME, *_QWEN_STOP)
        hits = [(self.buffer.find(m), m) for m in markers if m in self.buffer]
        at, marker = min(hits) if hits else (-1, None)
        body = self.buffer if at < 0 else self.buffer[:at]
        if at < 0 and not final:
            visible = body[:len(body) - _partial_suffix(body, markers)]
            if FN_ARGS + ":" in visible:
                name, args = visible.split(FN_ARGS + ":", 1)
                self._progress(events, name.lstrip(":").strip(), _json_prefix(args.strip()))
            return False
        call, raw_args, rest = _read_qwen(body)
        self.buffer = "" if at < 0 else self.buffer[at:]
        self._close_call(call, FN_NAME + body, events, raw_args)
        if call is not None and rest:
            self._show("\n" + rest, events)
        if marker in _QWEN_STOP:
            self.buffer, self.stopped = "", True
            return False
        return at >= 0

    def _close_call(self, call: dict | None, raw: str, events: list, raw_args: str | None) -> None:
        """End the current call: send what is left of its arguments, or return its text as content."""
        self.in_call = False
        if call is None:
            self.malformed = True
            if self.started:
                self.ids.pop()
            self._show(raw, events)
        else:
            streamed = self.started and self.args_sent > 0 and raw_args is not None
            self._progress(events, call["name"], raw_args if streamed else json.dumps(call["arguments"],
                                                                                      ensure_ascii=False))
            self.calls.append(call)
        self.started = False


def _json_prefix(text: str) -> str:
    """The argument text to stream: all of it while the JSON value is incomplete, only the value once
    it is complete (text the model writes after it is not arguments)."""
    try:
        _, end = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        return text
    return text[:end]


def _unescape(text: str) -> str:
    try:
        return json.loads(f'"{text}"')
    except json.JSONDecodeError:
        return text


def _valid(obj) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = obj.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return {"name": obj["name"], "arguments": arguments} if isinstance(arguments, dict) else None


def _read_hermes(body: str) -> dict | None:
    try:
        return _valid(json.loads(body.strip()))
    except json.JSONDecodeError:
        return None


def _read_qwen(body: str) -> tuple[dict | None, str, str]:
    """``: name\\n✿ARGS✿: {...}`` -> (call or None, the arguments' JSON text, text after it)."""
    if FN_ARGS + ":" not in body:
        return None, "", ""
    name, args = body.split(FN_ARGS + ":", 1)
    name, args = name.lstrip(":").strip(), args.strip()
    try:
        value, end = json.JSONDecoder().raw_decode(args) if args else ({}, 0)
    except json.JSONDecodeError:
        return None, "", ""
    call = _valid({"name": name, "arguments": value})
    return call, args[:end], (args[end:].strip() if call else "")


def parse_tool_output(text: str, tool_format: str = "hermes") -> ToolParse:
    """Content, calls and the malformed flag of a complete answer."""
    parser = ToolCallStreamParser(tool_format)
    parser.feed(text)
    return parser.finish()


def parse_tool_calls(text: str, tool_format: str = "hermes") -> tuple[str, list[dict]]:
    """``(content, calls)`` of a complete answer; calls are ``{"name": str, "arguments": dict}``.

    >>> parse_tool_calls('Sure.\\n<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>')
    ('Sure.', [{'name': 'f', 'arguments': {'x': 1}}])
    """
    parsed = parse_tool_output(text, tool_format)
    return parsed.content, parsed.calls


def to_openai_tool_calls(calls: list[dict], ids: list[str] | None = None) -> list[dict]:
    """OpenAI ``tool_calls``: ``[{"id": "call_...", "type": "function", "function": {"name", "arguments": str}}]``."""
    ids = list(ids) if ids is not None else [new_call_id() for _ in calls]
    if len(ids) != len(calls):
        raise ValueError(f"{len(ids)} ids for {len(calls)} tool calls")
    return [{"id": i, "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for i, c in zip(ids, calls)]
