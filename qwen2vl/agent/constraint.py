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

# the arguments each action needs (the grammar requires exactly these)
NEEDS = {"click": ["coordinate"], "double_click": ["coordinate"], "long_press": ["coordinate"],
         "scroll": ["coordinate", "direction"], "drag": ["coordinate", "coordinate2"], "type": ["text"],
         "answer": ["text"], "key": ["key"], "wait": ["time"], "terminate": ["status"]}
MAX_STRING = 80  # characters of a constrained string argument (bounds the answer's length)


def tool_call_grammar(tool: dict, actions: list[str] | None = None) -> str:
    """A Lark grammar (llguidance dialect) for ``<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>``.

    ARGS are one of the ``computer_use`` actions (``actions``, default all) with exactly the
    arguments that action needs (:data:`NEEDS`, typed as in the tool's schema), no free whitespace.
    """
    function = tool.get("function", tool)
    properties = function.get("parameters", {}).get("properties", {})
    actions = list(properties.get("action", {}).get("enum", NEEDS)) if actions is None else list(actions)
    unknown = [a for a in actions if a not in NEEDS]
    if unknown or not actions:
        raise ValueError(f"unknown or no actions {unknown}; expected some of {sorted(NEEDS)}")
    variants = []
    for action in actions:  # one object per action: exactly the arguments it needs, all required
        props = {"action": {"const": action}}
        for key in NEEDS[action]:
            prop = dict(properties[key])
            prop.pop("description", None)
            if prop.get("type") == "string" and "enum" not in prop:
                prop["maxLength"] = MAX_STRING
            props[key] = prop
        variants.append({"type": "object", "properties": props, "required": list(props),
                         "additionalProperties": False})
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
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
