"""``qwen2vl eval``: answer the held-out synthetic set with a model, score it, print a table, write JSON.

The held-out set is the ``eval`` seed namespace of the generator (never used for training),
generated on the fly unless ``--data`` names a written dataset::

    qwen2vl eval --model DIR [--n 500] [--seed 0] [--out eval.json]
    qwen2vl eval --model DIR --data data/eval --force-size 224 --out eval224.json
    qwen2vl eval --model DIR --style varied --out eval-varied.json   # unseen fonts, colours, layouts

Scoring is separate from the model: :func:`evaluate` takes any ``predict(conversations) -> texts``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

from ..cli import UserError
from .make_dataset import parse_pixels, parse_size, parse_tasks
from .metrics import format_table, score, summarise
from .synthetic import SIZE_POLICIES, STYLES, force_media_size, read_dataset, set_video_pixels, write_dataset

EVAL_SEED = 0
Predict = Callable[[list[list[dict]]], list[str]]


def conversation(record: dict, root: Path, force_size: tuple[int, int] | None = None) -> list[dict]:
    """The prompt of a record: its messages up to the last answer, media paths made absolute."""
    if force_size:
        record = force_media_size(record, force_size)
    messages = json.loads(json.dumps(record["messages"][:-1]))
    for message in messages:
        if isinstance(message["content"], list):
            for item in message["content"]:
                for key in ("image", "video"):
                    if isinstance(item.get(key), str):
                        item[key] = str(root / item[key])
                    elif isinstance(item.get(key), list):
                        item[key] = [str(root / p) for p in item[key]]
    return messages


def evaluate(records: Sequence[dict], root: Path, predict: Predict, *, batch_size: int = 8,
             force_size: tuple[int, int] | None = None, progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Predict every record in batches and score it; returns (per-sample scores, summary rows)."""
    scored: list[dict] = []
    with tqdm(total=len(records), desc="eval", disable=not progress, unit="sample") as bar:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            texts = predict([conversation(r, root, force_size) for r in chunk])
            if len(texts) != len(chunk):
                raise RuntimeError(f"predict returned {len(texts)} answers for {len(chunk)} prompts")
            scored += [score(r, t) for r, t in zip(chunk, texts)]
            bar.update(len(chunk))
    return scored, summarise(scored)


def engine_predict(model_dir: str, max_new_tokens: int) -> Predict:
    """Greedy answers from the generation engine for a checkpoint directory."""
    from .. import Engine

    engine = Engine.from_pretrained(model_dir)  # the same engine (device, dtype, config) as `qwen2vl generate`

    def predict(conversations: list[list[dict]]) -> list[str]:
        return [r.text for r in engine.generate(conversations, max_new_tokens=max_new_tokens, temperature=0.0)]

    return predict


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen2vl eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--data", help="a written dataset (directory or data.jsonl); default: generate the held-out set")
    p.add_argument("--n", type=int, default=500, help="held-out samples to generate (without --data)")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help="held-out seed, in the eval namespace")
    p.add_argument("--tasks", help="comma list of tasks to generate (without --data)")
    p.add_argument("--size-policy", choices=sorted(SIZE_POLICIES), default="varied")
    p.add_argument("--style", choices=STYLES, default="plain",
                   help="generator look of the generated set (without --data): plain or varied")
    p.add_argument("--force-size", help="N or WxH: squash every image and frame to this size (224 ablation)")
    p.add_argument("--video-pixels", help="MIN,MAX per-frame pixel budget for video items (as in training)")
    p.add_argument("--limit", type=int, help="score only the first N records")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="answer tokens per sample (default 256: a GUI call of the nano tokenizer takes ~80)")
    p.add_argument("--out", default="eval.json", help="JSON with the summary rows and every scored sample")
    p.add_argument("--quiet", action="store_true")
    return p


def run(args: argparse.Namespace, predict: Predict) -> dict:
    """Load or generate the records, evaluate, print the table, write the JSON; returns the JSON dict."""
    force_size = parse_size(args.force_size)
    with tempfile.TemporaryDirectory(prefix="qwen2vl-eval-") as tmp:
        if args.data:
            path = Path(args.data)
            if not path.exists():
                raise UserError(f"--data {args.data}: no such file or directory")
            records = read_dataset(path)
            root = path if path.is_dir() else path.parent
        else:
            jsonl = write_dataset(tmp, args.n, args.seed, split="eval", tasks=parse_tasks(args.tasks),
                                  image_size_policy=args.size_policy, progress=not args.quiet, style=args.style)
            records, root = read_dataset(jsonl), jsonl.parent
        if args.limit is not None:
            records = records[:args.limit]
        if args.video_pixels:
            records = [set_video_pixels(r, parse_pixels(args.video_pixels)) for r in records]
        scored, rows = evaluate(records, root, predict, batch_size=args.batch_size, force_size=force_size,
                                progress=not args.quiet)
    print(format_table(rows))
    generated = f"generated eval split, seed {args.seed}, n {args.n}" + (
        f", {args.style} style" if args.style != "plain" else "")
    result = {"model": args.model, "data": args.data or generated,
              "force_size": list(force_size) if force_size else None, "video_pixels": args.video_pixels,
              "rows": rows, "samples": scored}
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or args.n < 1:
        raise UserError("--batch-size and --n must be >= 1")
    if not Path(args.model).is_dir():
        raise UserError(f"--model {args.model}: not a checkpoint directory")
    run(args, engine_predict(args.model, args.max_new_tokens))
    return 0
