"""``qwen2vl agent``: the visual agent loop in headless Chromium, on any page or on MiniWoB++ tasks.

    qwen2vl agent --url https://example.com --task "Open the 'More information' link"
    qwen2vl agent --miniwob click-button --episodes 50 --seed 0 --json
    qwen2vl agent --miniwob click-dialog --base-url http://localhost:8000/v1 --no-random-baseline

The policy is the embedded qwen2vl-nano (default), a checkpoint (``--model DIR``), or any
OpenAI-compatible server (``--base-url``; ``--served-model`` names the model, default: the first
the server lists). Local models decode under the tool-call constraint unless ``--no-constrain``.
With ``--miniwob`` a random-click baseline runs the same seeds (``--no-random-baseline`` to skip).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..cli import UserError
from ..generation.cli import Parser, add_model_options, load_engine
from .tools import TOOL_FORMATS


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="qwen2vl agent", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a page to act on (with --task)")
    where.add_argument("--miniwob", metavar="TASK", help="a MiniWoB++ task name, e.g. click-button")
    p.add_argument("--task", help="what to do on --url")
    p.add_argument("--episodes", type=int, default=10, help="MiniWoB++ episodes (seeds --seed, --seed + 1, ...)")
    p.add_argument("--seed", type=int, default=0)
    add_model_options(p)
    p.add_argument("--base-url", help="an OpenAI-compatible server to use as the policy")
    p.add_argument("--served-model", help="the model name at --base-url (default: the first listed)")
    p.add_argument("--api-key", help="API key for --base-url (default: $OPENAI_API_KEY or none)")
    p.add_argument("--tool-format", choices=TOOL_FORMATS, default="hermes")
    p.add_argument("--no-constrain", action="store_true", help="local models: decode without the tool-call grammar")
    p.add_argument("--actions", help="comma list of actions the constrained decoder allows (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-steps", type=int, default=5, help="steps per episode")
    p.add_argument("--max-seconds", type=float, default=120.0, help="wall-clock cap per episode")
    p.add_argument("--episode-seconds", type=float, default=10.0, help="MiniWoB++ page time limit per episode")
    p.add_argument("--viewport", default="1280x800", help="WxH of the page for --url")
    p.add_argument("--chromium", help="the Chromium binary (default: $QWEN2VL_CHROMIUM or chromium on PATH)")
    p.add_argument("--no-random-baseline", action="store_true")
    p.add_argument("--trajectory-dir", help="where trajectories go (default: ./agent-runs/<task>-<time>)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def make_policy(args):
    if args.base_url:
        import os

        from .policy import OpenAIPolicy

        if args.model:
            raise UserError("--model and --base-url are two different policies; give one")
        return OpenAIPolicy(args.base_url, args.served_model, args.api_key or os.environ.get("OPENAI_API_KEY"),
                            max_tokens=args.max_new_tokens), f"openai:{args.base_url}"
    from .policy import EnginePolicy

    actions = [a.strip() for a in args.actions.split(",")] if args.actions else None
    try:
        policy = EnginePolicy(load_engine(args), args.tool_format, not args.no_constrain, actions, args.max_new_tokens)
    except ValueError as e:
        raise UserError(str(e)) from None
    return policy, f"model:{args.model or 'embedded qwen2vl-nano'}"


def _viewport(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--viewport {text!r}: expected WxH, e.g. 1280x800") from None
    if not (64 <= w <= 4096 and 64 <= h <= 4096):
        raise UserError(f"--viewport {text}: each side must be in [64, 4096]")
    return w, h


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.url and not args.task:
        raise UserError("--url needs --task (what to do on the page)")
    if args.episodes < 1 or args.max_steps < 1 or args.max_seconds <= 0 or args.episode_seconds <= 0:
        raise UserError("--episodes and --max-steps must be >= 1, --max-seconds and --episode-seconds > 0")
    name = args.miniwob or "web"
    out = Path(args.trajectory_dir or Path("agent-runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    policy, policy_name = make_policy(args)
    try:
        import playwright.sync_api  # noqa: F401

        from .browser import Browser
    except ModuleNotFoundError as e:
        raise UserError(f"{e}; install the agent extra: pip install 'qwen2vl[agent]'") from None

    def browser_factory(viewport):
        return Browser(viewport, chromium=args.chromium)

    try:
        if args.miniwob:
            result = _miniwob(args, policy, out, browser_factory)
        else:
            result = _web(args, policy, out, browser_factory)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    result["policy"] = policy_name
    print(json.dumps(result) if args.json else _report(result))
    return 0


def _miniwob(args, policy, out: Path, browser_factory) -> dict:
    from .miniwob import run_miniwob, task_url
    from .policy import RandomPolicy

    try:
        task_url(args.miniwob)
    except ValueError as e:
        raise UserError(str(e)) from None
    common = {"browser_factory": browser_factory, "max_steps": args.max_steps, "max_seconds": args.max_seconds,
              "episode_seconds": args.episode_seconds, "tool_format": args.tool_format}
    summary = run_miniwob(args.miniwob, policy, args.episodes, args.seed, out / "model", **common)
    summary["trajectory_dir"] = str(out)
    summary.pop("results")
    if not args.no_random_baseline:
        base = run_miniwob(args.miniwob, RandomPolicy(args.seed, args.tool_format), args.episodes, args.seed,
                           out / "random", **common)
        summary["random_baseline"] = {k: base[k] for k in ("successes", "success_rate", "ci95", "mean_reward")}
    else:
        summary["random_baseline"] = None
    return summary


def _web(args, policy, out: Path, browser_factory) -> dict:
    from .loop import WebPage, run_episode

    with browser_factory(_viewport(args.viewport)) as browser:
        env = WebPage(browser, args.url)
        episode = run_episode(env, policy, args.task, out, max_steps=args.max_steps, max_seconds=args.max_seconds,
                              tool_format=args.tool_format)
    return {"task": args.task, "url": args.url, "steps": len(episode.steps), "stop_reason": episode.stop_reason,
            "answer": episode.answer, "format_errors": sum(1 for s in episode.steps if s["action"] is None),
            "trajectory_dir": str(out)}


def _report(result: dict) -> str:
    if "success_rate" not in result:
        return (f"{result['task']}: {result['steps']} steps, stopped by {result['stop_reason']}"
                f"{', answer: ' + repr(result['answer']) if result['answer'] else ''}; "
                f"trajectory in {result['trajectory_dir']}")
    lo, hi = result["ci95"]
    lines = [f"{result['task']}: {result['successes']}/{result['episodes']} = {100 * result['success_rate']:.1f}% "
             f"(95% CI {100 * lo:.1f}-{100 * hi:.1f}%) with {result['policy']}"]
    base = result.get("random_baseline")
    if base:
        lo, hi = base["ci95"]
        lines.append(f"random clicks: {base['successes']}/{result['episodes']} = {100 * base['success_rate']:.1f}% "
                     f"(95% CI {100 * lo:.1f}-{100 * hi:.1f}%)")
    lines.append(f"trajectories in {result['trajectory_dir']}")
    return "\n".join(lines)
