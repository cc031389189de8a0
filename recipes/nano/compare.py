"""Compare runs of the nano recipe: a Markdown table of their held-out scores and one loss-curve plot.

    python recipes/nano/compare.py native=runs/nano 224x224=runs/nano-224 --plot docs/nano-loss.png
    python recipes/nano/compare.py native=runs/nano-v2 --plot docs/nano-v2-loss.png --marks 200,700,1100 --no-table

Each run directory holds ``eval.json`` (from ``qwen2vl eval``) and ``stage{2,3}/metrics.jsonl``.
The table has one column per run (score in percent, with ANLS / mean IoU where the metric has one)
and, for two runs, the difference first minus second in points. The plot draws each run's training
loss (a moving average) and eval loss over the steps of the stages laid end to end.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from train import STAGES, stage_records  # beside this file


def load_rows(run: Path) -> dict[str, dict]:
    return {row["group"]: row for row in json.loads((run / "eval.json").read_text())["rows"]}


def cell(row: dict | None) -> str:
    if row is None:
        return "-"
    extra = [f"{k.replace('mean_', '')} {100 * row[k]:.1f}" for k in ("anls", "mean_iou") if k in row]
    return f"{100 * row['score']:.1f}" + (f" ({', '.join(extra)})" if extra else "")


def table(runs: dict[str, Path]) -> str:
    rows = {name: load_rows(path) for name, path in runs.items()}
    groups = list(dict.fromkeys(g for r in rows.values() for g in r))
    names = list(runs)
    header = ["task", "n", "metric", *names] + (["difference (points)"] if len(names) == 2 else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group in groups:
        first = next(r[group] for r in rows.values() if group in r)
        cells = [group, str(first["n"]), first["metric"], *(cell(rows[n].get(group)) for n in names)]
        if len(names) == 2 and all(group in rows[n] for n in names):
            a, b = (rows[n][group]["score"] for n in names)
            cells.append(f"{100 * (a - b):+.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_metrics(run: Path) -> tuple[list[tuple[int, dict]], list[int]]:
    """((global step, record) over the stages laid end to end, the global steps where stages end)."""
    out, ends, offset = [], [], 0
    for stage in STAGES:
        records = stage_records(run, stage)
        out += [(offset + r["step"], r) for r in records]
        offset += max((r["step"] for r in records), default=0)
        ends.append(offset)
    return out, ends


def plot(runs: dict[str, Path], out: Path, window: int = 10, marks: list[int] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for i, (name, run) in enumerate(runs.items()):
        points, ends = stage_metrics(run)
        steps, losses = [s for s, _ in points], [r["loss"] for _, r in points]
        smooth = [sum(losses[max(0, j - window + 1):j + 1]) / len(losses[max(0, j - window + 1):j + 1])
                  for j in range(len(losses))]
        colour = f"C{i}"
        ax.plot(steps, smooth, color=colour, label=f"{name} train (mean of {window})")
        evals = [(s, r["eval_loss"]) for s, r in points if "eval_loss" in r]
        ax.plot(*zip(*evals), "o--", color=colour, label=f"{name} eval")
    for x in ends[:-1]:  # stage boundaries (of the last run; the runs share their step counts)
        ax.axvline(x, color="grey", lw=0.5)
    for x in marks:  # recipe changes within a stage
        ax.axvline(x, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("optimizer step (stages end to end; grey lines: stage boundaries, dotted: recipe changes)")
    ax.set_ylabel("loss (train: as weighted in training; eval: per token)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="NAME=RUN_DIR")
    p.add_argument("--plot", help="write the loss curves to this PNG")
    p.add_argument("--marks", default="", help="comma list of steps to mark on the plot (recipe changes)")
    p.add_argument("--window", type=int, default=10, help="moving average of the training loss (steps)")
    p.add_argument("--no-table", action="store_true", help="no held-out table (runs without eval.json)")
    args = p.parse_args(argv)
    runs = {}
    for item in args.runs:
        name, _, path = item.partition("=")
        runs[name] = Path(path)
    if not args.no_table:
        print(table(runs))
    if args.plot:
        plot(runs, Path(args.plot), args.window, [int(m) for m in args.marks.split(",") if m])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
