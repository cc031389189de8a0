"""Packed-row attention in training: one masked attention over each whole row against one causal
attention per sample (``Segments``), forward + backward, on rows like the nano recipe's.

    python benchmarks/packed_attention.py [--rows 8] [--seq-len 512] [--heads 4 --kv-heads 2 --head-dim 64]

Rows are filled with samples of 40-200 tokens (seeded) and a padded tail, as the stream packs them.
Prints the best of ``--repeats`` timings of each, alternated, and the FLOP ratio of the two.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F

from qwen2vl.model.text import Segments


def packed_ids(rows: int, seq_len: int, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        ids, k = [], 1
        while len(ids) < seq_len - 20:
            ids += [k] * rng.choice([40, 60, 90, 120, 200])
            k += 1
        ids = ids[:seq_len - 12]
        out.append(ids + [0] * (seq_len - len(ids)))
    return torch.tensor(out)


def full_row_mask(ids: torch.Tensor) -> torch.Tensor:
    t = ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)) & (ids > 0).unsqueeze(1)
    return ((causal & same) | torch.eye(t, dtype=torch.bool)).unsqueeze(1)


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn().sum().backward()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ids = packed_ids(args.rows, args.seq_len, seed=0)
    segments, mask = Segments.from_ids(ids), full_row_mask(ids)
    q, k, v = (torch.randn(args.rows, h, args.seq_len, args.head_dim, requires_grad=True)
               for h in (args.heads, args.kv_heads, args.kv_heads))
    runs = sum(len(r) for r in segments.runs)
    flops = sum((e - s) ** 2 for r in segments.runs for s, e in r) / (args.rows * args.seq_len ** 2)
    print(f"torch {torch.__version__}, {args.threads} thread(s); {args.rows} x {args.seq_len} tokens, "
          f"{runs / args.rows:.1f} samples per row; per-sample attention does {flops:.0%} of the full row's products")
    for round_ in range(2):
        full = best_of(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True), args.repeats)
        per_sample = best_of(lambda: segments.attend(q, k, v), args.repeats)
        print(f"round {round_ + 1}: masked full row {full * 1e3:.1f} ms, per sample {per_sample * 1e3:.1f} ms "
              f"(forward + backward, best of {args.repeats}): {full / per_sample:.2f}x")


if __name__ == "__main__":
    main()
