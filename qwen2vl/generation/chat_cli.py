"""``qwen2vl chat``: an interactive multi-turn session.

Type a message and press enter. Commands: ``/image PATH`` and ``/video PATH`` attach media to
your next message, ``/reset`` starts over, ``/quit`` (or end of input) leaves. Earlier turns and
images are not recomputed (see :mod:`qwen2vl.generation.chat`).
"""

from __future__ import annotations

import argparse
import sys

from .chat import ChatSession
from .cli import Parser, add_model_options, add_sampling_options, load_engine, media_part, sampling_kwargs


def main(argv: list[str]) -> int:
    parser = Parser(prog="qwen2vl chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--system", help="a system prompt (default: the model's)")
    add_sampling_options(parser)
    args = parser.parse_args(argv)
    engine = load_engine(args)
    chat = ChatSession(engine, system=args.system, **sampling_kwargs(args))
    pending: list[dict] = []
    interactive = sys.stdin.isatty()
    print("qwen2vl chat: /image PATH, /video PATH, /reset, /quit", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            return 0
        line = line.strip()
        if not line:
            continue
        command, _, rest = line.partition(" ")
        if command in ("/image", "/video"):
            try:
                pending.append(media_part(command[1:], rest.strip(), args))
                print(f"[{command[1:]} attached: {rest.strip()}]", file=sys.stderr)
            except Exception as e:  # a bad path is reported and the session goes on
                print(f"error: {e}", file=sys.stderr)
            continue
        if command == "/reset":
            chat.reset()
            pending = []
            print("[conversation reset]", file=sys.stderr)
            continue
        content = [*pending, {"type": "text", "text": line}] if pending else line
        try:
            for delta in chat.send(content):
                sys.stdout.write(delta)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
            pending = []
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
