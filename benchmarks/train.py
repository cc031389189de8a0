"""Training throughput: ours (packed, and one sample per row) against transformers (+ peft for LoRA).

    python benchmarks/train.py                                  # this CPU: small shape, LoRA and full
    python benchmarks/train.py --mode lora --steps 3
    python benchmarks/train.py --device cuda --shape 2b --gradient-checkpointing   # a GPU, bf16 autocast

Every engine loads the same random checkpoint (written once to --dir): ``small`` is a 4-layer
Qwen2-VL with the real 151936-word vocabulary, ``2b`` the released 2B shape. Each trains on the
same 12 samples (8 with an image of 64-80 merged tokens, 4 text only; answers supervised), one
optimizer step per timing: forward, backward, AdamW, float32 master weights (bf16 autocast on a
GPU). LoRA: r 16 on q/k/v/o/gate/up/down of the LLM, everything else frozen. Full: all weights.
transformers gets the samples as one padded batch with labels (its standard training input);
ours gets them packed into --seq-len rows and, for a like-for-like view, one sample per row.
Tokens/s counts real tokens (no padding). Each engine runs in its own subprocess.

``--nano`` measures the qwen2vl-nano recipe instead: ``qwen2vl train`` (stage 2, the recipe's model
config and tokenizer) on its synthetic data, samples per second of whole optimizer steps (data
preparation included) after one warm-up step, for each data arm, arms alternated ``--repeats`` times::

    python benchmarks/train.py --nano fixed-1024x4,stream-1024x4,stream-512x8 --steps 8 --threads 2
    python benchmarks/train.py --nano stream-512x8,fill-512x8,fill-q3-512x8 --steps 8 --threads 2   # answers/s
    python benchmarks/train.py --nano fill-q3-512x8,fill-q3-512x8-compiled,fill-q3-512x8-bf16 --steps 8   # compile, bf16
    python benchmarks/train.py --nano fill-q3-512x8,fill-q3-512x8-denormals --state recipes/nano/state --steps 8
    python benchmarks/train.py --nano fill-q3-512x8 --layouts 1x2,2x1 --state recipes/nano/state --steps 12

``--layouts PxT,...`` runs each arm as P processes (torchrun, gloo) of T threads, the step's rows split
over them (default: one process of ``--threads``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

SHAPE = dict(vocab_size=151936, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, tie_word_embeddings=True, mrope_section=[8, 12, 12],
             vision=dict(depth=4, embed_dim=256, num_heads=4))
IMAGE, VSTART, VEND = 151655, 151652, 151653
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GRIDS = [(1, 16, 16), (1, 16, 20), (1, 20, 16), (1, 16, 16)]


def build(directory: Path, shape: str) -> None:
    from qwen2vl import Qwen2VL
    from qwen2vl.config import Qwen2VLConfig, TextConfig, VisionConfig, preset
    if shape == "2b":
        config = preset("qwen2-vl-2b")
    else:
        spec = dict(SHAPE)
        vision = VisionConfig(**spec.pop("vision"), hidden_size=spec["hidden_size"])
        config = Qwen2VLConfig(text=TextConfig(rms_norm_eps=1e-6, **spec), vision=vision, torch_dtype="float32")
    Qwen2VL.from_config(config, seed=0).save_pretrained(directory)


def autocast(device: str):
    """bf16 autocast on a GPU; float32 on the CPU."""
    import contextlib
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


def peak_memory_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def samples(n: int = 12) -> list[SimpleNamespace]:
    """Deterministic samples: prompt (with an image for 2 in 3), then a supervised answer."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        prompt = torch.randint(0, 150000, (24 + (7 * i) % 40,), generator=gen).tolist()
        answer = torch.randint(0, 150000, (16 + 8 * (i % 3),), generator=gen).tolist()
        grid = GRIDS[i % 4] if i % 3 != 2 else None
        vision = [VSTART] + [IMAGE] * (grid[0] * grid[1] * grid[2] // 4) + [VEND] if grid else []
        ids = torch.tensor(prompt[:8] + vision + prompt[8:] + answer)
        labels = torch.full_like(ids, -100)
        labels[-len(answer):] = ids[-len(answer):]
        pixels = torch.randn(grid[0] * grid[1] * grid[2], 1176, generator=gen) if grid else None
        out.append(SimpleNamespace(input_ids=ids, labels=labels, pixel_values=pixels,
                                   image_grid_thw=torch.tensor([grid]) if grid else None,
                                   pixel_values_videos=None, video_grid_thw=None))
    return out


def timed_steps(step, steps: int, device: str) -> float:
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (allocations, first-call paths)
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_ours(directory: Path, mode: str, packed: bool, args) -> dict:
    from qwen2vl import Qwen2VL
    from qwen2vl.train.lora import add_lora, lora_config
    from qwen2vl.train.loss import LossModel
    from qwen2vl.train.options import LoraOptions
    from qwen2vl.train.packing import collate, pack_in_order
    from qwen2vl.train.stages import apply_freezing

    model = Qwen2VL.from_pretrained(directory, dtype=torch.float32, device=args.device).train()
    model.visual.gradient_checkpointing = model.model.gradient_checkpointing = args.gradient_checkpointing
    if mode == "lora":
        add_lora(model, lora_config(model, LoraOptions(r=16, alpha=32, target_modules=LORA_TARGETS)), seed=0)
        apply_freezing(model, {"llm"}, {"llm"})
    wrapper = LossModel(model)
    params = [p for p in wrapper.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    data = samples()
    lengths = [int(s.input_ids.numel()) for s in data]
    rows = pack_in_order(lengths, list(range(len(data))), args.seq_len) if packed else [[i] for i in range(len(data))]
    batch = collate([[data[i] for i in row] for row in rows], model.config).to(args.device)
    supervised = batch.supervised

    def step():
        with autocast(args.device):
            loss = wrapper(batch) / supervised
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed_steps(step, args.steps, args.device)
    return {"tokens": sum(lengths), "rows": len(rows), "width": batch.input_ids.shape[1], "step_s": seconds,
            "trainable": sum(p.numel() for p in params), "peak_gb": peak_memory_gb(args.device)}


def run_transformers(directory: Path, mode: str, args) -> dict:
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(directory, dtype=torch.float32, attn_implementation="sdpa",
                                                            device_map=args.device).train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if mode == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    data = samples()
    width = max(int(s.input_ids.numel()) for s in data)
    ids = torch.zeros(len(data), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r, s in enumerate(data):  # right padding, as transformers training does
        n = s.input_ids.numel()
        ids[r, :n], mask[r, :n], labels[r, :n] = s.input_ids, 1, s.labels
    pixels = torch.cat([s.pixel_values for s in data if s.pixel_values is not None])
    grids = torch.cat([s.image_grid_thw for s in data if s.image_grid_thw is not None])
    tokens = int(mask.sum())
    ids, mask, labels, pixels, grids = (t.to(args.device) for t in (ids, mask, labels, pixels, grids))

    def step():
        with autocast(args.device):
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grids, labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed_steps(step, args.steps, args.device)
    return {"tokens": tokens, "rows": len(data), "width": width, "step_s": seconds,
            "trainable": sum(p.numel() for p in params), "peak_gb": peak_memory_gb(args.device)}


NANO_OLD_MIX = "reading=0.35,counting=0.2,grounding=0.2,chart=0.1,video=0.15"
NANO_MIX = {"reading": 0.3, "counting": 0.2, "grounding": 0.2, "chart": 0.1, "video": 0.1, "gui": 0.1}
NANO_ARMS = {  # name: (data, seq_len, rows per step, stream settings)
    "fixed-1024x4": ("fixed", 1024, 4, {}),  # the first recipe: a written set (compact sizes), packed
    "stream-1024x4": ("stream", 1024, 4, {}),  # generated on the fly, per-task sizes
    "stream-512x8": ("stream", 512, 8, {}),
    "fill-512x8": ("stream", 512, 8, {"packing": "fill"}),  # rows filled past a sample that does not fit
    "fill-q3-512x8": ("stream", 512, 8, {"packing": "fill", "questions": 3}),  # + up to 3 questions per image
}
# the same arm with torch.compile on the decoder layers and the vision MLPs (dynamic shapes: the vision
# tower's packed lengths change every step); its first measured step still compiles for new shapes
NANO_ARMS["fill-q3-512x8-compiled"] = NANO_ARMS["fill-q3-512x8"]
# and with bf16 autocast (`precision: bf16`; on this CPU bf16 matrix products run on AMX tiles)
NANO_ARMS["fill-q3-512x8-bf16"] = NANO_ARMS["fill-q3-512x8"]
# and without the trainer's flush of denormal floats (they appear once the model is trained: --state)
NANO_ARMS["fill-q3-512x8-denormals"] = NANO_ARMS["fill-q3-512x8"]


def compile_nano(trainer) -> None:
    net = trainer.loss_model.net
    for layer in net.model.layers:
        layer.forward = torch.compile(layer.forward, dynamic=True)
    for block in net.visual.blocks:
        block.mlp.forward = torch.compile(block.mlp.forward, dynamic=True)


def nano_data(directory: Path, kind: str, settings: dict) -> Path:
    """The arm's training data: a written compact set (``fixed``) or a stream spec with per-task sizes."""
    if kind == "fixed":
        target = directory / "fixed"
        if not (target / "data.jsonl").is_file():
            subprocess.run([sys.executable, "-m", "qwen2vl.data.make_dataset", "--out", str(target), "--n", "600",
                            "--seed", "0", "--size-policy", "compact", "--video-pixels", "3136,50176",
                            "--tasks", NANO_OLD_MIX, "--quiet"], check=True)
        return target / "data.jsonl"
    spec = directory / ("stream-" + "-".join(f"{k}-{v}" for k, v in sorted(settings.items())) + ".yaml")
    spec.write_text(json.dumps({"synthetic": {"split": "train", "seed": 0, "tasks": NANO_MIX, "size_policy": "per-task",
                                              "video_pixels": [3136, 50176], **settings}}))
    return spec


def run_nano(arm: str, directory: Path, steps: int, state: Path | None) -> dict | None:
    """The arm's figures (None in every process but the first under torchrun)."""
    from qwen2vl.train.distributed import close_distributed, init_distributed
    from qwen2vl.train.metrics import read_metrics
    from qwen2vl.train.options import load_options
    from qwen2vl.train.trainer import Trainer

    kind, seq_len, rows, settings = NANO_ARMS[arm]
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "nano"
    out = directory / f"run-{arm}"
    shutil.rmtree(out, ignore_errors=True)
    tokenizer = state / "tokenizer" if state is not None else recipe.parents[1] / "qwen2vl" / "assets" / "qwen2vl-nano"
    options = {"model_config": str(recipe / "config.json"), "tokenizer": str(tokenizer),
               "data": str(nano_data(directory, kind, settings)), "output_dir": str(out),
               "seq_len": str(seq_len), "batch_size": str(rows), "max_steps": str(steps + 1), "lr": "1e-3",
               "max_pixels": str(512 * 512), "export": "false", "progress": "false", "stage": "2",
               "precision": "bf16" if arm.endswith("-bf16") else "auto"}
    d = init_distributed()
    trainer = Trainer(load_options(None, options), d)
    if state is not None:  # the weights of a packed nano state (recipes/nano/state.py) instead of a fresh model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        weights = torch.load(state / "state.pt", weights_only=False)["checkpoint"]["model"]
        set_model_state_dict(trainer.loss_model, weights, options=StateDictOptions(full_state_dict=True))
    if arm.endswith("-denormals"):
        torch.set_flush_denormal = lambda mode: False
    if arm.endswith("-compiled"):
        compile_nano(trainer)
    trainer.fit()
    close_distributed()
    if not d.main:
        return None
    records = read_metrics(out / "metrics.jsonl")[1:]  # the first step warms up (and compiles)
    seconds = sum(r["step_s"] for r in records)
    return {"samples_per_s": sum(r["samples"] for r in records) / seconds,
            "answers_per_s": sum(r["answers"] for r in records) / seconds,
            "tokens_per_s": sum(r["tokens"] for r in records) / seconds,
            "supervised_per_s": sum(r["supervised_tokens"] for r in records) / seconds,
            "padding": statistics.mean(r["padding"] for r in records), "step_s": seconds / len(records)}


def nano_main(args) -> None:
    directory = Path(args.dir or tempfile.mkdtemp(prefix="qwen2vl-nano-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    arms = args.nano.split(",")
    unknown = [a for a in arms if a not in NANO_ARMS]
    if unknown:
        raise SystemExit(f"unknown --nano arm(s) {unknown}; expected some of {list(NANO_ARMS)}")
    layouts = [tuple(int(v) for v in layout.split("x")) for layout in (args.layouts or f"1x{args.threads}").split(",")]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, {args.steps} steps per run")
    print(f"{'arm':<23} {'procs x threads':>15} {'run':>3} {'step s':>7} {'samples/s':>10} {'answers/s':>10} "
          f"{'tokens/s':>9} {'answer tok/s':>13} {'padding':>8}")
    for repeat in range(args.repeats):
        for arm, (procs, threads) in ((a, l) for a in arms for l in layouts):  # alternated: load changes reach all
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                            "--standalone", "--nproc_per_node", str(procs)]
            cmd = launcher + [__file__, "--nano-arm", arm, "--steps", str(args.steps), "--dir", str(directory)]
            cmd += ["--state", args.state] if args.state else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{arm:<23} {f'{procs} x {threads}':>15} {repeat + 1:>3} {r['step_s']:>7.2f} {r['samples_per_s']:>10.2f} "
                  f"{r['answers_per_s']:>10.2f} "
                  f"{r['tokens_per_s']:>9.0f} "
                  f"{r['supervised_per_s']:>13.1f} {r['padding']:>8.1%}", flush=True)


def child(args) -> None:
    torch.manual_seed(0)
    directory = Path(args.dir)
    if args.engine == "transformers":
        result = run_transformers(directory, args.mode, args)
    else:
        result = run_ours(directory, args.mode, args.engine == "ours-packed", args)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["lora", "full", "both"], default="both")
    parser.add_argument("--steps", type=int, default=6, help="measured steps (median reported) after one warm-up")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per packed row (ours)")
    parser.add_argument("--shape", choices=["small", "2b"], default="small")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--dir", default=None, help="where the random checkpoint is written (default: a temp dir)")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--nano", help=f"comma list of nano recipe data arms: {', '.join(NANO_ARMS)}")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per nano run (default 2)")
    parser.add_argument("--layouts", help="nano runs as processes x threads, e.g. 1x2,2x1 (default 1x--threads)")
    parser.add_argument("--repeats", type=int, default=2, help="alternated runs of each nano arm (default 2)")
    parser.add_argument("--nano-arm", help=argparse.SUPPRESS)
    parser.add_argument("--state", help="nano arms start from this packed state's weights (recipes/nano/state)")
    args = parser.parse_args()
    if args.nano_arm:
        result = run_nano(args.nano_arm, Path(args.dir), args.steps, args.state and Path(args.state))
        if result is not None:
            print(json.dumps(result))
        return None
    if args.nano:
        return nano_main(args)
    if args.engine:
        return child(args)
    directory = Path(args.dir or tempfile.mkdtemp(prefix="qwen2vl-train-bench-"))
    if not (directory / "config.json").is_file():
        build(directory, args.shape)
    modes = ["lora", "full"] if args.mode == "both" else [args.mode]
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"torch {torch.__version__}, {where}, shape {args.shape}, gradient checkpointing {args.gradient_checkpointing}")
    print(f"{'mode':<5} {'engine':<22} {'rows x width':>13} {'tokens':>7} {'step s':>8} {'tokens/s':>9} {'peak GB':>8}")
    for mode in modes:
        results = {}
        for engine in ("transformers", "ours-padded", "ours-packed"):
            cmd = [sys.executable, __file__, "--engine", engine, "--mode", mode, "--steps", str(args.steps),
                   "--seq-len", str(args.seq_len), "--dir", str(directory), "--device", args.device]
            cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            r = results[engine] = json.loads(out)
            rate = r["tokens"] / r["step_s"]
            label = {"transformers": "transformers + peft" if mode == "lora" else "transformers"}.get(engine, engine)
            print(f"{mode:<5} {label:<22} {r['rows']:>5} x {r['width']:<5} {r['tokens']:>7} {r['step_s']:>8.3f} "
                  f"{rate:>9.0f} {r['peak_gb']:>8.2f}")
        base = results["transformers"]["tokens"] / results["transformers"]["step_s"]
        for engine in ("ours-padded", "ours-packed"):
            rate = results[engine]["tokens"] / results[engine]["step_s"]
            print(f"{mode:<5} {engine} / transformers: {rate / base:.2f}x")


if __name__ == "__main__":
    main()
