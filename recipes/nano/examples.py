"""Write the example images of ``examples/`` with the synthetic generator (held-out split, seed 9).

    python recipes/nano/examples.py [--out examples]

``receipt.png``: the first receipt with normal-size text; ``shapes.png``: the first grounding
scene with 3 to 6 shapes. Seed 9 of the eval split is used by no training or evaluation set of
the recipe. Prints each image's generated question and answer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qwen2vl.data.synthetic import generate_sample

SPLIT, SEED = "eval", 9


def first(task: str, accept) -> tuple[int, object]:
    for index in range(10_000):
        sample = generate_sample(index, SEED, SPLIT, tasks=[task], image_size_policy="compact")
        if accept(sample):
            return index, sample
    raise SystemExit(f"no {task} sample fits in the first 10,000")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="examples")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    picks = {
        "receipt.png": first("reading", lambda s: s.meta["kind"] == "receipt" and not s.meta["small_text"]
                             and 250 <= max(s.image.size) <= 400),
        "shapes.png": first("grounding", lambda s: 3 <= len(s.meta["objects"]) <= 6
                            and 250 <= max(s.image.size) <= 400),
    }
    for name, (index, sample) in picks.items():
        sample.image.save(out / name, optimize=True)
        print(f"{out / name}: sample {index} of ({SPLIT}, seed {SEED}), {sample.image.size[0]}x{sample.image.size[1]}; "
              f"Q: {sample.question!r} A: {sample.answer!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
