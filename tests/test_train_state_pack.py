"""recipes/nano/state.py: a run packed into the repository's compact state resumes where it stopped."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import make_color_data, train_args

from qwen2vl.model.qwen2vl import Qwen2VL
from qwen2vl.train.cli import main
from qwen2vl.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


def load_state_module():
    spec = importlib.util.spec_from_file_location("nano_state", REPO / "recipes" / "nano" / "state.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pack_unpack_resume_continues_the_run(tmp_path):
    state = load_state_module()
    data = make_color_data(tmp_path / "colors", repeats=2)
    common = dict(max_steps=6, seq_len=160, batch_size=2, lr=5e-3, warmup_steps=1, export=False, save_every=3)
    # a run stopped after step 3, packed, unpacked elsewhere and resumed, against the same run resumed
    # from its own (float32) checkpoint
    run = tmp_path / "run"
    args = train_args(tmp_path, data, run / "stage2", **common)
    assert main(args[:args.index("--max_steps") + 1] + ["3"] + args[args.index("--max_steps") + 2:]) == 0
    shutil.copytree(tmp_path / "tok", run / "tokenizer")
    packed = state.pack(run, tmp_path / "state")
    assert {p.name for p in packed.iterdir()} == {"state.pt", "tokenizer", "config.json", "metrics.jsonl",
                                                 "options.json"}
    moments = torch.load(packed / "state.pt", weights_only=False)["checkpoint"]["optim"]["state"]
    assert {v["exp_avg"]["codes"].dtype for v in moments.values()} == {torch.float8_e4m3fn}

    # its weights as a bf16 checkpoint: those of the step-3 checkpoint, rounded
    model = Qwen2VL.from_pretrained(state.export(packed, tmp_path / "model"), dtype=torch.float32)
    weights = torch.load(packed / "state.pt", weights_only=False)["checkpoint"]["model"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, weights["net." + name].to(torch.bfloat16).float(), rtol=0, atol=0)

    again = tmp_path / "again"
    state.unpack(packed, again)
    assert (again / "tokenizer" / "tokenizer.json").is_file()
    with pytest.raises(SystemExit, match="already has a checkpoint"):
        state.unpack(packed, again)
    assert main(train_args(tmp_path, data, again / "stage2", **common) + ["--resume"]) == 0
    resumed = read_metrics(again / "stage2" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 7))  # the packed steps' records came along
    # Adam's moments came back rounded to 8 bits: close to, not equal to, the float32 resume
    fp32 = tmp_path / "fp32"
    shutil.copytree(run, fp32)
    assert main(train_args(tmp_path, data, fp32 / "stage2", **common) + ["--resume"]) == 0
    exact = {r["step"]: r["loss"] for r in read_metrics(fp32 / "stage2" / "metrics.jsonl")}
    for step in (4, 5, 6):
        assert resumed[step - 1]["loss"] == pytest.approx(exact[step], rel=1e-3)
    assert len({exact[s] for s in (4, 5, 6)}) == 3  # training moved on after the resume


def test_moments_round_trip_through_8_bits_within_their_rounding():
    state = load_state_module()
    torch.manual_seed(0)
    grads = torch.randn(1000, 37) * torch.logspace(-6, 0, 37)  # columns of very different magnitudes
    exp_avg, exp_avg_sq = grads * 0.1, grads.square() * 0.001
    for value, root, bound in ((exp_avg, False, 1 / 16), (exp_avg_sq, True, 1 / 8)):
        stored = state.encode_moment(value, root)
        assert stored["codes"].numel() == 37 * 1000 + (-37 * 1000) % state.BLOCK
        back = state.decode_moment(stored)
        assert back.shape == value.shape and back.dtype == torch.float32
        block_max = torch.nn.functional.pad(value.abs().flatten(), (0, (-value.numel()) % state.BLOCK)) \
            .view(-1, state.BLOCK).amax(1).repeat_interleave(state.BLOCK)[:value.numel()].view(value.shape)
        normal = value.abs() > block_max * (1e-4 if not root else 1e-8)  # away from float8's subnormals
        assert ((back - value).abs() <= bound * value.abs())[normal].all()
        assert (back.sign() == value.sign())[back != 0].all()
    old = exp_avg.to(torch.bfloat16)  # the states packed before carried bfloat16 moments
    assert torch.equal(state.decode_moment(old), old.float())


def test_progress_records_samples_seen_and_where_a_fitted_line_meets_a_target(tmp_path):
    spec = importlib.util.spec_from_file_location("nano_progress", REPO / "recipes" / "nano" / "progress.py")
    progress = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(progress)
    metrics = tmp_path / "metrics.jsonl"  # a resumed run repeats step 2: its last record counts
    metrics.write_text("".join(f'{{"step": {s}, "samples": {n}}}\n' for s, n in [(1, 5), (2, 7), (2, 9), (3, 4)])
                       + '{"step": 3, "eval_loss": 1.0}\n')
    assert progress.samples_seen(metrics, 3) == 18
    with pytest.raises(SystemExit, match="no record of 1 step"):
        progress.samples_seen(metrics, 4)
    report = tmp_path / "eval.json"
    report.write_text('{"rows": [{"group": "counting", "n": 62, "score": 0.5}]}')
    evals = tmp_path / "evals.jsonl"
    progress.add(3, report, metrics, evals)
    progress.add(3, report, metrics, evals)  # the same step again replaces its line
    assert [json.loads(line)["samples"] for line in evals.read_text().splitlines()] == [18]
    words = tmp_path / "words.json"  # a side eval: its overall score and its items' mean ANLS
    words.write_text('{"rows": [{"group": "reading (normal text)", "n": 30, "score": 0.1, "anls": 0.4},'
                     ' {"group": "reading (small text)", "n": 10, "score": 0.0, "anls": 0.2},'
                     ' {"group": "all", "n": 40, "score": 0.075}]}')
    entry = progress.add(3, report, metrics, evals, probes={"words": words})
    assert entry["probes"] == {"words": {"score": 0.075, "n": 40, "anls": 0.35}}
    assert json.loads(evals.read_text())["probes"]["words"]["anls"] == 0.35
    progress.plot(tmp_path / "progress.png", 0, evals)
    assert (tmp_path / "progress.png").stat().st_size > 0
    # 10 points per tenfold through (1e3, 20 %) and (1e4, 30 %): 80 % at 1e9 samples
    assert progress.needed([(1000, 0.2), (10000, 0.3)], 0.8) == "1.0e+09 samples (10.0 points per tenfold)"
    assert progress.needed([(1000, 0.3), (10000, 0.2)], 0.8) == "no upward trend yet"
    assert progress.needed([(1000, 0.3)], 0.8) == "one point"


def test_a_checkpoint_of_two_processes_packs_whole_and_resumes_in_one(tmp_path):
    """``train.py --procs 2`` writes one shard per process: pack joins them (the weights are the run's
    final export) and the unpacked state continues in a single process."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    state = load_state_module()
    data = make_color_data(tmp_path / "colors", repeats=2)
    common = dict(seq_len=160, batch_size=2, lr=5e-3, warmup_steps=1, save_every=3)
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "qwen2vl",
           "train", *train_args(tmp_path, data, run / "stage2", max_steps=3, **common)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    shards = sorted(p.name for p in (run / "stage2" / "checkpoints" / "step-00000003").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    shutil.copytree(tmp_path / "tok", run / "tokenizer")
    packed = state.pack(run, tmp_path / "state")
    weights = torch.load(packed / "state.pt", weights_only=False)["checkpoint"]["model"]
    final = load_file(run / "stage2" / "final" / "model.safetensors")
    assert {"net." + k for k in final} <= set(weights)
    for name, value in final.items():
        torch.testing.assert_close(weights["net." + name].to(value.dtype), value, rtol=0, atol=0)

    again = tmp_path / "again"
    state.unpack(packed, again)
    assert main(train_args(tmp_path, data, again / "stage2", max_steps=5, export=False, **common) + ["--resume"]) == 0
    assert [r["step"] for r in read_metrics(again / "stage2" / "metrics.jsonl")] == [1, 2, 3, 4, 5]
