"""Synthetic data generation speed: samples written per second (PNG media + data.jsonl).

Reports wall-clock samples/s and samples per CPU-second of this process (the latter is steadier
on a shared machine) for the default task mix at both size policies, with 1 and 2 workers, and
per task with 1 worker.

    python benchmarks/synthetic_data.py [--n 2000]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

from qwen2vl.data.synthetic import TASKS, write_dataset


def timed(n: int, **kw) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        wall, cpu = time.perf_counter(), time.process_time()
        write_dataset(tmp, n, 0, progress=False, **kw)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return n / wall, n / cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=2000)
    args = p.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; n={args.n}")
    print("| run | samples/s (wall) | samples per CPU-second |\n|---|---|---|")
    for policy in ("varied", "compact"):
        for workers in (1, 2):
            wall, cpu = timed(args.n, image_size_policy=policy, workers=workers)
            cpu_text = f"{cpu:.0f}" if workers == 1 else "(workers' time not counted)"
            print(f"| default mix, {policy}, {workers} worker(s) | {wall:.0f} | {cpu_text} |", flush=True)
    for task in TASKS:
        wall, cpu = timed(args.n // 4, tasks=[task])
        print(f"| {task} only, varied, 1 worker | {wall:.0f} | {cpu:.0f} |", flush=True)
    wall, cpu = timed(args.n // 4, tasks=["video"], video_format="mp4")
    print(f"| video as mp4, 1 worker | {wall:.0f} | {cpu:.0f} |", flush=True)


if __name__ == "__main__":
    main()
