"""The GPU fast path against transformers, on one card, in one run.

    python benchmarks/gpu.py --out results.json        # on a CUDA machine (2B shape, random bf16 weights)
    python benchmarks/gpu.py --shape tiny --device cpu # a dry run of every code path on CPU

Both models hold the same random weights (transformers builds them; ours copies them). Measured:
the vision tower on a 448x448 and a 1344x896 image and an 8-frame 504x896 video; time to first
token for one 1344x896 image plus 64 text tokens; decode tokens/s at batch 1, 8 and 32; peak memory.
Also: the card's copy bandwidth and bf16 matmul rate (the physical bounds), and checks that the
compiled/graphed path agrees with the eager one. Sections past ``--budget-s`` are skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback

import torch

IMAGE, VIDEO, VSTART, VEND = 151655, 151656, 151652, 151653
T0 = time.perf_counter()
RESULTS: dict = {"ours": {}, "transformers": {}, "bounds": {}, "checks": {}, "errors": []}


def log(*args):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *args, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup=2, repeats=5) -> float:
    """Median wall time of ``fn`` in seconds (synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def section(name, budget):
    """Decorator-free guard: run a section unless the time budget is spent; record its errors."""
    class Guard:
        def __enter__(self):
            self.skip = time.perf_counter() - T0 > budget
            if self.skip:
                log(f"skip {name}: over the time budget")
                RESULTS["errors"].append(f"{name}: skipped (time budget)")
            else:
                log(f"start {name}")
            return self

        def __exit__(self, kind, error, tb):
            if error is not None:
                log(f"FAILED {name}: {kind.__name__}: {error}")
                traceback.print_exception(kind, error, tb)
                RESULTS["errors"].append(f"{name}: {kind.__name__}: {error}")
            return True
    return Guard()


# ------------------------------------------------------------------------------------- inputs
def vision_inputs(device, shape):
    """(name, pixel_values, grid) for the three vision workloads (scaled down for --shape tiny)."""
    specs = [("image 448x448", (1, 32, 32)), ("image 1344x896", (1, 64, 96)), ("video 8x504x896", (4, 36, 64))]
    if shape == "tiny":
        specs = [(n, (t, 4, 6)) for n, (t, _, _) in specs]
    out = []
    for name, grid in specs:
        g = torch.Generator().manual_seed(0)
        n = grid[0] * grid[1] * grid[2]
        out.append((name, torch.randn(n, 1176, generator=g).to(device), torch.tensor([grid], device=device)))
    return out


def ttft_inputs(device, shape):
    grid = (1, 64, 96) if shape != "tiny" else (1, 4, 6)
    g = torch.Generator().manual_seed(1)
    pads = grid[1] * grid[2] // 4
    text = torch.randint(0, 150000, (64,), generator=g).tolist()
    ids = torch.tensor([text[:32] + [VSTART] + [IMAGE] * pads + [VEND] + text[32:]], device=device)
    pv = torch.randn(grid[0] * grid[1] * grid[2], 1176, generator=g).to(device)
    return ids, pv, torch.tensor([grid], device=device)


def text_batch(rows, device, length=64):
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 150000, (rows, length), generator=g).to(device)


def mm_types(ids):
    return (ids == IMAGE).long() + 2 * (ids == VIDEO).long()


# ------------------------------------------------------------------------------------- models
def build_transformers(config, device):
    import transformers
    from transformers import Qwen2VLConfig as HFConfig
    from transformers import Qwen2VLForConditionalGeneration

    hf_config = HFConfig.from_dict(config.to_dict())
    with torch.device(device):
        try:
            model = Qwen2VLForConditionalGeneration._from_config(hf_config, dtype=torch.bfloat16,
                                                                 attn_implementation="sdpa")
        except TypeError:
            model = Qwen2VLForConditionalGeneration._from_config(hf_config, torch_dtype=torch.bfloat16,
                                                                 attn_implementation="sdpa")
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    log(f"transformers {transformers.__version__} model built")
    return model.eval()


def hf_generate(model, ids, new_tokens, **media):
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **media)
    if media and int(__import__("transformers").__version__.split(".")[0]) >= 5:
        kwargs["mm_token_type_ids"] = mm_types(ids)
    return model.generate(**kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["2b", "tiny"], default="2b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--budget-s", type=float, default=420)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    budget = args.budget_s

    from qwen2vl import Qwen2VL
    from qwen2vl.checkpoint import load_state_dict
    from qwen2vl.config import Qwen2VLConfig, preset
    from qwen2vl.generation.engine import Engine
    from qwen2vl.generation.sampling import SamplingParams
    from qwen2vl.generation.step import DecodeStep

    if args.shape == "2b":
        config = preset("qwen2-vl-2b")
    else:
        import sys
        sys.path.insert(0, "tests")
        from oracle import tiny_config
        flat = tiny_config(tied=True, vocab_size=151936, image_token_id=IMAGE, video_token_id=VIDEO,
                           vision_start_token_id=VSTART, vision_end_token_id=VEND)
        config = Qwen2VLConfig.from_dict(flat)
    config.torch_dtype = "bfloat16"
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    RESULTS["env"] = env
    log("environment", env)

    # ----------------------------------------------------------------------- physical bounds
    with section("bounds", budget):
        if device.type == "cuda":
            buf = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device=device)
            dst = torch.empty_like(buf)
            t = timed(lambda: dst.copy_(buf), device, 2, 10)
            RESULTS["bounds"]["copy_tb_s"] = 2 * buf.numel() * 2 / t / 1e12  # read + write
            del buf, dst
            a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
            t = timed(lambda: a @ a, device, 3, 10)
            RESULTS["bounds"]["bf16_matmul_tflop_s"] = 2 * 8192**3 / t / 1e12
            del a
        log("bounds", RESULTS["bounds"])

    hf = None
    state = None
    if not args.skip_transformers:
        with section("transformers build", budget):
            hf = build_transformers(config, device)
            state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    if state is None:
        ours_model = Qwen2VL.from_config(config, dtype=torch.bfloat16, device=device, seed=0)
    else:
        ours_model = load_state_dict(Qwen2VL, config, state, dtype=torch.bfloat16, device=device)
        del state
    text_params = sum(p.numel() for n, p in ours_model.named_parameters() if not n.startswith("visual."))
    embed_rows = config.text.vocab_size * config.text.hidden_size
    # bytes read per decode step: every decoder weight once (the embedding table is the lm_head when tied)
    decode_bytes = 2 * (text_params - (0 if config.text.tie_word_embeddings else embed_rows))
    RESULTS["bounds"]["decode_weight_bytes"] = decode_bytes

    # ----------------------------------------------------------------------- transformers
    if hf is not None:
        torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
        with torch.inference_mode():
            for name, pv, grid in vision_inputs(device, args.shape):
                with section(f"transformers vision {name}", budget):
                    RESULTS["transformers"][f"vision {name} ms"] = 1e3 * timed(
                        lambda pv=pv, grid=grid: hf.model.visual(pv, grid_thw=grid), device)
            with section("transformers ttft", budget):
                ids, pv, grid = ttft_inputs(device, args.shape)
                RESULTS["transformers"]["ttft ms"] = 1e3 * timed(
                    lambda: hf_generate(hf, ids, 1, pixel_values=pv, image_grid_thw=grid), device, 1, 3)
            for rows in batches:
                with section(f"transformers decode b{rows}", budget):
                    ids = text_batch(rows, device)
                    t1 = timed(lambda ids=ids: hf_generate(hf, ids, 2), device, 1, 1)
                    tn = timed(lambda ids=ids: hf_generate(hf, ids, args.new_tokens), device, 0, 1)
                    RESULTS["transformers"][f"decode b{rows} tok/s"] = rows * (args.new_tokens - 2) / (tn - t1)
                    log(f"transformers decode b{rows}", RESULTS["transformers"][f"decode b{rows} tok/s"])
            with section("transformers greedy reference", budget):
                ids = text_batch(1, device, 24)
                RESULTS["checks"]["transformers_greedy"] = hf_generate(hf, ids, 16)[0, 24:].tolist()
        if device.type == "cuda":
            RESULTS["transformers"]["peak memory GB"] = torch.cuda.max_memory_allocated() / 1e9
        del hf
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    log("transformers", RESULTS["transformers"])

    # ----------------------------------------------------------------------- ours
    model = ours_model
    with torch.inference_mode():
        for name, pv, grid in vision_inputs(device, args.shape):
            with section(f"ours vision {name}", budget):
                RESULTS["ours"][f"vision {name} ms"] = 1e3 * timed(lambda pv=pv, grid=grid: model.visual(pv, grid), device)
        eager = Engine(model, static=False, vision_cache_items=0)
        with section("ours greedy eager", budget):
            ids = text_batch(1, device, 24)
            ref = eager.generate_batch({"input_ids": ids}, [SamplingParams(max_new_tokens=16)])[0].token_ids
            RESULTS["checks"]["ours_eager_greedy"] = ref
            if "transformers_greedy" in RESULTS["checks"]:
                other = RESULTS["checks"]["transformers_greedy"]
                RESULTS["checks"]["greedy_prefix_equal_to_transformers"] = next(
                    (i for i, (a, b) in enumerate(zip(ref, other)) if a != b), len(ref))
        model.fuse_projections()
        with section("ours vision compiled", budget):
            model.visual.compile_blocks(dynamic=True)
            for name, pv, grid in vision_inputs(device, args.shape):
                RESULTS["ours"][f"vision {name} ms (compiled)"] = 1e3 * timed(lambda pv=pv, grid=grid: model.visual(pv, grid), device, 3, 5)
        with section("ours ttft with compiled vision", budget + 30):
            ttft_engine = Engine(model, static=True, vision_cache_items=0)
            ids, pv, grid = ttft_inputs(device, args.shape)
            batch = {"input_ids": ids, "pixel_values": pv, "image_grid_thw": grid}
            first = SamplingParams(max_new_tokens=1)
            RESULTS["ours"]["ttft ms (compiled vision)"] = 1e3 * timed(
                lambda: ttft_engine.generate_batch(batch, [first]), device, 2, 5)
        for label, compile_ in (("graph", False), ("graph+compile", True)):
            engine = Engine(model, static=True, compile=compile_, vision_cache_items=0)
            with section(f"ours {label} check", budget):
                ids = text_batch(1, device, 24)
                got = engine.generate_batch({"input_ids": ids}, [SamplingParams(max_new_tokens=16)])[0].token_ids
                RESULTS["checks"][f"{label}_greedy_equal_to_eager"] = got == RESULTS["checks"].get("ours_eager_greedy")
                # first-step logits against the eager model
                step = DecodeStep(model, rows=1, capacity=257, fixed=True, compile=compile_)
                prompt = engine.prompts([{"input_ids": ids}])[0]
                nxt = step.prefill(0, prompt.embeds, prompt.positions, 0).argmax().view(1)
                step.start_row(0, nxt, slot=len(prompt), position=len(prompt) + prompt.delta)
                got_logits = step.decode(1, len(prompt) + 1).float()
                full = model(torch.cat([ids, nxt.view(1, 1)], 1))[:, -1].float()
                RESULTS["checks"][f"{label}_step_logits_rel_diff"] = float((got_logits - full).abs().max() / full.abs().max())
            with section(f"ours {label} ttft", budget):
                ids, pv, grid = ttft_inputs(device, args.shape)
                batch = {"input_ids": ids, "pixel_values": pv, "image_grid_thw": grid}
                first = SamplingParams(max_new_tokens=1)
                RESULTS["ours"][f"ttft ms ({label})"] = 1e3 * timed(
                    lambda batch=batch, engine=engine, first=first: engine.generate_batch(batch, [first]),
                    device, 2, 5)
            for rows in batches:
                with section(f"ours {label} decode b{rows}", budget):
                    ids = text_batch(rows, device)
                    params = [SamplingParams(max_new_tokens=args.new_tokens)] * rows
                    engine.generate_batch({"input_ids": ids}, params)  # capture / compile
                    best = 0.0
                    for _ in range(3):
                        results = engine.generate_batch({"input_ids": ids}, params)
                        best = max(best, sum(r.timings["decode_tokens_per_s"] for r in results))
                    RESULTS["ours"][f"decode b{rows} tok/s ({label})"] = best
                    log(f"ours {label} decode b{rows}", best)
        if device.type == "cuda":
            RESULTS["ours"]["peak memory GB"] = torch.cuda.max_memory_allocated() / 1e9
    report(args)


def report(args) -> None:
    ours, theirs, bounds = RESULTS["ours"], RESULTS["transformers"], RESULTS["bounds"]
    lines = ["| figure | transformers | ours | ratio |", "|---|---|---|---|"]

    def best_of(prefix):
        values = {k: v for k, v in ours.items() if k.startswith(prefix)}
        if not values:
            return None, None
        key = max(values, key=values.get) if "tok/s" in prefix else min(values, key=values.get)
        return values[key], key[len(prefix):].strip()

    base_keys = dict.fromkeys([k for k in theirs] + [k.split(" (")[0] for k in ours])
    base_keys.pop("peak memory GB", None)
    for key in [*base_keys, "peak memory GB"]:
        if key not in theirs and not any(k.startswith(key) for k in ours):
            continue
        value, variant = best_of(key) if key != "peak memory GB" else (ours.get(key), "")
        mine = f"{value:.1f}" if value is not None else "-"
        ratio = ""
        if value and key in theirs:
            r = value / theirs[key] if "tok/s" in key else theirs[key] / value
            ratio = f"{r:.2f}x"
        other = f"{theirs[key]:.1f}" if key in theirs else "-"
        lines.append(f"| {key} | {other} | {mine} {variant} | {ratio} |")
    if "copy_tb_s" in bounds:
        bound = bounds["copy_tb_s"] * 1e12 / bounds["decode_weight_bytes"]  # copy_tb_s counts read + write
        lines.append(f"| decode b1 bandwidth bound (tok/s) | | {bound:.0f} | |")
        RESULTS["bounds"]["decode_b1_tok_s_bound"] = bound
    print("\n".join(lines))
    print(json.dumps(RESULTS, indent=1, default=str))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)


if __name__ == "__main__":
    main()
