"""Function calling on the server: ``tools`` / ``tool_choice`` checked, answers read into OpenAI ``tool_calls``.

``tool_choice`` (default ``"auto"`` when ``tools`` are given):

* ``"none"``: the tools are not put into the prompt and the answer is content, unread;
* ``"auto"``: the tools go into the system turn (``--tool-format`` hermes or qwen, see
  :mod:`qwen2vl.agent.tools`) and the answer is parsed: calls become ``tool_calls``, the text
  around them ``content``;
* ``"required"`` or ``{"type": "function", "function": {"name": N}}``: as auto, and decoding is
  constrained to calls of any tool (or of N only, one call) in the format's syntax, with
  arguments valid under the tool's ``parameters`` (:class:`qwen2vl.serve.constraints.ToolCallsConstraint`).

``parallel_tool_calls`` (default true, as OpenAI) lets a forced answer hold several calls and picks
the qwen format's parallel prompt. ``finish_reason`` is ``"tool_calls"`` when the answer holds
calls and every call was well formed; a malformed call comes back, raw, as ``content`` with
``finish_reason`` ``"stop"`` (``"length"`` if the answer was cut off).

Streaming: the first delta of a call carries ``index``, ``id``, ``type`` and ``function.name`` with
``arguments: ""``; later deltas carry ``index`` and pieces of ``function.arguments`` (they concatenate
to the call's JSON arguments). A call that turns out malformed after its first delta was sent keeps
its index (no later call reuses it) and its text follows as content.
"""

from __future__ import annotations

from ..agent.tools import (
    ContentDelta,
    ToolCallArguments,
    ToolCallStart,
    ToolCallStreamParser,
    parse_tool_output,
    to_openai_tool_calls,
)
from .errors import APIError

TOOL_CHOICES = ("none", "auto", "required", "function")


def check_tool_choice(r) -> tuple[list[dict] | None, str, str | None]:
    """``(functions, choice, name)`` of a parsed ChatCompletionRequest: the tools' function dicts (None
    without tools), the choice (one of :data:`TOOL_CHOICES`) and the forced function's name."""
    functions = [t.function.model_dump(exclude_none=True) for t in r.tools] if r.tools else None
    choice, name = r.tool_choice, None
    if choice is not None and not isinstance(choice, str):
        choice, name = "function", choice.function.name
    if not functions:
        if choice in ("required", "function"):
            raise APIError(400, f"tool_choice {'required' if name is None else name!r} needs tools",
                           "invalid_value", "tool_choice")
        return None, "none", None
    seen: dict[str, int] = {}
    for i, function in enumerate(functions):
        if function["name"] in seen:
            raise APIError(400, f"tools[{i}].function.name {function['name']!r} is already tools[{seen[function['name']]}]'s",
                           "invalid_value", f"tools[{i}].function.name")
        seen[function["name"]] = i
    if name is not None and name not in seen:
        raise APIError(400, f"tool_choice.function.name {name[:64]!r} is not one of the tools "
                            f"({', '.join(seen)[:200]})", "invalid_value", "tool_choice.function.name")
    return functions, choice or "auto", name


def check_tool_messages(conversation: list[dict], tool_format: str) -> None:
    """The qwen format writes results into the calling assistant turn: a ``tool`` message must follow an
    assistant message with ``tool_calls`` (or another ``tool`` message)."""
    if tool_format != "qwen":
        return
    for m, message in enumerate(conversation):
        if message["role"] == "tool":
            before = conversation[m - 1] if m else None
            if before is None or not (before["role"] == "tool" or before.get("tool_calls")):
                raise APIError(400, f"messages[{m}] is a tool message that does not follow an assistant message "
                                    f"with tool_calls (the qwen tool format needs one)", "invalid_value",
                               f"messages[{m}]")


def finish_reason(reason: str, calls: list, malformed: bool) -> str:
    """``"tool_calls"`` for a complete answer of well-formed calls; otherwise the decode core's reason."""
    return "tool_calls" if calls and not malformed and reason == "stop" else reason


def tool_message(text: str, reason: str, tool_format: str) -> tuple[dict, str]:
    """The assistant message and finish reason of a whole answer."""
    parsed = parse_tool_output(text, tool_format)
    message = {"role": "assistant", "content": parsed.content if parsed.content or not parsed.calls else None}
    if parsed.calls:
        message["tool_calls"] = to_openai_tool_calls(parsed.calls, parsed.ids)
    return message, finish_reason(reason, parsed.calls, parsed.malformed)


class ToolDeltas:
    """One streamed choice: text deltas in, OpenAI chunk deltas (``content`` / ``tool_calls``) out."""

    def __init__(self, tool_format: str):
        self.parser = ToolCallStreamParser(tool_format)
        self.wire: dict[int, int] = {}  # the parser's index of a started call -> its index on the wire
        self.sent: dict[int, str] = {}  # wire index -> argument text sent
        self.shown = 0  # content pieces sent
        self.text = ""

    def feed(self, text: str) -> list[dict]:
        self.text += text
        return self._deltas(self.parser.feed(text))

    def finish(self, reason: str) -> tuple[list[dict], str]:
        """The deltas the end of the answer releases, and the choice's finish reason."""
        deltas = self._deltas(self.parser.flush())
        parsed = self.parser.finish()
        return deltas, finish_reason(reason, parsed.calls, parsed.malformed)

    def _deltas(self, events: list) -> list[dict]:
        out = []
        for event in events:
            if isinstance(event, ContentDelta):
                self.shown += 1
                out.append({"content": event.text})
            elif isinstance(event, ToolCallStart):
                self._start(event.index, event.id, event.name, out)
            elif isinstance(event, ToolCallArguments):
                wire = self.wire[event.index]
                self.sent[wire] += event.text
                out.append(_arguments(wire, event.text))
        return out

    def _start(self, index: int, ident: str, name: str, out: list) -> int:
        wire = len(self.sent)  # a fresh wire index, even where the parser reuses a malformed call's
        self.wire[index], self.sent[wire] = wire, ""
        out.append({"tool_calls": [{"index": wire, "id": ident, "type": "function",
                                    "function": {"name": name, "arguments": ""}}]})
        return wire

def _arguments(wire: int, text: str) -> dict:
    return {"tool_calls": [{"index": wire, "function": {"arguments": text}}]}
