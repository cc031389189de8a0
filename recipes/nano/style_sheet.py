"""A contact sheet of ``varied``-style synthetic samples (eval split, seed 9): docs/synthetic-varied.png.

    python recipes/nano/style_sheet.py [--out docs/synthetic-varied.png] [--n 24] [--cell 200]

Samples ``i`` of each task in turn (compact sizes), each thumbnail fitted into a ``cell`` x ``cell``
tile with its task and the font (or background) it was drawn with; a video shows its last frame.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from qwen2vl.data.synthetic import TASKS, generate_sample
from qwen2vl.data.synthetic.common import font

SPLIT, SEED = "eval", 9


def sheet(n: int, cell: int, columns: int = 6) -> Image.Image:
    tasks = sorted(TASKS)
    caption = 14
    rows = -(-n // columns)
    out = Image.new("RGB", (columns * cell, rows * (cell + caption)), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for k in range(n):
        task = tasks[k % len(tasks)]
        sample = generate_sample(k, SEED, SPLIT, [task], "compact", style="varied")
        image = (sample.image or sample.frames[-1]).copy()
        image.thumbnail((cell - 4, cell - 4))
        x, y = (k % columns) * cell, (k // columns) * (cell + caption)
        out.paste(image, (x + (cell - image.width) // 2, y + (cell - image.height) // 2))
        facts = sample.meta["style"]
        label = f"{task}: {facts.get('font') or facts.get('background')}"
        draw.text((x + 3, y + cell), label[:34], font=font(11), fill=(0, 0, 0))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/synthetic-varied.png")
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--cell", type=int, default=200)
    args = p.parse_args(argv)
    image = sheet(args.n, args.cell)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=255, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
