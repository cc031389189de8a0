"""Constrained decoding of one tool call: the answer can only be a well-formed ``computer_use`` call.

Used by the agent's local-model policies (``--constrain``, the default for them): the model still
chooses the action and every coordinate digit, but never writes a format error. The grammar is the
hermes wrapper around the tool's JSON schema (compact JSON, as the server's structured output),
run by llguidance through the decode core's constraint protocol (``allowed`` / ``advance`` /
``finished``, see :class:`qwen2vl.serve.constraints.JSONSchemaConstraint`).
"""

from __future__ import annotations

import json

from ..serve.constraints import JSONSchemaConstraint, grammar_tokenizer
from .tools import CALL_CLOSE, CALL_OPEN

# the arguments each action needs (the grammar requires them when only one action is allowed)
NEEDS = {"click": ["coordinate"], "double_click": ["coordinate"], "long_press": ["coordinate"],
         "scroll": ["coordinate", "direction"], "drag": ["coordinate", "coordinate2"], "type": ["text"],
         "answer": ["text"], "key": ["key"], "wait": ["time"], "terminate": ["status"]}
MAX_STRING = 200  # characters of a constrained string argument


def tool_call_grammar(tool: dict, actions: list[str] | None = None) -> str:
    """A Lark grammar (llguidance dialect) for ``<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>``.

    ARGS follow the tool's schema without extra keys or free whitespace; ``actions`` narrows the
    ``action`` enum and keeps only the arguments those actions use (all required for a single one).
    """
    function = tool.get("function", tool)
    schema = json.loads(json.dumps(function.get("parameters", {"type": "object"})))
    schema["additionalProperties"] = False
    for prop in schema.get("properties", {}).values():
        if prop.get("type") == "string" and "enum" not in prop:
            prop["maxLength"] = MAX_STRING
    if actions is not None:
        unknown = [a for a in actions if a not in NEEDS]
        if unknown or not actions:
            raise ValueError(f"unknown or no actions {unknown}; expected some of {sorted(NEEDS)}")
        keep = {"action", *(k for a in actions for k in NEEDS[a])}
        schema["properties"] = {k: v for k, v in schema["properties"].items() if k in keep}
        schema["properties"]["action"] = {"type": "string", "enum": list(actions)}
        schema["required"] = ["action", *NEEDS[actions[0]]] if len(actions) == 1 else ["action"]
    # separators as json.dumps writes them (the training answers' form)
    schema["x-guidance"] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    head = f'{CALL_OPEN}\n{{"name": {json.dumps(function["name"])}, "arguments": '
    tail = f"}}\n{CALL_CLOSE}"
    return f"start: {json.dumps(head)} args {json.dumps(tail)}\nargs: %json {json.dumps(schema)}\n"


class ToolCallConstraint(JSONSchemaConstraint):
    """One row's constraint to a single call of ``tool`` (a fresh object per generation)."""

    def __init__(self, tokenizer, tool: dict, actions: list[str] | None = None):
        import llguidance

        self.grammar_tokenizer = grammar_tokenizer(tokenizer)
        grammar = llguidance.LLMatcher.grammar_from_lark(tool_call_grammar(tool, actions))
        self.matcher = llguidance.LLMatcher(self.grammar_tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"tool call grammar rejected: {self.matcher.get_error()[:300]}")
