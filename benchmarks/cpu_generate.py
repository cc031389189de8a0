"""Ours against transformers on this CPU: time to first token, decode tokens/s and peak memory.

    python benchmarks/cpu_generate.py                    # mid-size shape, float32 (issue target)
    python benchmarks/cpu_generate.py --shape 2b --dtype bfloat16 --new-tokens 16

Both engines load the same random checkpoint (written once to --dir) and get the same inputs: one
448x448 image (32x32 patches, 256 merged tokens) and about 30 text tokens. Each engine runs in its
own subprocess, one after the other, so peak resident memory (VmHWM) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "mid": dict(vocab_size=151936, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=True, mrope_section=[8, 12, 12],
                vision=dict(depth=8, embed_dim=512, num_heads=8)),
    "2b": None,  # the released 2B shape (preset)
}
IMAGE, VSTART, VEND = 151655, 151652, 151653


def build(shape: str, dtype: str, directory: Path) -> None:
    from qwen2vl import Qwen2VL
    from qwen2vl.config import Qwen2VLConfig, TextConfig, VisionConfig, preset
    if shape == "2b":
        config = preset("qwen2-vl-2b")
    else:
        spec = dict(SHAPES[shape])
        vision = VisionConfig(**spec.pop("vision"), hidden_size=spec["hidden_size"])
        config = Qwen2VLConfig(text=TextConfig(rms_norm_eps=1e-6, **spec), vision=vision)
    Qwen2VL.from_config(config, dtype=dtype, seed=0).save_pretrained(directory)


def inputs(text_tokens: int = 30):
    gen = torch.Generator().manual_seed(0)
    head = torch.randint(0, 150000, (text_tokens // 2,), generator=gen).tolist()
    tail = torch.randint(0, 150000, (text_tokens - text_tokens // 2,), generator=gen).tolist()
    ids = torch.tensor([head + [VSTART] + [IMAGE] * 256 + [VEND] + tail])
    pixel_values = torch.randn(1024, 1176, generator=gen)
    return ids, pixel_values, torch.tensor([[1, 32, 32]])


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def run_ours(directory: str, new_tokens: int, repeats: int) -> dict:
    from qwen2vl import Qwen2VL
    from qwen2vl.generation.engine import Engine
    from qwen2vl.generation.sampling import SamplingParams
    engine = Engine(Qwen2VL.from_pretrained(directory), vision_cache_items=0)
    ids, pv, grid = inputs()
    batch = {"input_ids": ids, "pixel_values": pv, "image_grid_thw": grid}
    params = [SamplingParams(max_new_tokens=new_tokens)]
    engine.generate_batch(batch, [SamplingParams(max_new_tokens=2)])  # warm-up
    best = None
    for _ in range(repeats):
        result = engine.generate_batch(batch, params)[0]
        t = result.timings
        row = {"ttft_s": t["prefill_s"], "decode_tok_s": (new_tokens - 1) / t["decode_s"], "tokens": result.token_ids}
        best = row if best is None or row["decode_tok_s"] > best["decode_tok_s"] else best
    best["peak_rss_gb"] = peak_rss_gb()
    return best


def run_transformers(directory: str, new_tokens: int, repeats: int) -> dict:
    from transformers import Qwen2VLForConditionalGeneration
    config_dtype = json.loads(Path(directory, "config.json").read_text())["torch_dtype"]
    model = Qwen2VLForConditionalGeneration.from_pretrained(directory, torch_dtype=getattr(torch, config_dtype),
                                                            attn_implementation="sdpa").eval()
    ids, pv, grid = inputs()
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, image_grid_thw=grid,
                  do_sample=False, eos_token_id=None, pad_token_id=0)
    from transformers import LogitsProcessor

    stamps: list[float] = []

    class Stamp(LogitsProcessor):  # called once after each forward pass
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    stamp = Stamp()

    with torch.inference_mode():
        model.generate(**kwargs, max_new_tokens=2, min_new_tokens=2)  # warm-up
        best = None
        for _ in range(repeats):
            stamps.clear()
            start = time.perf_counter()
            out = model.generate(**kwargs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 logits_processor=[stamp])
            # prefill ends at the first stamp; the decode steps lie between the first and the last
            row = {"ttft_s": stamps[0] - start, "decode_tok_s": (new_tokens - 1) / (stamps[-1] - stamps[0]),
                   "tokens": out[0, ids.shape[1]:].tolist()}
            best = row if best is None or row["decode_tok_s"] > best["decode_tok_s"] else best
    best["peak_rss_gb"] = peak_rss_gb()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="mid")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--dir", help="where to keep the random checkpoint (reused when present)")
    parser.add_argument("--child", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    directory = Path(args.dir or Path(tempfile.gettempdir()) / f"qwen2vl-bench-{args.shape}-{args.dtype}")
    if args.child:
        fn = run_ours if args.child == "ours" else run_transformers
        print(json.dumps(fn(str(directory), args.new_tokens, args.repeats)))
        return
    if not (directory / "config.json").exists():
        build(args.shape, args.dtype, directory)
    results = {}
    for name in ("transformers", "ours"):
        cmd = [sys.executable, __file__, "--child", name, "--dir", str(directory), "--shape", args.shape,
               "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    same = results["ours"]["tokens"] == results["transformers"]["tokens"]
    print(f"shape {args.shape}, {args.dtype}, 448x448 image + 30 text tokens, {args.new_tokens} new tokens, "
          f"{args.threads} threads; greedy tokens identical: {same}")
    print("| figure | transformers | ours | ratio |\n|---|---|---|---|")
    t, o = results["transformers"], results["ours"]
    print(f"| decode tokens/s | {t['decode_tok_s']:.2f} | {o['decode_tok_s']:.2f} | "
          f"{o['decode_tok_s'] / t['decode_tok_s']:.2f}x |")
    print(f"| time to first token (s) | {t['ttft_s']:.3f} | {o['ttft_s']:.3f} | {t['ttft_s'] / o['ttft_s']:.2f}x |")
    print(f"| peak memory (GB) | {t['peak_rss_gb']:.2f} | {o['peak_rss_gb']:.2f} | "
          f"{t['peak_rss_gb'] / o['peak_rss_gb']:.2f}x |")


if __name__ == "__main__":
    main()
