"""Constrained decoding through llguidance: a JSON schema (structured output) or a forced tool call.

``JSONSchemaConstraint(tokenizer, schema)`` and ``ToolCallsConstraint(tokenizer, functions, ...)``
implement the decode core's Constraint protocol, one object per row: ``allowed(vocab_size)`` is
the mask of tokens that keep the text a prefix of an answer the grammar accepts (the end-of-turn
token only once the answer is complete),
``advance(token)`` moves the grammar on, ``finished()`` is True once that end token was taken.
JSON is written compactly (no free whitespace), so a schema whose strings, numbers and arrays are
bounded has a bounded answer; an unbounded one ends at ``max_tokens``. A forced tool call (the
server's ``tool_choice: "required"`` or a named function) is a Lark grammar of the tool-call
syntax of the format around each function's ``parameters`` schema (:func:`tool_calls_grammar`).

Why llguidance (measured on this CPU, the 1,909-token nano vocabulary; docs/serving.md has the
table): one wheel with no dependencies, 59 ms to import, a schema compiles in 0.5 ms and a mask
takes about 9 us per token. xgrammar is as fast but declares torch, transformers and triton as
dependencies and takes 2.3 s to import; outlines-core's masks were 25 times slower.
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import torch

from ..agent.tools import CALL_CLOSE, CALL_OPEN, FN_ARGS, FN_NAME, FN_RESULT, check_format
from .errors import APIError

_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


@lru_cache(maxsize=4)
def grammar_tokenizer(tokenizer):
    """The llguidance view of our tokenizer (built once per tokenizer: ~10 ms for the nano vocabulary)."""
    import llguidance

    stop = tokenizer.im_end_id if tokenizer.im_end_id is not None else tokenizer.eos_id
    return llguidance.LLTokenizer(tokenizer.backend.to_str(), eos_token=stop)


class GrammarConstraint:
    """Constrain one row's answer to an llguidance grammar (``grammar``: a compiled grammar string)."""

    def __init__(self, tokenizer, grammar: str):
        import llguidance

        self.grammar_tokenizer = grammar_tokenizer(tokenizer)
        self.matcher = llguidance.LLMatcher(self.grammar_tokenizer, grammar, log_level=0)

    def error(self) -> str | None:
        return self.matcher.get_error()[:300] if self.matcher.is_error() else None

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """(vocab_size,) bool: the tokens that keep the answer valid (none past the tokenizer's vocabulary)."""
        words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        bits = np.unpackbits(words, bitorder="little")[: self.grammar_tokenizer.vocab_size]
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        n = min(vocab_size, len(bits))
        mask[:n] = torch.from_numpy(bits[:n].astype(np.bool_))
        return mask

    def advance(self, token_id: int) -> None:
        self.matcher.consume_token(int(token_id))

    def finished(self) -> bool:
        return self.matcher.is_stopped() or self.matcher.is_error()


class JSONSchemaConstraint(GrammarConstraint):
    """Constrain one row's answer to JSON valid under ``schema`` (a dict); 400 naming ``param`` if it is not usable."""

    def __init__(self, tokenizer, schema: dict, param: str = "response_format.json_schema.schema"):
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=_OPTIONS)
        except (ValueError, TypeError) as err:
            raise APIError(400, f"{param} is not a usable JSON schema: {err}", "invalid_schema", param) from None
        super().__init__(tokenizer, grammar)
        if self.error():
            raise APIError(400, f"{param} is not a usable JSON schema: {self.error()}", "invalid_schema", param)


def _arguments_schema(function: dict) -> dict:
    """A function's ``parameters`` schema, written as ``json.dumps`` writes (the prompt's and the training answers' form)."""
    schema = dict(function.get("parameters") or {"type": "object"})
    schema["x-guidance"] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    return schema


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a Lark string literal has JSON's escapes


def tool_calls_grammar(functions: list[dict], tool_format: str, parallel: bool) -> str:
    """A Lark grammar (llguidance dialect) for calls of ``functions`` (OpenAI function dicts) and nothing else.

    hermes: ``<tool_call>\n{"name": NAME, "arguments": ARGS}\n</tool_call>``; qwen:
    ``✿FUNCTION✿: NAME\n✿ARGS✿: ARGS`` then ``\n✿RESULT✿`` (the format's stop string). ARGS is
    JSON valid under that function's ``parameters``. ``parallel``: one or more calls, one per line.
    """
    check_format(tool_format)
    if tool_format == "hermes":
        call = "call: " + _literal(CALL_OPEN + '\n{"name": ') + " fn " + _literal("}\n" + CALL_CLOSE)
        heads = [f'{json.dumps(f["name"])}, "arguments": ' for f in functions]
        tail = ""
    else:
        call = f"call: {_literal(FN_NAME + ': ')} fn"
        heads = [f"{f['name']}\n{FN_ARGS}: " for f in functions]
        tail = ' "\\n" ' + _literal(FN_RESULT)  # two terminals: "\n" + "✿RESULT✿" would overlap the "\n" between calls
    lines = [f'start: call ("\\n" call)*{tail}' if parallel else f"start: call{tail}", call,
             "fn: " + " | ".join(f"f{i}" for i in range(len(functions)))]
    for i, (function, head) in enumerate(zip(functions, heads)):
        lines += [f"f{i}: {_literal(head)} a{i}", f"a{i}: %json {json.dumps(_arguments_schema(function))}"]
    return "\n".join(lines) + "\n"


class ToolCallsConstraint(GrammarConstraint):
    """Constrain one row's answer to calls of ``functions`` in ``tool_format`` (:func:`tool_calls_grammar`).

    ``where[i]`` names function i in errors (default ``tools[i]``): a ``parameters`` schema that
    llguidance cannot use is a 400 naming ``{where[i]}.function.parameters``.
    """

    def __init__(self, tokenizer, functions: list[dict], tool_format: str, parallel: bool,
                 where: list[str] | None = None):
        import llguidance

        where = where or [f"tools[{i}]" for i in range(len(functions))]
        try:
            super().__init__(tokenizer, llguidance.LLMatcher.grammar_from_lark(
                tool_calls_grammar(functions, tool_format, parallel)))
            problem = self.error()
        except (ValueError, TypeError) as err:
            problem = str(err)[:300]
        if problem:
            for function, name in zip(functions, where):  # raises naming the function whose schema is refused
                JSONSchemaConstraint(tokenizer, _arguments_schema(function), f"{name}.function.parameters")
            raise APIError(400, f"the tools' call grammar is not usable: {problem}", "invalid_schema", "tools")


def constraint_factory(tokenizer):
    """``request -> constraint`` for ``prepare`` (a fresh one per row): the request's ``response_format``
    schema, or its forced tool calls (``request.forced_tools()``)."""

    def make(request):
        if request.schema is not None:
            return JSONSchemaConstraint(tokenizer, request.schema)
        functions, where, parallel = request.forced_tools()
        return ToolCallsConstraint(tokenizer, functions, request.tool_format, parallel, where)

    return make
