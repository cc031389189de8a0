"""Kill a training process (SIGKILL) after a checkpoint, resume it: every later loss equals the
uninterrupted run's exactly (model, optimizer, RNG, data order and schedule restored)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from train_helpers import make_color_data, train_args

from qwen2vl.train.checkpointing import complete_checkpoints
from qwen2vl.train.cli import main
from qwen2vl.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
KILL_AFTER = 2  # kill once the checkpoint of this step exists


def run_until_checkpoint(args: list[str], out: Path, step: int, timeout: float = 240) -> subprocess.Popen:
    """Start ``qwen2vl train`` in a subprocess and SIGKILL it as soon as ``step``'s checkpoint appears."""
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "qwen2vl", "train", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = out / "checkpoints" / f"step-{step:08d}"
    deadline = time.monotonic() + timeout
    while not (target / "state.json").is_file():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("no checkpoint appeared in time")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    return proc


def test_sigkill_then_resume_repeats_the_uninterrupted_run(tmp_path):
    data = make_color_data(tmp_path / "colors", repeats=2)
    # LoRA with dropout on the LLM, the vision tower and merger trained fully: RNG, adapter and full
    # optimizer state all have to come back
    common = dict(max_steps=7, save_every=KILL_AFTER, seq_len=160, batch_size=2, grad_accum=2, lr=5e-3,
                  warmup_steps=2, export=False, stage=2, **{"lora.r": 4, "lora.dropout": 0.1})
    assert main(train_args(tmp_path, data, tmp_path / "full", **common)) == 0
    reference = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl")}

    out = tmp_path / "killed"
    args = train_args(tmp_path, data, out, **common)
    proc = run_until_checkpoint(args, out, KILL_AFTER)
    assert proc.returncode == -signal.SIGKILL
    done = read_metrics(out / "metrics.jsonl")
    assert len(done) < 7, "the run finished before it was killed"
    resumed_from = complete_checkpoints(out)[-1][0]
    # a save interrupted by the kill leaves a .tmp directory: it must be ignored and cleared
    partial = out / "checkpoints" / f"step-{resumed_from + 1:08d}.tmp"
    partial.mkdir(exist_ok=True)
    (partial / "__0_0.distcp").write_bytes(b"torn")

    assert main(args + ["--resume"]) == 0
    resumed = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 8))
    after = {r["step"]: r["loss"] for r in resumed if r["step"] > resumed_from}
    assert after and after == {s: reference[s] for s in after}  # exact equality
    assert not partial.exists()
    # and the losses actually changed over the run (the comparison is not vacuous)
    assert len(set(after.values())) == len(after)
