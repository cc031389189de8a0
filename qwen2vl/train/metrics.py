"""Run records: ``metrics.jsonl`` (one object per optimizer step), the progress bar, the loss curve."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Appends one JSON object per optimizer step; on resume, drops lines past the resumed step."""

    def __init__(self, path: str | Path, resume_step: int = 0):
        self.path = Path(path)
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar over optimizer steps (its ETA comes from the step rate); None when disabled."""
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def plot_losses(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """Training loss (and evaluation loss where measured) against the step, as a PNG."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train", linewidth=1.2)
    evals = [r for r in records if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval", linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over supervised tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)
