"""``torchrun --nproc_per_node 2`` on CPU (gloo) with FSDP2 matches one process at the same global batch."""

import json
import os
import signal
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


def data_with_text_only(tmp_path) -> Path:
    data = make_color_data(tmp_path / "colors")
    text_only = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
                 for w in ("one", "two", "three")]
    with data.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in text_only)
    return data


def compare_fsdp_with_single(tmp_path, data: Path, fsdp_only: dict, **common) -> None:
    # DETAIL: a collective that differs between the processes fails loudly instead of hanging
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TORCH_DISTRIBUTED_DEBUG="DETAIL")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "qwen2vl", "train", *train_args(tmp_path, data, tmp_path / "fsdp", eval_data=data, **fsdp_only, **common)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: a hang is cleaned up whole
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    assert "on 2 process(es)" in stdout
    assert main(train_args(tmp_path, data, tmp_path / "single", eval_data=data, **common)) == 0

    sharded, single = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("fsdp", "single"))
    assert [r["step"] for r in sharded] == list(range(1, common["max_steps"] + 1))  # written once, by process 0
    for a, b in zip(sharded, single):
        assert a["tokens"] == b["tokens"] and a["supervised_tokens"] == b["supervised_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert sharded[-1]["eval_loss"] == pytest.approx(single[-1]["eval_loss"], rel=LOSS_RTOL)
    # the FSDP export is a complete plain checkpoint (adapters merged) with the same weights
    a = load_file(tmp_path / "fsdp" / "final" / "model.safetensors")
    b = load_file(tmp_path / "single" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() < 1e-3, key


def test_two_process_fsdp_matches_one_process(tmp_path):
    """4 rows per step: 2 per process as 2 micro-steps of 1 row there, 1 micro-step of 4 rows here.
    Some micro-steps have no image. LoRA on the LLM (frozen base and trained adapters in one FSDP
    unit), vision and merger trained fully; gradient checkpointing under FSDP only."""
    compare_fsdp_with_single(tmp_path, data_with_text_only(tmp_path),
                             fsdp_only=dict(grad_accum=2, gradient_checkpointing=True),
                             max_steps=3, seq_len=96, batch_size=4, lr=5e-3, stage=2, **{"lora.r": 4, "lora.alpha": 8})


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_fsdp_frozen_parts_stay_in_lockstep(tmp_path, stage):
    """Stage 1 (frozen LLM) and 3 (frozen vision): a process whose rows hold no image still runs the
    same all-gathers and reduce-scatters as one whose rows do."""
    compare_fsdp_with_single(tmp_path, data_with_text_only(tmp_path), fsdp_only=dict(grad_accum=2),
                             max_steps=3, seq_len=96, batch_size=4, lr=5e-3, stage=stage)
