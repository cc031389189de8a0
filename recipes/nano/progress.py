"""The v2 run's held-out scores against samples seen, and what reaching each target would take.

    python recipes/nano/progress.py add 5400 runs/nano-v2/eval-5400.json      # after `qwen2vl eval`
    python recipes/nano/progress.py add 9000 runs/nano-v2/eval-9000.json --probe words=runs/nano-v2/words-9000.json
    python recipes/nano/progress.py plot docs/nano-v2-progress.png

``add`` appends one line to ``evals.jsonl`` beside this file: the step, the samples seen up to it
(summed from the packed state's ``metrics.jsonl``, or ``--metrics``) and the score of each group of
the eval's table; ``--probe NAME=EVAL`` adds the overall score (and ANLS) of a side eval, such as the
big-word signs of the reading curriculum (leading indicators that the held-out set does not carry). ``plot`` draws each target group's score against samples seen (log scale) with its
target, fits ``score = a + b * log10(samples)`` to the points from ``--from-samples`` on, and prints
where that line meets the target:

    samples = 10 ** ((target - a) / b)

For example counting at 16.1 % after 34,932 samples and 22.6 % after 169,603 gives b = 9.5 points per
tenfold, so 85 % would need 10 ** ((85 - 22.6) / 9.5) = 3.8e6 times more samples than 169,603: far
past any CPU budget. A line through a few noisy points (62 counting items: +-5 points) is a rough
guide, not a forecast; a flat or falling line says "no trend yet".
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent
EVALS = HERE / "evals.jsonl"
# The targets on the held-out set (group names as `qwen2vl eval` prints them)
TARGETS = {"counting": 0.85, "grounding": 0.70, "reading (normal text)": 0.70, "gui (click)": 0.70,
           "video": 0.80, "chart": 0.50}


def samples_seen(metrics: Path, step: int) -> int:
    """Samples trained on in steps 1..step (the last record of each step counts: a resumed run repeats some)."""
    per_step = {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "samples" in record:
            per_step[record["step"]] = record["samples"]
    missing = [s for s in range(1, step + 1) if s not in per_step]
    if missing:
        raise SystemExit(f"{metrics} has no record of {len(missing)} step(s) up to {step}, e.g. {missing[:3]}")
    return sum(per_step[s] for s in range(1, step + 1))


def add(step: int, eval_json: Path, metrics: Path, evals: Path = EVALS, probes: dict[str, Path] | None = None) -> dict:
    rows = json.loads(eval_json.read_text())["rows"]
    entry = {"step": step, "samples": samples_seen(metrics, step),
             "scores": {r["group"]: round(r["score"], 4) for r in rows},
             "n": {r["group"]: r["n"] for r in rows}}
    if probes:
        entry["probes"] = {name: probe_summary(path) for name, path in probes.items()}
    kept = [json.loads(line) for line in evals.read_text().splitlines()] if evals.is_file() else []
    kept = sorted([e for e in kept if e["step"] != step] + [entry], key=lambda e: e["step"])
    evals.write_text("".join(json.dumps(e) + "\n" for e in kept))
    return entry


def probe_summary(eval_json: Path) -> dict:
    """A side eval's overall score, its items and, where its rows have one, their items' mean ANLS."""
    rows = json.loads(eval_json.read_text())["rows"]
    overall = next(r for r in rows if r["group"] == "all")
    summary = {"score": round(overall["score"], 4), "n": overall["n"]}
    scored = [r for r in rows if "anls" in r]
    if scored:
        summary["anls"] = round(sum(r["anls"] * r["n"] for r in scored) / sum(r["n"] for r in scored), 4)
    return summary


def fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least squares ``score = a + b * log10(samples)``; None for fewer than two distinct sample counts."""
    xs = [math.log10(n) for n, _ in points]
    if len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(s for _, s in points) / len(points)
    b = sum((x - mx) * (s - my) for x, (_, s) in zip(xs, points)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def needed(points: list[tuple[int, float]], target: float) -> str:
    line = fit(points)
    if line is None:
        return "one point"
    a, b = line
    if b <= 0:
        return "no upward trend yet"
    exponent = (target - a) / b
    return f"{10 ** exponent:.1e} samples ({b * 100:.1f} points per tenfold)" if exponent < 15 else "beyond 1e15"


def plot(out: Path, from_samples: int, evals: Path = EVALS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [json.loads(line) for line in evals.read_text().splitlines()]
    fig, axes = plt.subplots(2, 4, figsize=(17, 7), sharex=True)
    print(f"{'group':<24} {'last score':>10} {'target':>7}  samples to reach the target on the fitted line")
    for ax, (group, target) in zip(axes.flat, TARGETS.items()):
        points = [(e["samples"], e["scores"][group]) for e in entries if group in e["scores"]]
        ax.plot([n for n, _ in points], [s * 100 for _, s in points], "o-", label="held-out")
        ax.axhline(target * 100, ls="--", c="k", lw=0.8, label="target")
        fitted = [p for p in points if p[0] >= from_samples]
        line = fit(fitted)
        if line is not None and line[1] > 0:
            lo, hi = min(n for n, _ in fitted), 10 * max(n for n, _ in fitted)
            xs = [lo * (hi / lo) ** (i / 20) for i in range(21)]
            ax.plot(xs, [(line[0] + line[1] * math.log10(x)) * 100 for x in xs], ":", c="C1", label="fit")
        ax.set_xscale("log")
        ax.set_title(group)
        ax.set_ylim(0, 100)
        ax.set_xlabel("samples seen")
        ax.set_ylabel("score %")
        last = f"{points[-1][1] * 100:.1f}%" if points else "-"
        print(f"{group:<24} {last:>10} {target * 100:>6.0f}%  {needed(fitted, target)}")
    names = sorted({name for e in entries for name in e.get("probes", {})})
    for ax, key in zip(axes.flat[len(TARGETS):], ("score", "anls")):
        for name in names:
            points = [(e["samples"], e["probes"][name][key]) for e in entries if key in e.get("probes", {}).get(name, {})]
            ax.plot([n for n, _ in points], [v * 100 for _, v in points], "o-", label=name)
        ax.set_title(f"probes: {'exact match' if key == 'score' else 'ANLS'}")
        ax.set_ylim(0, 100)
        ax.set_xlabel("samples seen")
        if names:
            ax.legend(fontsize=8)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("qwen2vl-nano v2: held-out score against samples seen")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    a = sub.add_parser("add", help="record one `qwen2vl eval` JSON at a step")
    a.add_argument("step", type=int)
    a.add_argument("eval_json", type=Path)
    a.add_argument("--metrics", type=Path, default=HERE / "state" / "metrics.jsonl")
    a.add_argument("--probe", action="append", default=[], metavar="NAME=EVAL_JSON",
                   help="a side eval to record beside the held-out one (repeatable)")
    g = sub.add_parser("plot", help="draw the scores and print what each target would take")
    g.add_argument("out", type=Path)
    g.add_argument("--from-samples", type=int, default=30_000, help="fit the points from this many samples on")
    args = p.parse_args(argv)
    if args.action == "add":
        probes = {}
        for item in args.probe:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                p.error(f"--probe {item!r}: expected NAME=EVAL_JSON")
            probes[name] = Path(path)
        print(json.dumps(add(args.step, args.eval_json, args.metrics, probes=probes)))
    else:
        plot(args.out, args.from_samples)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
