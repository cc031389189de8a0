"""What a forced tool call (``tool_choice`` required / named) costs per row: building the call grammar, and
the token mask at each step, against the plain JSON-schema constraint of one call's arguments.

    python benchmarks/tool_calls.py [--model DIR] [--tools 1 8 32] [--repeat 20]

Prints one line per tool count: grammar build ms (median), mask us per token (median over a whole
call's tokens), and the JSON-schema constraint's figures for the same arguments schema.
"""

from __future__ import annotations

import argparse
import statistics
import time

from qwen2vl.agent.tools import format_call
from qwen2vl.generation.cli import EMBEDDED_MODEL
from qwen2vl.processing.tokenizer import Tokenizer
from qwen2vl.serve.constraints import JSONSchemaConstraint, ToolCallsConstraint


def function(i: int) -> dict:
    return {"name": f"tool_{i}", "description": f"Tool number {i}.", "parameters": {
        "type": "object", "required": ["city", "days"], "additionalProperties": False,
        "properties": {"city": {"type": "string", "maxLength": 20}, "days": {"type": "integer", "minimum": 1}}}}


def run(make, tokenizer, text: str, repeat: int) -> tuple[float, float]:
    """(median build ms, median mask us per token) of ``make()`` walking the tokens of ``text``."""
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.im_end_id]
    builds, masks = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        constraint = make()
        builds.append((time.perf_counter() - start) * 1e3)
        for token in ids:
            start = time.perf_counter()
            allowed = constraint.allowed(tokenizer.vocab_size)
            masks.append((time.perf_counter() - start) * 1e6)
            assert allowed[token], tokenizer.decode([token])
            constraint.advance(token)
        assert constraint.finished()
    return statistics.median(builds), statistics.median(masks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(EMBEDDED_MODEL), help="a directory with tokenizer.json")
    parser.add_argument("--tools", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    tokenizer = Tokenizer.from_pretrained(args.model)
    arguments = {"city": "Paris", "days": 3}
    print(f"vocabulary {tokenizer.vocab_size}; a call of tool_0 with {arguments}")
    for count in args.tools:
        functions = [function(i) for i in range(count)]
        call = format_call("tool_0", arguments)
        build, mask = run(lambda fs=functions: ToolCallsConstraint(tokenizer, fs, "hermes", False), tokenizer, call,
                          args.repeat)
        json_build, json_mask = run(lambda fs=functions: JSONSchemaConstraint(tokenizer, fs[0]["parameters"]), tokenizer,
                                    '{"city":"Paris","days":3}', args.repeat)
        print(f"{count:3d} tools: call grammar {build:6.2f} ms build, {mask:5.1f} us/token mask | "
              f"JSON schema of one call's arguments {json_build:5.2f} ms, {json_mask:5.1f} us/token")


if __name__ == "__main__":
    main()
