"""Write a synthetic dataset: ``python -m qwen2vl.data.make_dataset --out DIR --n N --seed S``.

Examples::

    python -m qwen2vl.data.make_dataset --out data/train --n 20000 --seed 0
    python -m qwen2vl.data.make_dataset --out data/eval --n 1000 --seed 0 --split eval
    python -m qwen2vl.data.make_dataset --out data/train224 --n 20000 --seed 0 --force-size 224
    python -m qwen2vl.data.make_dataset --out data/mix --n 5000 --seed 1 --tasks reading=2,counting=1
    python -m qwen2vl.data.make_dataset --out data/eval-varied --n 1000 --seed 0 --split eval --style varied
"""

from __future__ import annotations

import argparse
import sys

from ..cli import UserError
from .synthetic import SIZE_POLICIES, SPLITS, STYLES, TASKS, write_dataset


def parse_tasks(text: str | None) -> dict[str, float] | None:
    """``"reading,video"`` (equal weights) or ``"reading=2,video=1"``; None for the default mix."""
    if not text:
        return None
    mix = {}
    for part in text.split(","):
        name, _, weight = part.strip().partition("=")
        if name not in TASKS:
            raise UserError(f"unknown task {name!r} in --tasks; expected some of {', '.join(TASKS)}")
        try:
            mix[name] = float(weight) if weight else 1.0
        except ValueError:
            raise UserError(f"--tasks weight for {name!r} must be a number, got {weight!r}") from None
        if mix[name] < 0:
            raise UserError(f"--tasks weight for {name!r} must be >= 0, got {weight}")
    if sum(mix.values()) <= 0:
        raise UserError("--tasks weights must not all be zero")
    return mix


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``"224"`` -> (224, 224); ``"320x224"`` -> (320, 224) as (width, height)."""
    if not text:
        return None
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"--force-size must be N or WxH in pixels, got {text!r}") from None
    if len(values) not in (1, 2) or min(values) < 28:
        raise UserError(f"--force-size must be N or WxH with sides >= 28, got {text!r}")
    return (values[0], values[-1])


def parse_pixels(text: str | None) -> tuple[int, int] | None:
    """``"3136,50176"`` -> (3136, 50176): a per-frame (min_pixels, max_pixels) budget."""
    if not text:
        return None
    try:
        low, high = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--video-pixels must be MIN,MAX in pixels, got {text!r}") from None
    if not 0 < low <= high:
        raise UserError(f"--video-pixels needs 0 < MIN <= MAX, got {text!r}")
    return (low, high)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qwen2vl.data.make_dataset", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (data.jsonl, manifest.json, media)")
    p.add_argument("--n", type=int, required=True, help="number of samples")
    p.add_argument("--seed", type=int, required=True, help="seed (within the split's namespace)")
    p.add_argument("--split", choices=SPLITS, default="train", help="seed namespace; eval never overlaps train")
    p.add_argument("--tasks", help=f"comma list of {', '.join(TASKS)}, optionally name=weight")
    p.add_argument("--size-policy", choices=sorted(SIZE_POLICIES), default="varied",
                   help="image sides: varied 100-1200 px, compact 100-512 px, per-task: compact with shape scenes <= 320 px, "
                        "charts <= 384 px")
    p.add_argument("--style", choices=STYLES, default="plain",
                   help="generator look: plain (the original) or varied (fonts, colours, backgrounds, layouts; "
                        "the train split holds some fonts out)")
    p.add_argument("--force-size", help="N or WxH: every media item asks the processor for this size (ablation)")
    p.add_argument("--video-format", choices=["frames", "mp4"], default="frames")
    p.add_argument("--video-pixels", help="MIN,MAX: per-frame min_pixels and max_pixels on every video item")
    p.add_argument("--workers", type=int, default=1, help="processes (same output for any number)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 0:
        raise UserError(f"--n must be >= 0, got {args.n}")
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    path = write_dataset(args.out, args.n, args.seed, split=args.split, tasks=parse_tasks(args.tasks),
                         image_size_policy=args.size_policy, force_size=parse_size(args.force_size),
                         video_format=args.video_format, video_pixels=parse_pixels(args.video_pixels),
                         workers=args.workers, progress=not args.quiet, style=args.style)
    print(f"wrote {args.n} samples to {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"make_dataset: error: {e}", file=sys.stderr)
        sys.exit(2)
