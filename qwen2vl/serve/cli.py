"""``qwen2vl serve``: the OpenAI-compatible server and the web chat page.

    qwen2vl serve                                   # the embedded model on http://127.0.0.1:8000
    qwen2vl serve --model DIR --port 8080 --allowed-media-dir ./media --max-batch 16

Open http://127.0.0.1:8000/ for the chat page, or point any OpenAI client at
http://127.0.0.1:8000/v1. Without --api-key the server has no authentication: it binds to
loopback unless --host says otherwise. docs/serving.md lists what is off by default.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from ..agent.tools import TOOL_FORMATS
from ..cli import UserError
from ..generation.cli import Parser, add_model_options, load_engine


def add_serving_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``serve`` and ``batch``: batching, context, media access and the tool format."""
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    parser.add_argument("--max-model-len", type=int,
                        help="cache slots per request: prompt + answer (default: the model's context, at most 8192)")
    parser.add_argument("--default-max-tokens", type=int, default=512,
                        help="answer length when a request gives no max_tokens (default 512)")
    parser.add_argument("--allowed-media-dir", help="local media files may be read from this directory only")
    parser.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) image and video URLs")
    parser.add_argument("--remote-timeout", type=float, default=10.0,
                        help="seconds per remote download, all redirects and the body included (default 10)")
    parser.add_argument("--max-remote-mb", type=float, default=64, help="size cap per remote download (default 64)")
    parser.add_argument("--max-media-items", type=int, default=16, help="images + videos per request (default 16)")
    parser.add_argument("--max-image-pixels", type=int, help="decoded pixels per image (decompression bomb guard)")
    parser.add_argument("--max-video-frame-pixels", type=int,
                        help="decoded pixels per source video frame (default 4096*4096)")
    parser.add_argument("--max-video-pixels", type=int,
                        help="decoded pixels of all sampled frames of one video (default 768*1920*1080)")
    parser.add_argument("--tool-format", choices=TOOL_FORMATS, default="hermes",
                        help="how requests' tools are prompted and calls read: hermes (<tool_call>, default) or "
                             "qwen (Qwen-Agent's ✿FUNCTION✿ format, which Qwen2-VL-Instruct was used with)")


def check_serving_options(args) -> None:
    for name in ("max_batch", "default_max_tokens", "max_media_items"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise UserError(f"--max-model-len must be >= 2, got {args.max_model_len}")
    if args.allowed_media_dir is not None and not os.path.isdir(args.allowed_media_dir):
        raise UserError(f"--allowed-media-dir {args.allowed_media_dir} is not a directory")


def main(argv: list[str]) -> int:
    parser = Parser(prog="qwen2vl serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", help="the model id clients use (default: the checkpoint's folder name)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429 (default 64)")
    parser.add_argument("--max-request-mb", type=float, default=64, help="request body size cap (default 64)")
    parser.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1 (default: $QWEN2VL_API_KEY, else none)")
    parser.add_argument("--allowed-origins", nargs="*", default=[],
                        help="browser origins allowed to call the API (e.g. https://app.example:3000, or *)")
    parser.add_argument("--allowed-media-domains", nargs="*",
                        help="host names remote media may come from (default: any, when --allow-remote-media)")
    parser.add_argument("--allow-private-media-addresses", action="store_true",
                        help="let remote media come from loopback, link-local and private addresses")
    parser.add_argument("--prepare-workers", type=int, default=2,
                        help="threads that tokenize and decode media (default 2)")
    parser.add_argument("--prepare-timeout", type=float, default=60.0,
                        help="seconds to prepare one request: tokenizing, downloads, decoding (default 60)")
    add_serving_options(parser)
    args = parser.parse_args(argv)
    check_serving_options(args)
    if args.max_queue < 1:
        raise UserError(f"--max-queue must be >= 1, got {args.max_queue}")
    if args.prepare_workers < 1 or args.prepare_timeout <= 0:
        raise UserError("--prepare-workers must be >= 1 and --prepare-timeout > 0")

    import uvicorn

    from .app import ServeSettings, create_app

    engine = load_engine(args, tensor_parallel=True)
    if args.tensor_parallel != 1:  # rank 0 serves and drives; the other ranks follow its decode steps
        from ..distributed import Leader, close, follow, is_main_process
        if not is_main_process():
            follow(engine)
            close()
            return 0
        engine = Leader(engine)
    name = served_model_name(args)
    settings = ServeSettings(
        model_name=name, max_batch=args.max_batch, max_queue=args.max_queue, max_model_len=args.max_model_len,
        default_max_tokens=args.default_max_tokens, max_media_items=args.max_media_items,
        max_request_bytes=int(args.max_request_mb * (1 << 20)), allowed_media_dir=args.allowed_media_dir,
        allow_remote_media=args.allow_remote_media, remote_timeout_s=args.remote_timeout,
        max_remote_bytes=int(args.max_remote_mb * (1 << 20)), max_image_pixels=args.max_image_pixels,
        max_video_frame_pixels=args.max_video_frame_pixels, max_video_pixels=args.max_video_pixels,
        allowed_media_domains=tuple(args.allowed_media_domains) if args.allowed_media_domains else None,
        allow_private_media_addresses=args.allow_private_media_addresses, prepare_workers=args.prepare_workers,
        prepare_timeout_s=args.prepare_timeout, api_key=args.api_key or os.environ.get("QWEN2VL_API_KEY") or None,
        allowed_origins=tuple(args.allowed_origins), tool_format=args.tool_format)
    if not _is_loopback(args.host) and settings.api_key is None:
        print(f"qwen2vl serve: warning: binding to {args.host} without --api-key", file=sys.stderr)
    print(f"qwen2vl serve: {name} on http://{args.host}:{args.port}/ (OpenAI API at /v1)", file=sys.stderr)
    try:
        uvicorn.run(create_app(engine, settings), host=args.host, port=args.port, log_level="warning")
    finally:
        if args.tensor_parallel != 1:
            engine.close()  # the followers stop
            close()
    return 0


def served_model_name(args) -> str:
    """``--served-model-name``, else the checkpoint folder's name (the embedded model: qwen2vl-nano)."""
    return args.served_model_name or os.path.basename(os.path.normpath(args.model or "qwen2vl-nano"))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
