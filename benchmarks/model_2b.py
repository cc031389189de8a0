"""The full Qwen2-VL-2B shape with random bf16 weights on CPU: save, load (peak memory), one forward.

    python benchmarks/model_2b.py [--dir DIR]

Loading runs in a fresh process so its peak resident memory (VmHWM) is the loader's alone;
the weights are 4.42 GB in bf16, so a loader that materialises them once peaks near that.
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

from qwen2vl import Qwen2VL
from qwen2vl.config import preset

GB = 1e9


def peak_rss() -> int:
    """Peak resident memory of this process in bytes (VmHWM; unlike ru_maxrss it restarts at exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not available (Linux only)")


def load_and_run(directory: str) -> dict:
    torch.manual_seed(0)
    base = peak_rss()
    start = time.perf_counter()
    model = Qwen2VL.from_pretrained(directory, progress=False)
    load_s = time.perf_counter() - start
    peak_load = peak_rss()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.tensor([[151644, 8948, 198] + [151652] + [151655] * 16 + [151653] + [872, 198, 100, 200]])
    pv = torch.randn(64, 1176)
    grid = torch.tensor([[1, 8, 8]])
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(ids, pixel_values=pv, image_grid_thw=grid)
    forward_s = time.perf_counter() - start
    return {"weights_gb": weights / GB, "rss_before_gb": base / GB, "peak_rss_after_load_gb": peak_load / GB,
            "peak_rss_after_forward_gb": peak_rss() / GB, "load_s": load_s, "forward_s": forward_s, "logits_shape": list(logits.shape),
            "logits_finite": bool(torch.isfinite(logits).all())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", help="reuse/write the random checkpoint here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(load_and_run(args.dir)))
        return
    directory = Path(args.dir or tempfile.mkdtemp(prefix="qwen2vl-2b-"))
    if not (directory / "config.json").exists():
        start = time.perf_counter()
        model = Qwen2VL.from_config(preset("qwen2-vl-2b"), dtype=torch.bfloat16, seed=0)
        model.save_pretrained(directory)
        del model
        print(f"built and saved the random 2B checkpoint in {time.perf_counter() - start:.1f} s")
    out = subprocess.run([sys.executable, __file__, "--child", "--dir", str(directory)], check=True,
                         capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key, value in result.items():
        print(f"{key:>24}: {value:.2f}" if isinstance(value, float) else f"{key:>24}: {value}")
    print(f"{'peak / weights':>24}: {result['peak_rss_after_forward_gb'] / result['weights_gb']:.2f}")


if __name__ == "__main__":
    main()
