"""``qwen2vl <verb> ...``: dispatch to each verb's own module (imported only when used).

Every verb module exposes ``main(argv: list[str]) -> int``. Errors the user can fix (a missing
file, a bad value) are raised as :class:`UserError` and printed as one line, without a traceback.
"""

from __future__ import annotations

import importlib
import sys

VERBS = {
    "generate": ("qwen2vl.generation.cli", "answer one prompt (with images/videos), streaming"),
    "chat": ("qwen2vl.generation.chat_cli", "interactive multi-turn chat; /image PATH, /video PATH"),
    "serve": ("qwen2vl.serve.cli", "OpenAI-compatible HTTP server with a web chat page"),
    "batch": ("qwen2vl.serve.batch", "offline batch inference over a JSONL of requests"),
    "train": ("qwen2vl.train.cli", "train or fine-tune (three stages, packing, LoRA, FSDP2)"),
    "eval": ("qwen2vl.data.evaluate", "evaluate a model on the held-out synthetic set"),
    "agent": ("qwen2vl.agent.cli", "visual agent in headless Chromium: --url PAGE --task TEXT, or --miniwob TASK"),
}


class UserError(Exception):
    """A problem with the user's input; printed as one line, exit status 2."""


def usage() -> str:
    lines = ["usage: qwen2vl <verb> [options]", "", "verbs:"]
    lines += [f"  {verb:<10} {help_}" for verb, (_, help_) in VERBS.items()]
    lines += ["", "run `qwen2vl <verb> --help` for the options of a verb"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"qwen2vl: unknown verb {verb!r}; expected one of: {', '.join(VERBS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(VERBS[verb][0])
    except ModuleNotFoundError as e:
        print(f"qwen2vl {verb}: unavailable ({e}); install the matching extra, e.g. pip install 'qwen2vl[{_extra(verb)}]'",
              file=sys.stderr)
        return 2
    try:
        return int(module.main(rest) or 0)
    except UserError as e:
        print(f"qwen2vl {verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qwen2vl {verb}: interrupted", file=sys.stderr)
        return 130


def _extra(verb: str) -> str:
    return {"serve": "serve", "batch": "serve", "train": "train", "agent": "agent"}.get(verb, "video")


if __name__ == "__main__":
    sys.exit(main())
