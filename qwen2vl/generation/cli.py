"""``qwen2vl generate``: answer one prompt about images and videos, printing the answer as it streams.

    qwen2vl generate --image examples/receipt.png --prompt "What is the total?"
    qwen2vl generate --model DIR --video clip.mp4 --prompt "Which way does the circle move?" --json
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from ..cli import UserError

EMBEDDED_MODEL = Path(__file__).resolve().parents[1] / "assets" / "qwen2vl-nano"


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line (a UserError), not usage + exit."""

    def error(self, message):
        raise UserError(message)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory or hub id (default: the embedded qwen2vl-nano)")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: float32 on CPU, config.json's on CUDA)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--quantize", choices=["int8", "int4"],
                        help="weight-only quantization after loading: int8 per output row, int4 in groups of 64 "
                             "(docs/quantization.md)")
    parser.add_argument("--compile", action="store_true",
                        help="fuse the decode step with torch.compile (one compilation at the first request, "
                             "then faster tokens: docs/benchmarks.md; needs a C++ compiler on the CPU)")
    parser.add_argument("--prefill-chunk", type=int, default=512,
                        help="prompt tokens prefilled per decode step, so long prompts never stall running "
                             "streams (default 512)")
    parser.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                        help="shard the model over N processes started by torchrun --nproc-per-node N "
                             "(qwen2vl generate; docs/distributed.md)")


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", help="a stop string (repeatable)")
    parser.add_argument("--min-pixels", type=int, help="per-image lower pixel budget before resizing")
    parser.add_argument("--max-pixels", type=int, help="per-image upper pixel budget before resizing")


def sampling_kwargs(args) -> dict:
    return {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_p", "top_k", "min_p",
                                          "repetition_penalty", "seed", "stop")}


def media_part(kind: str, path: str, args) -> dict:
    if not Path(path).exists():
        raise UserError(f"{kind} file not found: {path}")
    part = {"type": kind, kind: str(Path(path).resolve())}
    for key in ("min_pixels", "max_pixels"):
        if getattr(args, key) is not None:
            part[key] = getattr(args, key)
    return part


def load_engine(args, tensor_parallel: bool = False):
    """Model + processor from --model (or the embedded checkpoint), with a loading indicator.

    ``tensor_parallel``: the verb runs under torchrun with --tensor-parallel N (others refuse it)."""
    from ..generation.engine import Engine

    path = args.model
    if path is None:
        if not (EMBEDDED_MODEL / "config.json").is_file():
            raise UserError("no --model given and the embedded qwen2vl-nano checkpoint is not installed; "
                            "pass --model DIR")
        path = EMBEDDED_MODEL
    size = getattr(args, "tensor_parallel", 1)
    if size != 1 and not tensor_parallel:
        raise UserError(f"--tensor-parallel {size}: only qwen2vl generate and serve run tensor-parallel so far")
    quantize = getattr(args, "quantize", None)
    if size != 1 and quantize:
        raise UserError(f"--quantize {quantize} does not run tensor-parallel yet; drop one of the two options")
    try:
        return Engine.from_pretrained(path, dtype=args.dtype, device=args.device, prefill_chunk=args.prefill_chunk,
                                      quantize=quantize, tensor_parallel=size, compile=getattr(args, "compile", False))
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        raise UserError(str(e)) from None


def generate_main(argv: list[str]) -> int:
    parser = Parser(prog="qwen2vl generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    parser.add_argument("--video", action="append", default=[], help="a video file (repeatable)")
    parser.add_argument("--prompt", required=True, help="the question or instruction")
    parser.add_argument("--system", help="a system prompt (default: the model's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    parser.add_argument("--draw", help="draw the boxes of the answer on the first image and save it here")
    add_sampling_options(parser)
    args = parser.parse_args(argv)

    content = [media_part("image", p, args) for p in args.image] + [media_part("video", p, args) for p in args.video]
    content.append({"type": "text", "text": args.prompt})
    conversation = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": content}]
    engine = load_engine(args, tensor_parallel=True)
    out = sys.stdout
    if args.tensor_parallel != 1:  # every rank generates the same tokens; rank 0 alone prints
        from ..distributed import is_main_process, shared_seed
        args.seed = shared_seed(args.seed)
        out = out if is_main_process() else io.StringIO()
    try:
        params = engine.sampling_params(**sampling_kwargs(args))
        batch = engine.prepare([conversation], params.max_new_tokens)
        result = None
        for event in engine.run(batch, [params]):
            if isinstance(event, list):
                result = event[0]
            elif not args.json:
                out.write(event[1])
                out.flush()
    except (ValueError, OSError) as e:
        raise UserError(str(e)) from None
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
                          "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                          "timings": result.timings}), file=out)
    else:
        out.write("\n")
    if args.draw and out is sys.stdout:
        draw_answer(result.text, args.image, args.draw)
    return 0


def draw_answer(text: str, images: list[str], out: str) -> None:
    from PIL import Image

    from ..agent.grounding import draw_regions, parse_regions
    if not images:
        raise UserError("--draw needs an --image to draw on")
    regions = parse_regions(text)
    with Image.open(images[0]) as img:
        drawn = draw_regions(img.convert("RGB"), regions)
    drawn.save(out)
    print(f"{len(regions)} box(es) drawn on {images[0]} -> {out}", file=sys.stderr)


main = generate_main
