"""The agent loop: screenshot -> messages -> model -> parse -> execute, with caps and a trajectory on disk.

Each step the policy sees a system turn with the ``computer_use`` tool and one user turn::

    Task: <the task>
    Previous actions:            (every earlier step, as text; "format error" for a step that did nothing)
    1. click (512, 300)
    Previous screenshot (half size): <image>      (only the latest earlier one, see HISTORY_RULE)
    Current screenshot: <image>
    Reply with the next action as a computer_use call.

History rule: the current screenshot at full size; the one before it at half width and height
(a quarter of its vision tokens); older screenshots dropped (their actions stay, as text).

The loop stops when the environment reports done, on ``answer`` / ``terminate``, at ``max_steps``
or once ``max_seconds`` of wall-clock time have passed (checked before each model call). The
trajectory directory holds ``step_NNN.png`` (the screenshot the model saw), ``step_NNN_action.png``
(the same with the executed action drawn: a ring and cross at the click, a line for a drag, the
typed text in a banner) and ``steps.jsonl`` (one line per step: reply, action, whether it was
executed, pixels, error, environment status, model seconds).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from PIL import Image, ImageDraw

from ..processing.chat import fold_tools
from .actions import COMPUTER_USE, Action, ActionError, action_from_text
from .grounding import PALETTE

HISTORY_RULE = "current screenshot full size; the previous one at half size; older ones dropped"
MARK = PALETTE[0]  # the colour actions are drawn in

Policy = Callable[[list[dict]], str]  # messages -> the model's reply text


class Environment(Protocol):
    def screenshot(self) -> Image.Image: ...

    def execute(self, action: Action, size: tuple[int, int]) -> dict: ...

    def status(self) -> dict: ...  # {"done": bool, "reward": float, ...}


@dataclass
class Episode:
    task: str
    steps: list[dict] = field(default_factory=list)
    stop_reason: str = ""
    answer: str | None = None
    status: dict = field(default_factory=dict)
    seconds: float = 0.0


def describe(action: Action | None) -> str:
    """One history line for an action."""
    if action is None:
        return "format error (no action)"
    words = [action.kind]
    if action.point is not None:
        words.append(f"({action.point[0]:g}, {action.point[1]:g})")
    if action.point2 is not None:
        words.append(f"to ({action.point2[0]:g}, {action.point2[1]:g})")
    for value in (action.text, action.key, action.direction, action.status):
        if value is not None:
            words.append(json.dumps(value, ensure_ascii=False))
    return " ".join(words)


def build_messages(task: str, history: list[str], current: str, previous: str | None = None,
                   tool_format: str = "hermes", tools: list | None = None) -> list[dict]:
    """The conversation of one step; ``current`` / ``previous`` are image paths (previous already halved)."""
    lines = [f"Task: {task}"]
    if history:
        lines += ["Previous actions:"] + [f"{i}. {h}" for i, h in enumerate(history, 1)]
    content: list[dict] = [{"type": "text", "text": "\n".join(lines) + "\n"}]
    if previous is not None:
        content += [{"type": "text", "text": "Previous screenshot (half size): "}, {"type": "image", "image": previous}]
    content += [{"type": "text", "text": "\nCurrent screenshot: "}, {"type": "image", "image": current},
                {"type": "text", "text": "\nReply with the next action as a computer_use call."}]
    return fold_tools([{"role": "user", "content": content}], tools or [COMPUTER_USE], tool_format)


def draw_action(image: Image.Image, action: Action | None, done: dict) -> Image.Image:
    """A copy of the screenshot with what was executed drawn on it (``done``: pixels from the executor)."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    w, h = out.size
    r = max(4, round(min(w, h) / 40))
    if "pixels" in done:
        x, y = done["pixels"]
        draw.ellipse([x - r, y - r, x + r, y + r], outline=MARK, width=max(1, r // 3))
        draw.line([x - 2 * r, y, x + 2 * r, y], fill=MARK, width=1)
        draw.line([x, y - 2 * r, x, y + 2 * r], fill=MARK, width=1)
        if "pixels2" in done:
            draw.line([x, y, *done["pixels2"]], fill=MARK, width=max(1, r // 3))
    label = describe(action) if action is not None and "pixels" not in done else None
    if label:
        draw.rectangle([0, h - r * 3, w, h], fill=MARK)
        draw.text((2, h - r * 3 + 1), label[:120], fill=(255, 255, 255))
    return out


def run_episode(env: Environment, policy: Policy, task: str, out_dir: str | Path, *, max_steps: int = 10,
                max_seconds: float = 120.0, tool_format: str = "hermes") -> Episode:
    """Run one task to its end (see the module docstring); the trajectory goes to ``out_dir``."""
    if max_steps < 1 or max_seconds <= 0:
        raise ValueError(f"max_steps must be >= 1 and max_seconds > 0, got {max_steps}, {max_seconds}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    episode, history, previous = Episode(task), [], None
    start = time.perf_counter()
    log = open(out / "steps.jsonl", "w", encoding="utf-8")
    try:
        for k in range(max_steps):
            if time.perf_counter() - start > max_seconds:
                episode.stop_reason = "time cap"
                break
            shot = env.screenshot()
            shot_path = out / f"step_{k:03d}.png"
            shot.save(shot_path)
            messages = build_messages(task, history, str(shot_path.resolve()), previous, tool_format)
            t0 = time.perf_counter()
            reply = policy(messages)
            model_s = time.perf_counter() - t0
            record = {"step": k, "reply": reply, "model_seconds": round(model_s, 3), "screenshot": shot_path.name,
                      "size": list(shot.size)}
            action, done, executed = None, {}, False
            try:
                action = action_from_text(reply, tool_format)
                done = env.execute(action, shot.size)
                executed = True
            except ActionError as e:  # a format error, or an action the page refused
                record["error"] = str(e)
            record["action"] = action.to_dict() if action else None
            record["executed"] = executed
            record.update(done)
            draw_action(shot, action if executed else None, done).save(out / f"step_{k:03d}_action.png")
            record["drawn"] = f"step_{k:03d}_action.png"
            history.append(describe(action) + ("" if executed or action is None else " (failed in the page)"))
            previous = _half(shot, out / f"step_{k:03d}_half.png")
            episode.status = env.status()
            record["status"] = episode.status
            episode.steps.append(record)
            log.write(json.dumps(record, ensure_ascii=False) + "\n")
            log.flush()
            if action is not None and action.kind in ("answer", "terminate"):
                episode.answer = action.text if action.kind == "answer" else None
                episode.stop_reason = action.kind
                break
            if episode.status.get("done"):
                episode.stop_reason = "done"
                break
        else:
            episode.stop_reason = "step cap"
    finally:
        log.close()
    episode.seconds = time.perf_counter() - start
    (out / "episode.json").write_text(json.dumps(
        {"task": task, "stop_reason": episode.stop_reason, "answer": episode.answer, "status": episode.status,
         "steps": len(episode.steps), "seconds": round(episode.seconds, 3), "history_rule": HISTORY_RULE},
        indent=1) + "\n", encoding="utf-8")
    return episode


def _half(image: Image.Image, path: Path) -> str:
    w, h = image.size
    image.resize((max(1, w // 2), max(1, h // 2)), Image.BICUBIC).save(path)
    return str(path.resolve())


class WebPage:
    """An environment over any URL: never done by itself (the agent answers or terminates)."""

    def __init__(self, browser, url: str):
        self.browser = browser
        browser.goto(url)

    def screenshot(self) -> Image.Image:
        return self.browser.screenshot()

    def execute(self, action: Action, size: tuple[int, int]) -> dict:
        return self.browser.execute(action, size)

    def status(self) -> dict:
        return {"done": False, "url": self.browser.page.url}
