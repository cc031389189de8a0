"""Held-out accuracy of the embedded qwen2vl-nano in float32, int8 and int4 (the `qwen2vl eval` set).

    python benchmarks/quant_accuracy.py [--n 200]

Each variant answers the same generated held-out records greedily through the same engine; the
summary rows of :mod:`qwen2vl.data.evaluate` are printed per variant and side by side.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from qwen2vl.data.evaluate import build_parser, run
from qwen2vl.generation.cli import EMBEDDED_MODEL
from qwen2vl.generation.engine import Engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        for quantize in (None, "int8", "int4"):
            engine = Engine.from_pretrained(EMBEDDED_MODEL, dtype="float32", device="cpu", quantize=quantize)

            def predict(conversations, engine=engine):
                return [r.text for r in engine.generate(conversations, max_new_tokens=args.max_new_tokens,
                                                        temperature=0.0)]

            name = quantize or "float32"
            print(f"== {name}")
            eval_args = build_parser().parse_args(["--model", str(EMBEDDED_MODEL), "--n", str(args.n), "--quiet",
                                                   "--out", str(Path(tmp) / f"{name}.json")])
            summary[name] = run(eval_args, predict)["rows"]
    print("\n| task | " + " | ".join(summary) + " |")
    print("|---|" + "---|" * len(summary))
    first = next(iter(summary.values()))
    for i, row in enumerate(first):
        label = row.get("task", str(i))
        cells = []
        for rows in summary.values():
            r = rows[i]
            cells.append(", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                   for k, v in r.items() if k != "task"))
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
