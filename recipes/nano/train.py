"""qwen2vl-nano from scratch, end to end: data -> tokenizer -> three training stages -> eval -> export.

    python recipes/nano/train.py cpu                                  # native resolution -> runs/nano
    python recipes/nano/train.py cpu --force-size 224 --out runs/nano-224   # the 224x224 ablation arm
    python recipes/nano/train.py gpu --out runs/nano-gpu
    python recipes/nano/train.py cpu --out runs/nano-ext --extend runs/nano --extend-steps 600


Each step is skipped when its output is already there, and an interrupted stage resumes from its
last checkpoint, so the same command continues a run. Stage options come from ``stage{1,2,3}.yaml``
beside this file; the preset (``cpu.yaml``, ``gpu.yaml``) sets data sizes, batch shape and steps.
``--force-size 224`` squashes every image and video frame to 224x224 in training and evaluation.
``--extend OLD`` continues a finished run: the new run shares OLD's data, tokenizer and stage 1,
restarts stage 2 from OLD's stage-2 weights for ``--extend-steps`` more steps (fresh optimizer,
10-step warm-up, cosine decay over the new steps, seed 11 for a new sample order), then runs
stage 3, the evaluation and the export as usual.
Outputs in ``--out``: ``data/``, ``tokenizer/``, ``stage{1,2,3}/`` (metrics.jsonl, loss.png,
final/), ``qwen2vl-nano/`` (the bf16 export, with a model card: recipe, budget, held-out table),
``eval.json`` and ``eval.txt`` (the held-out table).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from qwen2vl.data.synthetic import SIZE_POLICIES
from qwen2vl.train.metrics import read_metrics

RECIPE = Path(__file__).resolve().parent


def run(cmd: list[str], env: dict[str, str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def make_data(out: Path, preset: dict, force_size: str | None, env: dict[str, str]) -> dict[str, Path]:
    """Train, dev (training-time eval loss) and test (held-out) sets; test is never forced to a size."""
    data = preset["data"]
    paths = {}
    for name, split in (("train", "train"), ("dev", "eval"), ("test", "eval")):
        target = out / "data" / name
        paths[name] = target
        if (target / "manifest.json").is_file():
            continue
        cmd = [sys.executable, "-m", "qwen2vl.data.make_dataset", "--out", str(target),
               "--n", str(data[name]["n"]), "--seed", str(data[name]["seed"]), "--split", split,
               "--size-policy", data["size_policy"], "--video-pixels", data["video_pixels"],
               "--tasks", data["tasks"], "--workers", str(data["workers"]), "--quiet"]
        if force_size and name != "test":  # the evaluator forces the test set itself
            cmd += ["--force-size", force_size]
        run(cmd, env)
    return paths


def check_token_ids(tokenizer: Path, config: Path) -> None:
    """The committed config.json must use the ids of the tokenizer just trained."""
    from qwen2vl.data.tokenizer_train import config_token_ids

    ids, cfg = config_token_ids(tokenizer), json.loads(config.read_text())
    wrong = [f"{k}: tokenizer {v}, config {cfg.get(k)}" for k, v in ids.items()
             if k != "num_tokens" and cfg.get(k) != v]
    if wrong:
        raise SystemExit(f"{config} does not fit the tokenizer in {tokenizer}: " + "; ".join(wrong))


def train_stage(stage: int, out: Path, preset: dict, data: dict[str, Path], tokenizer: Path,
                env: dict[str, str], overrides: dict | None = None) -> Path:
    final = out / f"stage{stage}" / "final"
    if (final / "config.json").is_file():
        return final
    # images are capped at the largest area the size policy draws; the export keeps that bound
    max_side = SIZE_POLICIES[preset["data"]["size_policy"]].max_side
    options = {"data": data["train"] / "data.jsonl", "eval_data": data["dev"] / "data.jsonl",
               "output_dir": out / f"stage{stage}", "max_steps": preset["stages"][stage],
               "max_pixels": max_side**2, "progress": "false", **preset["train"]}
    if stage == 1:
        options.update(model_config=RECIPE / "config.json", tokenizer=tokenizer)
    else:
        options["model"] = out / f"stage{stage - 1}" / "final"
    options.update(overrides or {})
    cmd = [sys.executable, "-m", "qwen2vl", "train", "--config", str(RECIPE / f"stage{stage}.yaml")]
    for key, value in options.items():
        cmd += [f"--{key}", str(value)]
    run(cmd + ["--resume"], env)
    return final


def export(final: Path, out: Path) -> Path:
    """The bf16 export of the last stage; its processor settings are those training used."""
    import torch

    from qwen2vl import Qwen2VL
    from qwen2vl.train.export import export_checkpoint

    model = Qwen2VL.from_pretrained(final, dtype=torch.float32)
    preprocessor = json.loads((final / "preprocessor_config.json").read_text())
    pixels = (preprocessor["min_pixels"], preprocessor["max_pixels"])
    return export_checkpoint(model.state_dict(), model.config, out / "qwen2vl-nano", final, pixels,
                             dtype=torch.bfloat16)


def share_first_stages(old: Path, out: Path) -> None:
    """Link ``old``'s data, tokenizer and stage 1 into ``out`` (``--extend``): they are skipped there."""
    for name in ("data", "tokenizer", "stage1"):
        if not (old / name).exists():
            raise SystemExit(f"--extend {old}: it has no {name}/; finish that run first")
        if not (out / name).exists():
            (out / name).symlink_to((old / name).resolve())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", help="cpu, gpu, or a preset YAML file")
    p.add_argument("--out", default="runs/nano", help="run directory (default runs/nano)")
    p.add_argument("--force-size", help="N or WxH: every image and frame squashed to this size (ablation)")
    p.add_argument("--threads", type=int, help="torch threads per process (default: torch's choice)")
    p.add_argument("--extend", type=Path, help="a finished run whose stage 2 this run continues")
    p.add_argument("--extend-steps", type=int, default=600, help="stage-2 steps added by --extend (default 600)")
    args = p.parse_args(argv)
    preset_file = Path(args.preset) if args.preset.endswith(".yaml") else RECIPE / f"{args.preset}.yaml"
    preset = yaml.safe_load(preset_file.read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)

    overrides = {}
    if args.extend:
        share_first_stages(args.extend, out)
        overrides[2] = {"model": args.extend / "stage2" / "final", "max_steps": args.extend_steps,
                        "seed": 11, "warmup_steps": 10}
    data = make_data(out, preset, args.force_size, env)
    tokenizer = out / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        run([sys.executable, "-m", "qwen2vl.data.tokenizer_train", "--out", str(tokenizer),
             "--vocab-size", "1920"], env)
    check_token_ids(tokenizer, RECIPE / "config.json")
    final = None
    for stage in (1, 2, 3):
        final = train_stage(stage, out, preset, data, tokenizer, env, overrides.get(stage))
    shipped = export(final, out)
    cmd = [sys.executable, "-m", "qwen2vl", "eval", "--model", str(shipped), "--data", str(data["test"]),
           "--video-pixels", preset["data"]["video_pixels"], "--out", str(out / "eval.json"), "--quiet"]
    if args.force_size:
        cmd += ["--force-size", args.force_size]
    print("+ " + " ".join(cmd), flush=True)
    table = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True).stdout
    (out / "eval.txt").write_text(table)
    (shipped / "README.md").write_text(model_card(out, preset, table, " ".join(sys.argv[1:] if argv is None else argv)))
    print(table + f"exported {shipped}", flush=True)
    return 0


def stage_parts(out: Path, stage: int) -> list[Path]:
    """The output directories that trained ``stage`` of run ``out``, in order: more than one when the
    stage started from the same stage of another run (``--extend``)."""
    parts, directory = [], out / f"stage{stage}"
    while directory is not None:
        parts.insert(0, directory)
        start = Path(json.loads((directory / "options.json").read_text()).get("model") or "")
        directory = start.parent if start.name == "final" and start.parent.name == f"stage{stage}" else None
    return parts


def stage_records(out: Path, stage: int) -> list[list[dict]]:
    """The metrics.jsonl records of each part of ``stage`` (see :func:`stage_parts`)."""
    return [read_metrics(part / "metrics.jsonl") for part in stage_parts(out, stage)]


def stage_budget(out: Path) -> list[tuple[str, int, float, int]]:
    """(stage, optimizer steps, seconds in steps, tokens) per stage part, from the metrics records."""
    rows = []
    for stage in (1, 2, 3):
        parts = stage_records(out, stage)
        for i, records in enumerate(parts):
            name = str(stage) if len(parts) == 1 else f"{stage} (part {i + 1})"
            rows.append((name, len(records), sum(r["step_s"] for r in records), sum(r["tokens"] for r in records)))
    return rows


def model_card(out: Path, preset: dict, table: str, command: str) -> str:
    """The exported checkpoint's README.md: what it is, how it was trained, what it scores."""
    config = json.loads((RECIPE / "config.json").read_text())
    budget = stage_budget(out)
    lines = [
        "# qwen2vl-nano", "",
        "The Qwen2-VL architecture at small widths, trained from scratch on the synthetic data of",
        "`qwen2vl.data.synthetic` (documents, receipts and signs to read, shapes to count and locate, bar",
        "charts, short videos) with `qwen2vl train`, in the paper's three stages. A demonstration model: it",
        "knows only these kinds of questions. Loads unchanged in transformers (`Qwen2VLForConditionalGeneration`).",
        "Read its held-out scores (below) before relying on an answer: a CPU budget leaves it near chance;",
        "docs/resolution-ablation.md in the project has the loss curves and what the budget would need.", "",
        f"- decoder: {config['num_hidden_layers']} layers, width {config['hidden_size']}, "
        f"{config['num_attention_heads']} query / {config['num_key_value_heads']} key-value heads, "
        f"vocabulary {config['vocab_size']} (byte-level BPE trained on the synthetic text)",
        f"- vision: {config['vision_config']['depth']} blocks, width {config['vision_config']['embed_dim']}, "
        "2x2 patch merger", "",
        "## Recipe", "",
        f"`python recipes/nano/train.py {command}` (data, tokenizer, stages, evaluation, export)"
        + ("; its stage 2 continues an earlier run's (`--extend`; both parts below)."
           if any("part" in row[0] for row in budget) else "."), "",
        f"- data: {preset['data']['train']['n']:,} training samples (seed {preset['data']['train']['seed']}), "
        f"size policy `{preset['data']['size_policy']}`, task mix `{preset['data']['tasks']}`",
        f"- batch: {preset['train']['batch_size']} packed rows of {preset['train']['seq_len']} tokens per step", "",
        "| stage | trains | steps | time in steps | tokens |", "|---|---|---|---|---|"]
    trains = {1: "vision + merger", 2: "everything", 3: "LLM + merger"}
    for stage, steps, seconds, tokens in budget:
        lines.append(f"| {stage} | {trains[int(stage[0])]} | {steps} | {seconds / 60:.0f} min | {tokens:,} |")
    total_s, total_tokens = sum(row[2] for row in budget), sum(row[3] for row in budget)
    lines.append(f"| all | | {sum(row[1] for row in budget)} | {total_s / 60:.0f} min | {total_tokens:,} |")
    lines += ["", "## Held-out evaluation", "",
              f"`qwen2vl eval` on {preset['data']['test']['n']} samples of the eval split "
              f"(seed {preset['data']['test']['seed']}, never trained on):", "", "```text", *[line for line in table.rstrip().splitlines() if not line.startswith("wrote ")], "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
