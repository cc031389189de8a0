"""Quantized decode on this CPU: llama.cpp (F16/Q8_0/Q4_0), transformers bf16, ours bf16/int8/int4
(int8/int4 also with the decode step compiled: "ours int4 compiled").

    python benchmarks/quant_cpu.py --llama-bench PATH/TO/llama-bench [--threads 1 2] [--rounds 2]

One random Qwen2-VL-2B checkpoint (bf16, seed 0) is written once to --dir, with our int8
(per-row) and int4 (group 64) checkpoints made from it and three GGUF files of its decoder
(llama.cpp's text-only ``qwen2`` architecture, the same tensors; token_embd doubles as the
output matrix, as in the tied 2B; every matrix in the named type, norms and biases in F32). The
vision tower plays no part in text decode, so a text-only GGUF times the same work.

Each measurement runs in its own process; the runs alternate (every engine at every thread count,
then again for the next round) and the best round is kept. Prompt: --prompt random ids; decode:
--new-tokens greedy tokens. llama.cpp is timed by ``llama-bench -p P -n N``. Beside each figure:
the bytes one decode token reads (the decoder's and output matrix's weights as stored) and the
bound they give at the read bandwidth measured in the same run (a 1 GiB float32 sum).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GB = 1e9
OURS = {"ours bf16": "bf16", "ours int8": "int8", "ours int4": "int4"}
COMPILED = {"ours int8 compiled": "int8", "ours int4 compiled": "int4"}  # Engine(compile=True): the step fused
GGUF_TYPES = ("F16", "Q8_0", "Q4_0")


def rss_gb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / GB
    return float("nan")


# ---------------------------------------------------------------- preparing the weights
def prepare(directory: Path, group_size: int) -> None:
    from qwen2vl import Qwen2VL
    from qwen2vl.config import preset
    bf16 = directory / "bf16"
    if not (bf16 / "config.json").exists():
        Qwen2VL.from_config(preset("qwen2-vl-2b"), dtype=torch.bfloat16, seed=0).save_pretrained(bf16)
        print("wrote the random 2B checkpoint", flush=True)
    for scheme in ("int8", "int4"):
        target = directory / scheme
        if not (target / "config.json").exists():
            model = Qwen2VL.from_pretrained(bf16)
            model.quantize(scheme, group_size=group_size if scheme == "int4" else None).save_pretrained(target)
            del model
            print(f"wrote the {scheme} checkpoint", flush=True)
    for qtype in GGUF_TYPES:
        path = directory / f"2b-{qtype}.gguf"
        if not path.exists():
            write_gguf(bf16, path, qtype)
            print(f"wrote {path.name}", flush=True)


def write_gguf(checkpoint: Path, path: Path, qtype: str) -> None:
    """The decoder of ``checkpoint`` as a llama.cpp ``qwen2`` GGUF with matrices in ``qtype``."""
    import gguf
    from safetensors import safe_open

    from qwen2vl.config import Qwen2VLConfig
    t = Qwen2VLConfig.from_pretrained(checkpoint).text
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_context_length(t.max_position_embeddings)
    writer.add_embedding_length(t.hidden_size)
    writer.add_block_count(t.num_hidden_layers)
    writer.add_feed_forward_length(t.intermediate_size)
    writer.add_head_count(t.num_attention_heads)
    writer.add_head_count_kv(t.num_key_value_heads)
    writer.add_rope_freq_base(t.rope_theta)
    writer.add_layer_norm_rms_eps(t.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list([f"<{i}>" for i in range(t.vocab_size)])
    writer.add_token_types([gguf.TokenType.NORMAL] * t.vocab_size)
    writer.add_token_merges(["<0> <1>"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    target = getattr(gguf.GGMLQuantizationType, qtype)
    with safe_open(checkpoint / "model.safetensors", framework="pt") as f:
        for key in f.keys():
            if key.startswith("visual."):
                continue
            if key == "model.embed_tokens.weight":
                name = "token_embd.weight"
            elif key == "model.norm.weight":
                name = "output_norm.weight"
            elif key == "lm_head.weight":
                name = "output.weight"
            else:
                _, _, layer, rest = key.split(".", 3)
                module, _, leaf = rest.rpartition(".")
                name = f"blk.{layer}.{names[module]}.{leaf}"
            data = f.get_tensor(key).float().numpy()
            if data.ndim == 2 and target != gguf.GGMLQuantizationType.F16:
                writer.add_tensor(name, gguf.quants.quantize(data, target), raw_dtype=target)
            elif data.ndim == 2:
                writer.add_tensor(name, data.astype("float16"))
            else:
                writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------- the measured runs (children)
def prompt_ids(n: int) -> torch.Tensor:
    return torch.randint(0, 150000, (1, n), generator=torch.Generator().manual_seed(0))


def decode_bytes(model) -> int:
    """Bytes a decode step reads: every tensor of the decoder layers, the final norm and lm_head.

    A quantized lm_head reads its packed buffers only (with int8 the tied float embedding table also
    hangs on it as ``weight``, which its forward never touches)."""
    from qwen2vl.quant.linear import QuantLinear
    seen, total = set(), 0
    for module in (model.model.layers, model.model.norm, model.lm_head):
        tensors = list(module.buffers()) if isinstance(module, QuantLinear) else []
        tensors += [] if isinstance(module, QuantLinear) else list(module.parameters()) + list(module.buffers())
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        # int8 weights packed for oneDNN are not buffers (one byte per weight)
        total += sum(m.packed.numel() for m in module.modules() if getattr(m, "packed", None) is not None)
    return total


def run_ours(checkpoint: str, threads: int, prompt: int, new_tokens: int, compile: bool = False) -> dict:
    from qwen2vl import Qwen2VL
    from qwen2vl.generation.engine import Engine
    from qwen2vl.generation.sampling import SamplingParams
    torch.set_num_threads(threads)
    model = Qwen2VL.from_pretrained(checkpoint, dtype=torch.bfloat16)
    engine = Engine(model, vision_cache_items=0, compile=compile)
    batch = {"input_ids": prompt_ids(prompt)}
    engine.generate_batch(batch, [SamplingParams(max_new_tokens=2)])  # warm-up (and compilation)
    t = engine.generate_batch(batch, [SamplingParams(max_new_tokens=new_tokens)])[0].timings
    return {"prompt_tok_s": prompt / t["prefill_s"], "decode_tok_s": (new_tokens - 1) / t["decode_s"],
            "decode_gb": decode_bytes(model) / GB, "rss_gb": rss_gb(), "peak_rss_gb": rss_gb("VmHWM")}


def run_transformers(checkpoint: str, threads: int, prompt: int, new_tokens: int) -> dict:
    from transformers import LogitsProcessor, Qwen2VLForConditionalGeneration
    torch.set_num_threads(threads)
    model = Qwen2VLForConditionalGeneration.from_pretrained(checkpoint, torch_dtype=torch.bfloat16,
                                                            attn_implementation="sdpa").eval()
    stamps: list[float] = []

    class Stamp(LogitsProcessor):  # called once after each forward pass
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    ids = prompt_ids(prompt)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None,
                  pad_token_id=0, logits_processor=[Stamp()])
    with torch.inference_mode():
        model.generate(**kwargs, max_new_tokens=2, min_new_tokens=2)
        stamps.clear()
        start = time.perf_counter()
        model.generate(**kwargs, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                  if "visual" not in n and "embed_tokens" not in n)
    return {"prompt_tok_s": prompt / (stamps[0] - start), "decode_tok_s": (new_tokens - 1) / (stamps[-1] - stamps[0]),
            "decode_gb": (weights + model.lm_head.weight.numel() * 2 * model.config.tie_word_embeddings) / GB,
            "rss_gb": rss_gb(), "peak_rss_gb": rss_gb("VmHWM")}


def run_llama(llama_bench: str, gguf_path: Path, threads: int, prompt: int, new_tokens: int) -> dict:
    out = subprocess.run([llama_bench, "-m", str(gguf_path), "-t", str(threads), "-p", str(prompt),
                          "-n", str(new_tokens), "-r", "2", "-o", "json"], check=True, capture_output=True, text=True)
    rows = json.loads(out.stdout)
    prompt_row = next(r for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
    gen_row = next(r for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    return {"prompt_tok_s": prompt_row["avg_ts"], "decode_tok_s": gen_row["avg_ts"],
            "decode_gb": gguf_path.stat().st_size / GB}


def read_bandwidth(threads: int) -> float:
    torch.set_num_threads(threads)
    x = torch.ones(2**28)  # 1 GiB of float32
    x.sum()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / GB


def child(args) -> None:
    torch.manual_seed(0)
    if args.child == "transformers":
        row = run_transformers(args.checkpoint, args.threads[0], args.prompt, args.new_tokens)
    else:
        row = run_ours(args.checkpoint, args.threads[0], args.prompt, args.new_tokens, args.child == "compiled")
    print(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "qwen2vl-quant-2b"))
    parser.add_argument("--llama-bench", help="llama-bench built from llama-cpp-python's vendored llama.cpp")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--engines", nargs="+", help="a subset of the engines' names")
    parser.add_argument("--child", choices=["ours", "compiled", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    prepare(directory, args.group_size)
    engines = {name: ("ours", directory / scheme) for name, scheme in OURS.items()}
    engines.update({name: ("compiled", directory / scheme) for name, scheme in COMPILED.items()})
    engines["transformers bf16"] = ("transformers", directory / "bf16")
    if args.llama_bench:
        engines.update({f"llama.cpp {q}": ("llama", directory / f"2b-{q}.gguf") for q in GGUF_TYPES})
    if args.engines:
        engines = {k: v for k, v in engines.items() if k in args.engines}
    best: dict[tuple[str, int], dict] = {}
    bandwidth = {t: read_bandwidth(t) for t in args.threads}
    for _ in range(args.rounds):
        for threads in args.threads:
            for name, (kind, path) in engines.items():
                if kind == "llama":
                    row = run_llama(args.llama_bench, path, threads, args.prompt, args.new_tokens)
                else:
                    out = subprocess.run([sys.executable, __file__, "--child", kind, "--checkpoint", str(path),
                                          "--threads", str(threads), "--prompt", str(args.prompt),
                                          "--new-tokens", str(args.new_tokens)],
                                         check=True, capture_output=True, text=True)
                    row = json.loads(out.stdout.strip().splitlines()[-1])
                print(json.dumps({"engine": name, "threads": threads, **row}), flush=True)
                old = best.get((name, threads))
                if old is None or row["decode_tok_s"] > old["decode_tok_s"]:
                    best[(name, threads)] = row
    bandwidth = {t: max(bandwidth[t], read_bandwidth(t)) for t in args.threads}
    print("\n| engine | threads | prompt tok/s | decode tok/s | GB read per token | bound tok/s | of bound | RSS GB |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, threads), row in best.items():
        bound = bandwidth[threads] / row["decode_gb"]
        rss = f"{row['rss_gb']:.2f}" if "rss_gb" in row else "-"
        print(f"| {name} | {threads} | {row['prompt_tok_s']:.1f} | {row['decode_tok_s']:.2f} | {row['decode_gb']:.2f} | "
              f"{bound:.2f} | {100 * row['decode_tok_s'] / bound:.0f} % | {rss} |")
    print("\nread bandwidth (1 GiB float32 sum): " + ", ".join(f"{t} thread(s) {b:.1f} GB/s" for t, b in bandwidth.items()))


if __name__ == "__main__":
    main()
