"""Weight-only int8/int4 matmul kernels on this CPU at the Qwen2-VL-2B decoder's matrix sizes.

    python benchmarks/quant_kernels.py [--threads 1 2] [--tokens 1]

Compares a bf16 ``nn.Linear``, torchao's ``Int8WeightOnlyConfig`` / ``Int4WeightOnlyConfig``
(when torchao imports) and ours (qwen2vl.quant: oneDNN int8 and our int8-input int4 kernel, or
torch's ``_weight_int4pack_mm_for_cpu`` with ``QWEN2VL_INT4_KERNEL=aten``). Prints microseconds per
call and the GB/s of weight bytes read. One matrix timed in a loop stays in the 480 MB L3: for
weights read from memory, as at decode, see ``quant_paths.py``.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from qwen2vl.quant.linear import quantize_linear

# (out, in) of the 2B decoder's projections: fused qkv, o, fused gate/up, down, and lm_head
SHAPES = {"qkv": (2048, 1536), "o": (1536, 1536), "gate_up": (17920, 1536), "down": (1536, 8960),
          "lm_head": (151936, 1536)}


def bench(fn, x, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn(x)
            best = min(best, time.perf_counter() - start)
    return best


def weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def torchao_variants(linear: nn.Linear) -> dict:
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except Exception as e:  # noqa: BLE001 - report any import failure
        print(f"torchao does not import: {type(e).__name__}: {e}")
        return {}
    out = {}
    configs = [("torchao int8", Int8WeightOnlyConfig())] + [
        (f"torchao int4 {fmt}", Int4WeightOnlyConfig(group_size=64, int4_packing_format=fmt))
        for fmt in ("plain", "plain_int32", "tile_packed_to_4d")]
    for name, config in configs:
        m = nn.Sequential(copy.deepcopy(linear))
        try:
            quantize_(m, config)
            out[name] = m
        except Exception as e:  # noqa: BLE001
            print(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    args = parser.parse_args()
    torch.manual_seed(0)
    for shape in args.shapes:
        n, k = SHAPES[shape]
        linear = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        variants = {"bf16": linear, "ours int8": quantize_linear(linear, "int8"),
                    "ours int4 g64": quantize_linear(linear, "int4", group_size=64)}
        variants.update(torchao_variants(linear))
        x = torch.randn(args.tokens, k, dtype=torch.bfloat16)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for name, module in variants.items():
                try:
                    t = bench(module, x, args.repeats)
                except Exception as e:  # noqa: BLE001
                    print(f"{shape:>8} {threads}t {name:>14}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                    continue
                gbs = weight_bytes(module) / t / 1e9
                print(f"{shape:>8} {n}x{k} {threads}t {name:>14}: {t * 1e6:9.1f} us  {gbs:6.1f} GB/s of weights")


if __name__ == "__main__":
    main()
