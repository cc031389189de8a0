"""The ways to multiply M rows by a quantized 2B matrix on this CPU, weights read from memory.

    python benchmarks/quant_paths.py [--threads 1] [--rows 1 64] [--shapes gate_up] [--rounds 2]

A single matrix timed in a loop sits in the cache (this Xeon has 480 MB of L3), which flatters
every kernel; here each path cycles over enough copies of its weight (--cache-mb in all) that every
call reads it from memory, as a decode step does. Paths, per scheme:

* int8 (one scale per row): ``vnni`` (ours on the CPU: each input row split into two int8 vectors
  times the int8 weights in integers, :mod:`qwen2vl.quant.int8_cpu`); ``onednn`` (the same numbers
  through oneDNN's packed weight, :func:`qwen2vl.quant.linear.int8_matmul`: the fallback); ``int8pack``
  (``torch._weight_int8pack_mm``, bf16 activations, the earlier decode path); ``dequant+gemm``
  (dequantize to bf16 per call, bf16 GEMM: the earlier prompt path);
* int4 (group 64): ``vnni`` (ours on the CPU: int8-rounded input rows times the 4-bit weights in
  integers, :mod:`qwen2vl.quant.int4_cpu`); ``int4pack`` (``torch._weight_int4pack_mm_for_cpu``, float
  activations: the fallback below ``GEMM_ROWS[4]`` rows); ``dequant+gemm`` (the fallback from there on);
* bf16: ``nn.Linear``.

Rounds alternate over the paths; the best round is printed: microseconds per call, GB/s of weight
bytes, and rows per second.
"""

from __future__ import annotations

import argparse
import gc
import math
import time

import torch
import torch.nn.functional as F

from qwen2vl.quant import int4_cpu, int8_cpu
from qwen2vl.quant.linear import Int4Linear, Int8Linear
from qwen2vl.quant.weights import QuantWeight

SHAPES = {"qkv": (2048, 1536), "o": (1536, 1536), "gate_up": (17920, 1536), "down": (1536, 8960),
          "lm_head": (151936, 1536)}


def int8_layer(n: int, k: int, g: torch.Generator, kernel: str = "vnni") -> Int8Linear:
    q = torch.randint(1, 256, (n, k), dtype=torch.uint8, generator=g)
    scales = torch.rand(n, 1, generator=g) * 1e-2 + 1e-3
    qw = QuantWeight(8, k, q, scales, torch.full((n, 1), 128, dtype=torch.int16))
    if kernel == "vnni":
        return Int8Linear(qw, torch.bfloat16)
    available, int8_cpu.available = int8_cpu.available, lambda: False  # oneDNN's packed layout
    try:
        return Int8Linear(qw, torch.bfloat16)
    finally:
        int8_cpu.available = available


def int4_layer(n: int, k: int, g: torch.Generator, kernel: str = "vnni") -> Int4Linear:
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scales = torch.rand(n, k // 64, generator=g) * 1e-2 + 1e-3
    qw = QuantWeight(4, 64, q, scales, torch.full((n, k // 64), 8, dtype=torch.int16))
    if kernel == "vnni":
        return Int4Linear(qw, torch.bfloat16)
    available, int4_cpu.available = int4_cpu.available, lambda: False  # torch's layout
    try:
        return Int4Linear(qw, torch.bfloat16)
    finally:
        int4_cpu.available = available


def paths(n: int, k: int):
    """name -> (make one weight, call it on x (M, K) bf16, weight bytes)."""
    def int8pack(m: Int8Linear, x):
        return torch._weight_int8pack_mm(x, m.int8_weight(), m.scales.view(-1))

    def make_plain_int8(g):  # the int8pack path needs the plain (N, K) int8 values, not the packed form
        m = int8_layer(n, k, g, "onednn")
        m.qweight, m.packed = m.int8_weight(), None
        return m

    return {
        "int8 vnni (ours)": (lambda g: int8_layer(n, k, g), lambda m, x: m(x), n * k),
        "int8 onednn": (lambda g: int8_layer(n, k, g, "onednn"), lambda m, x: m(x), n * k),
        "int8 int8pack": (make_plain_int8, int8pack, n * k),
        "int8 dequant+gemm": (make_plain_int8, lambda m, x: F.linear(x, m._dequantize(x.dtype)), n * k),
        "int4 vnni (ours)": (lambda g: int4_layer(n, k, g), lambda m, x: m(x), n * k // 2),
        "int4 int4pack": (lambda g: int4_layer(n, k, g, "aten"),
                          lambda m, x: torch._weight_int4pack_mm_for_cpu(x, m.qweight, 64, m.scales_and_zeros),
                          n * k // 2),
        "int4 dequant+gemm": (lambda g: int4_layer(n, k, g, "aten"), lambda m, x: F.linear(x, m._dequantize(x.dtype)),
                              n * k // 2),
        "bf16 linear": (lambda g: torch.randn(n, k, generator=g).bfloat16(), lambda w, x: F.linear(x, w), 2 * n * k),
    }


def time_path(make, call, nbytes: int, rows: int, k: int, cache_bytes: int, repeats: int) -> float:
    """Seconds per call, the best of ``repeats`` passes over enough copies to miss the cache."""
    g = torch.Generator().manual_seed(0)
    copies = max(1, math.ceil(cache_bytes / nbytes))
    weights = [make(g) for _ in range(copies)]
    x = torch.randn(rows, k, generator=g).bfloat16()
    best = float("inf")
    with torch.no_grad():
        call(weights[0], x)
        for _ in range(repeats):
            start = time.perf_counter()
            for w in weights:
                call(w, x)
            best = min(best, (time.perf_counter() - start) / copies)
    del weights
    gc.collect()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--shapes", nargs="+", default=["gate_up"], choices=list(SHAPES))
    parser.add_argument("--paths", nargs="+", help="a subset of the paths' names")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache-mb", type=int, default=1024, help="weight bytes each path cycles over")
    args = parser.parse_args()
    best: dict[tuple, float] = {}
    for _ in range(args.rounds):
        for threads in args.threads:
            torch.set_num_threads(threads)
            for shape in args.shapes:
                n, k = SHAPES[shape]
                for rows in args.rows:
                    for name, (make, call, nbytes) in paths(n, k).items():
                        if args.paths and name not in args.paths:
                            continue
                        t = time_path(make, call, nbytes, rows, k, args.cache_mb * 2**20, args.repeats)
                        key = (shape, threads, rows, name)
                        best[key] = min(best.get(key, float("inf")), t)
                        print(f"{shape} {n}x{k} {threads}t M={rows:<4} {name:20s} {t * 1e6:9.0f} us", flush=True)
    print("\n| matrix | threads | rows | path | us per call | GB/s of weights | rows/s |")
    print("|---|---|---|---|---|---|---|")
    for (shape, threads, rows, name), t in best.items():
        n, k = SHAPES[shape]
        nbytes = paths(n, k)[name][2]
        print(f"| {shape} {n}x{k} | {threads} | {rows} | {name} | {t * 1e6:.0f} | {nbytes / t / 1e9:.1f} | {rows / t:.0f} |")


if __name__ == "__main__":
    main()
