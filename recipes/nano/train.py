"""qwen2vl-nano from scratch, end to end: eval data -> tokenizer -> training -> eval -> export.

    python recipes/nano/train.py cpu --procs 2 --threads 1                # native resolution -> runs/nano
    python recipes/nano/train.py cpu --force-size 224 --out runs/nano-224  # the 224x224 ablation arm
    python recipes/nano/train.py gpu --out runs/nano-gpu

Training data is generated on the fly (``qwen2vl.train.stream``): each step's rows are a pure function
of the step, so nothing is written up front and an interrupted run resumes exactly. Only the dev set
(the training-time eval loss) and the held-out test set are written to disk.

Stages (options from ``stage{2,3}.yaml`` beside this file; the preset sets the stream, batch shape and
steps): **2** trains everything from a fresh model, its stream opening with a curriculum phase of
large, clear items (``basics``: one to four big shapes) before the full task mix; this phase is what
stage 1 is here: the paper's stage 1 (vision and merger trained under a frozen, pretrained LLM) has no
LLM to align to when the LLM starts from nothing. **3** trains the LLM and merger with vision frozen.

Each step is skipped when its output is already there, and an interrupted stage resumes from its
last checkpoint, so the same command continues a run (across sessions too: see docs/training.md).
Outputs in ``--out``: ``data/`` (dev, test, the stream specs), ``tokenizer/``, ``stage{2,3}/``
(metrics.jsonl, loss.png, checkpoints/, final/), ``qwen2vl-nano/`` (the bf16 export, with a model
card), ``eval.json`` and ``eval.txt`` (the held-out table).

``--procs N`` trains with N processes under torchrun (gloo on the CPU), each taking its share of every
step's rows; the steps, rows and losses are those of one process. On 2 cores two one-thread processes
beat one two-thread process by ~1.5x (the nano model's ops are too small to keep two threads busy, and
each process generates its own rows): ``python benchmarks/train.py --nano fill-q3-512x8 --layouts 1x2,2x1``.
A run may change ``--procs`` when it resumes.
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
STAGES = (2, 3)
EVAL_NEW_TOKENS = 256  # a GUI answer is ~80 tokens of this tokenizer per action, up to three actions


def run(cmd: list[str], env: dict[str, str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def make_data(out: Path, preset: dict, force_size: str | None, env: dict[str, str]) -> dict[str, Path]:
    """Dev (training-time eval loss) and test (held-out) sets, and one stream spec per stage.

    The test set is never forced to a size (the evaluator does that); the stream of stage k uses seed
    ``stream.seed + k``, so no two stages train on the same samples.
    """
    data = preset["data"]
    paths = {}
    for name in ("dev", "test"):
        target = out / "data" / name
        paths[name] = target
        if (target / "manifest.json").is_file():
            continue
        cmd = [sys.executable, "-m", "qwen2vl.data.make_dataset", "--out", str(target),
               "--n", str(data[name]["n"]), "--seed", str(data[name]["seed"]), "--split", "eval",
               "--size-policy", data["size_policy"], "--video-pixels", data["video_pixels"],
               "--tasks", data["tasks"], "--workers", str(data["workers"]), "--quiet"]
        if force_size and name != "test":
            cmd += ["--force-size", force_size]
        run(cmd, env)
    for stage in STAGES:
        paths[stage] = out / "data" / f"stage{stage}.yaml"
        paths[stage].write_text(yaml.safe_dump({"synthetic": stream_spec(preset, stage, force_size)}, sort_keys=False))
    return paths


def stream_spec(preset: dict, stage: int, force_size: str | None = None) -> dict:
    """The ``synthetic:`` mapping of stage ``stage``'s training stream (``qwen2vl.train.stream``)."""
    data = preset["data"]
    spec = dict(preset["stream"]["common"], **preset["stream"].get(stage, {}))
    spec.update(split="train", seed=preset["stream"]["seed"] + stage, size_policy=data["size_policy"],
                video_pixels=[int(v) for v in data["video_pixels"].split(",")])
    if force_size:
        side = [int(v) for v in force_size.lower().split("x")]
        spec["force_size"] = [side[0], side[-1]]
    return spec


def check_token_ids(tokenizer: Path, config: Path) -> None:
    """The committed config.json must use the ids of the tokenizer just trained."""
    from qwen2vl.data.tokenizer_train import config_token_ids

    ids, cfg = config_token_ids(tokenizer), json.loads(config.read_text())
    wrong = [f"{k}: tokenizer {v}, config {cfg.get(k)}" for k, v in ids.items()
             if k != "num_tokens" and cfg.get(k) != v]
    if wrong:
        raise SystemExit(f"{config} does not fit the tokenizer in {tokenizer}: " + "; ".join(wrong))


def train_stage(stage: int, out: Path, preset: dict, data: dict[str, Path], tokenizer: Path,
                env: dict[str, str], procs: int = 1) -> Path:
    final = out / f"stage{stage}" / "final"
    if (final / "config.json").is_file():
        return final
    # images are capped at the largest area the size policy draws; the export keeps that bound
    max_side = SIZE_POLICIES[preset["data"]["size_policy"]].max_side
    options = {"data": data[stage], "eval_data": data["dev"] / "data.jsonl",
               "output_dir": out / f"stage{stage}", "max_steps": preset["stages"][stage],
               "max_pixels": max_side**2, "progress": "false", **preset["train"]}
    if stage == STAGES[0]:
        options.update(model_config=RECIPE / "config.json", tokenizer=tokenizer)
    else:
        options["model"] = out / f"stage{stage - 1}" / "final"
    launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(procs)]
    cmd = launcher + ["-m", "qwen2vl", "train", "--config", str(RECIPE / f"stage{stage}.yaml")]
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", help="cpu, gpu, or a preset YAML file")
    p.add_argument("--out", default="runs/nano", help="run directory (default runs/nano)")
    p.add_argument("--force-size", help="N or WxH: every image and frame squashed to this size (ablation)")
    p.add_argument("--threads", type=int, help="torch threads per process (default: torch's choice)")
    p.add_argument("--procs", type=int, default=1, help="training processes (torchrun, gloo; default 1)")
    p.add_argument("--stop-after", type=int, choices=STAGES, help="end after this stage (no eval, no export)")
    args = p.parse_args(argv)
    preset_file = Path(args.preset) if args.preset.endswith(".yaml") else RECIPE / f"{args.preset}.yaml"
    preset = yaml.safe_load(preset_file.read_text())
    rows = preset["train"]["batch_size"]
    if args.procs < 1 or rows % args.procs:
        p.error(f"--procs {args.procs}: the preset's {rows} rows per step must split evenly over the processes")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)

    data = make_data(out, preset, args.force_size, env)
    tokenizer = out / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        run([sys.executable, "-m", "qwen2vl.data.tokenizer_train", "--out", str(tokenizer),
             "--vocab-size", "1920"], env)
    check_token_ids(tokenizer, RECIPE / "config.json")
    final = None
    for stage in STAGES:
        final = train_stage(stage, out, preset, data, tokenizer, env, args.procs)
        if stage == args.stop_after:
            return 0
    shipped = export(final, out)
    cmd = [sys.executable, "-m", "qwen2vl", "eval", "--model", str(shipped), "--data", str(data["test"]),
           "--video-pixels", preset["data"]["video_pixels"], "--max-new-tokens", str(EVAL_NEW_TOKENS),
           "--out", str(out / "eval.json"), "--quiet"]
    if args.force_size:
        cmd += ["--force-size", args.force_size]
    print("+ " + " ".join(cmd), flush=True)
    table = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True).stdout
    (out / "eval.txt").write_text(table)
    (shipped / "README.md").write_text(model_card(out, preset, table, " ".join(sys.argv[1:] if argv is None else argv)))
    print(table + f"exported {shipped}", flush=True)
    return 0


def stage_records(out: Path, stage: int) -> list[dict]:
    """The metrics.jsonl records of ``stage`` of run ``out`` (none if it has not started)."""
    path = out / f"stage{stage}" / "metrics.jsonl"
    return read_metrics(path) if path.is_file() else []


def stage_budget(out: Path) -> list[tuple[str, int, float, int, int]]:
    """(stage, optimizer steps, seconds in steps, tokens, samples) per stage, from the metrics records."""
    rows = []
    for stage in STAGES:
        records = stage_records(out, stage)
        rows.append((str(stage), len(records), sum(r["step_s"] for r in records), sum(r["tokens"] for r in records),
                     sum(r.get("samples", 0) for r in records)))
    return rows


def model_card(out: Path, preset: dict, table: str, command: str) -> str:
    """The exported checkpoint's README.md: what it is, how it was trained, what it scores."""
    config = json.loads((RECIPE / "config.json").read_text())
    budget = stage_budget(out)
    lines = [
        "# qwen2vl-nano", "",
        "The Qwen2-VL architecture at small widths, trained from scratch on the synthetic data of",
        "`qwen2vl.data.synthetic` (documents, receipts and signs to read, shapes to count and locate, bar",
        "charts, short videos, GUI screens) with `qwen2vl train`. A demonstration model: it",
        "knows only these kinds of questions. Loads unchanged in transformers (`Qwen2VLForConditionalGeneration`).",
        "Read its held-out scores (below) before relying on an answer: a CPU budget leaves it near chance;",
        "docs/resolution-ablation.md in the project has the loss curves and what the budget would need.", "",
        f"- decoder: {config['num_hidden_layers']} layers, width {config['hidden_size']}, "
        f"{config['num_attention_heads']} query / {config['num_key_value_heads']} key-value heads, "
        f"vocabulary {config['vocab_size']} (byte-level BPE trained on the synthetic text)",
        f"- vision: {config['vision_config']['depth']} blocks, width {config['vision_config']['embed_dim']}, "
        "2x2 patch merger", "",
        "## Recipe", "",
        f"`python recipes/nano/train.py {command}` (eval data, tokenizer, stages, evaluation, export).", "",
        f"- training data: generated on the fly, task mix `{preset['stream']['common']['tasks']}`, size policy "
        f"`{preset['data']['size_policy']}`; stage 2 opens with {preset['stream'][2]['phases'][0]['rows']:,} rows "
        f"of `{preset['stream'][2]['phases'][0]['tasks']}` (the curriculum)",
        f"- batch: {preset['train']['batch_size']} packed rows of {preset['train']['seq_len']} tokens per step", "",
        "| stage | trains | steps | samples | time in steps | tokens |", "|---|---|---|---|---|---|"]
    trains = {2: "everything", 3: "LLM + merger"}
    for stage, steps, seconds, tokens, samples in budget:
        lines.append(f"| {stage} | {trains[int(stage)]} | {steps} | {samples:,} | {seconds / 60:.0f} min | {tokens:,} |")
    lines.append(f"| all | | {sum(r[1] for r in budget)} | {sum(r[4] for r in budget):,} | "
                 f"{sum(r[2] for r in budget) / 60:.0f} min | {sum(r[3] for r in budget):,} |")
    lines += ["", "## Held-out evaluation", "",
              f"`qwen2vl eval` on {preset['data']['test']['n']} samples of the eval split "
              f"(seed {preset['data']['test']['seed']}, never trained on):", "", "```text", *[line for line in table.rstrip().splitlines() if not line.startswith("wrote ")], "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
