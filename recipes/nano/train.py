"""qwen2vl-nano from scratch, end to end: data -> tokenizer -> three training stages -> eval -> export.

    python recipes/nano/train.py cpu                                  # native resolution -> runs/nano
    python recipes/nano/train.py cpu --force-size 224 --out runs/nano-224   # the 224x224 ablation arm
    python recipes/nano/train.py gpu --out runs/nano-gpu

Each step is skipped when its output is already there, and an interrupted stage resumes from its
last checkpoint, so the same command continues a run. Stage options come from ``stage{1,2,3}.yaml``
beside this file; the preset (``cpu.yaml``, ``gpu.yaml``) sets data sizes, batch shape and steps.
``--force-size 224`` squashes every image and video frame to 224x224 in training and evaluation.
Outputs in ``--out``: ``data/``, ``tokenizer/``, ``stage{1,2,3}/`` (metrics.jsonl, loss.png,
final/), ``qwen2vl-nano/`` (the bf16 export), ``eval.json`` and ``eval.txt`` (the held-out table).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

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
                env: dict[str, str]) -> Path:
    final = out / f"stage{stage}" / "final"
    if (final / "config.json").is_file():
        return final
    options = {"data": data["train"] / "data.jsonl", "eval_data": data["dev"] / "data.jsonl",
               "output_dir": out / f"stage{stage}", "max_steps": preset["stages"][stage],
               "progress": "false", **preset["train"]}
    if stage == 1:
        options.update(model_config=RECIPE / "config.json", tokenizer=tokenizer)
    else:
        options["model"] = out / f"stage{stage - 1}" / "final"
    cmd = [sys.executable, "-m", "qwen2vl", "train", "--config", str(RECIPE / f"stage{stage}.yaml")]
    for key, value in options.items():
        cmd += [f"--{key}", str(value)]
    run(cmd + ["--resume"], env)
    return final


def export(final: Path, out: Path) -> tuple[Path, Path]:
    """(bf16 export, float32 copy of the same bf16-rounded weights for evaluation on CPU)."""
    import torch

    from qwen2vl import Qwen2VL
    from qwen2vl.train.export import SIDE_FILES

    model = Qwen2VL.from_pretrained(final, dtype=torch.float32)
    targets = []
    for name, dtype in (("qwen2vl-nano", torch.bfloat16), ("eval-model", torch.float32)):
        target = out / name
        shutil.rmtree(target, ignore_errors=True)
        model.to(torch.bfloat16).to(dtype).save_pretrained(target)
        for side in SIDE_FILES:
            if (final / side).is_file():
                shutil.copyfile(final / side, target / side)
        targets.append(target)
    return targets[0], targets[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", help="cpu, gpu, or a preset YAML file")
    p.add_argument("--out", default="runs/nano", help="run directory (default runs/nano)")
    p.add_argument("--force-size", help="N or WxH: every image and frame squashed to this size (ablation)")
    p.add_argument("--threads", type=int, help="torch threads per process (default: torch's choice)")
    args = p.parse_args(argv)
    preset_file = Path(args.preset) if args.preset.endswith(".yaml") else RECIPE / f"{args.preset}.yaml"
    preset = yaml.safe_load(preset_file.read_text())
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
    for stage in (1, 2, 3):
        final = train_stage(stage, out, preset, data, tokenizer, env)
    shipped, eval_model = export(final, out)
    cmd = [sys.executable, "-m", "qwen2vl", "eval", "--model", str(eval_model), "--data", str(data["test"]),
           "--video-pixels", preset["data"]["video_pixels"], "--out", str(out / "eval.json"), "--quiet"]
    if args.force_size:
        cmd += ["--force-size", args.force_size]
    print("+ " + " ".join(cmd), flush=True)
    table = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True).stdout
    (out / "eval.txt").write_text(table)
    print(table + f"exported {shipped}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
