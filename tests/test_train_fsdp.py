"""``torchrun --nproc_per_node 2`` on CPU (gloo) with FSDP2 matches one process at the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from train_helpers import make_color_data, train_args

from qwen2vl.train.cli import main
from qwen2vl.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
LOSS_RTOL = 1e-5  # reduction order differs between one and two processes; nothing else may


def test_two_process_fsdp_matches_one_process(tmp_path):
    data = make_color_data(tmp_path / "colors")
    text_only = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
                 for w in ("one", "two", "three")]
    with data.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in text_only)
    # 4 rows per step: 2 per process as 2 micro-steps of 1 row there, 1 micro-step of 4 rows here;
    # some micro-steps have no image (the vision tower then runs on a blank input in every process)
    common = dict(max_steps=3, seq_len=96, batch_size=4, lr=5e-3, eval_data=data, stage=2)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "qwen2vl", "train", *train_args(tmp_path, data, tmp_path / "fsdp", grad_accum=2, **common)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stdout
    assert main(train_args(tmp_path, data, tmp_path / "single", grad_accum=1, **common)) == 0

    sharded, single = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("fsdp", "single"))
    assert [r["step"] for r in sharded] == [1, 2, 3]  # written once, by process 0
    for a, b in zip(sharded, single):
        assert a["tokens"] == b["tokens"] and a["supervised_tokens"] == b["supervised_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert sharded[-1]["eval_loss"] == pytest.approx(single[-1]["eval_loss"], rel=LOSS_RTOL)
    # the FSDP export is a complete plain checkpoint with the same weights
    a = load_file(tmp_path / "fsdp" / "final" / "model.safetensors")
    b = load_file(tmp_path / "single" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() < 1e-3, key
