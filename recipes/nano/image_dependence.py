"""Does the model look? Per-task answer loss with each image as given and replaced by flat grey.

    python recipes/nano/image_dependence.py runs/nano/qwen2vl-nano runs/nano/data/dev

For every image sample of a dataset directory (``data.jsonl`` + media), the loss per supervised
token of the reference answer is computed twice: with the real image, and with a mid-grey image
of the same size (so the prompt and its token count are unchanged). A model that reads its input
has a much lower loss with the real image; equal losses mean its answers come from the question
alone. Videos are skipped. Prints one line per task (mean over samples, nats per token).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from PIL import Image

from qwen2vl import Processor, Qwen2VL


def answer_loss(model: Qwen2VL, processor: Processor, messages: list[dict]) -> float:
    batch = processor([messages], add_generation_prompt=False, return_labels=True)
    with torch.no_grad():
        logits = model(batch["input_ids"], pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    return torch.nn.functional.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=-100).item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint directory")
    p.add_argument("data", help="dataset directory with data.jsonl")
    p.add_argument("--limit", type=int, default=0, help="at most this many image samples (0: all)")
    args = p.parse_args(argv)
    model = Qwen2VL.from_pretrained(args.model, dtype=torch.float32).eval()
    processor = Processor.from_pretrained(args.model)
    data = Path(args.data)
    totals: dict[str, list[float]] = {}
    seen = 0
    for line in (data / "data.jsonl").read_text().splitlines():
        record = json.loads(line)
        messages = copy.deepcopy(record["messages"])
        parts = [p for p in messages[0]["content"] if isinstance(p, dict) and p.get("type") == "image"]
        if len(parts) != 1 or any(p.get("type") == "video" for p in messages[0]["content"]):
            continue
        with Image.open(data / parts[0]["image"]) as image:
            real = image.convert("RGB")
        losses = []
        for picture in (real, Image.new("RGB", real.size, (128, 128, 128))):
            parts[0]["image"] = picture
            losses.append(answer_loss(model, processor, messages))
        n, with_image, grey = totals.setdefault(record["task"], [0, 0.0, 0.0])
        totals[record["task"]] = [n + 1, with_image + losses[0], grey + losses[1]]
        seen += 1
        if args.limit and seen >= args.limit:
            break
    print(f"{'task':10s} {'n':>4s}  {'real image':>10s}  {'grey image':>10s}")
    for task, (n, with_image, grey) in sorted(totals.items()):
        print(f"{task:10s} {n:4d}  {with_image / n:10.3f}  {grey / n:10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
