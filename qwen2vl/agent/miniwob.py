"""MiniWoB++ tasks (the ``miniwob`` PyPI package's HTML pages) as an environment of the agent loop.

The pages are opened from the installed package over ``file://`` in our own headless Chromium
(the package's gymnasium/Selenium side is not used). An episode, as the package's own driver
runs one: ``Math.seedrandom(seed)``, ``core.startEpisodeReal()``, wait for ``WOB_TASK_READY``; the
task text is ``core.getUtterance()``; done and reward are the page's ``WOB_DONE_GLOBAL``,
``WOB_REWARD_GLOBAL`` (time-discounted) and ``WOB_RAW_REWARD_GLOBAL`` (1 success, -1 failure).
The screen is the task's 160 x 210 area (the viewport). An episode counts as a success when the
raw reward is positive. MiniWoB's own episode limit is 10 s of page time (``core.EPISODE_MAX_TIME``);
``episode_seconds`` changes it for slow models. An episode that has ended takes no more actions
(its page shows a START cover that would begin a new episode).

Success rates come with a 95 % Wilson interval; the random-click baseline runs the same seeds.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

from PIL import Image

from .actions import Action, ActionError
from .loop import run_episode

VIEWPORT = (160, 210)
SINGLE_STEP_CLICK_TASKS = ["click-test", "click-test-2", "click-button", "click-link", "click-dialog", "click-widget"]


def miniwob_html_dir() -> Path:
    """The ``html/miniwob`` directory of the installed ``miniwob`` package (found without importing it)."""
    spec = importlib.util.find_spec("miniwob")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the miniwob package is not installed: pip install 'qwen2vl[agent]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "html" / "miniwob"
    if not path.is_dir():
        raise FileNotFoundError(f"the miniwob package has no html/miniwob directory at {path}")
    return path


def task_names() -> list[str]:
    return sorted(p.stem for p in miniwob_html_dir().glob("*.html"))


def task_url(task: str) -> str:
    path = miniwob_html_dir() / f"{task}.html"
    if not path.is_file():
        close = [t for t in task_names() if task.split("-")[0] in t][:8]
        raise ValueError(f"unknown MiniWoB++ task {task!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    return path.resolve().as_uri()


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a success rate (0, 0 ... 1 for n = 0 gives (0, 1)).

    >>> [round(v, 3) for v in wilson_interval(0, 10)]
    [0.0, 0.278]
    """
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


class MiniWoB:
    """One MiniWoB++ task in a :class:`~qwen2vl.agent.browser.Browser` of :data:`VIEWPORT` size."""

    def __init__(self, browser, task: str, episode_seconds: float = 10.0):
        self.browser, self.task, self.url = browser, task, task_url(task)
        self.episode_ms = int(1000 * episode_seconds)
        if self.episode_ms <= 0:
            raise ValueError(f"episode_seconds must be positive, got {episode_seconds}")
        self.loaded = False

    def reset(self, seed: int) -> str:
        """Start the episode of ``seed``; returns its task text."""
        page = self.browser.page
        if not self.loaded:
            self.browser.goto(self.url)
            page.wait_for_selector("#sync-task-cover")
            self.loaded = True
        page.evaluate("([seed, ms]) => { Math.seedrandom(seed); core.EPISODE_MAX_TIME = ms; }",
                      [str(seed), self.episode_ms])
        page.evaluate("() => core.startEpisodeReal()")
        deadline = time.monotonic() + 5
        while not page.evaluate("() => WOB_TASK_READY"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"MiniWoB++ task {self.task} did not become ready")
            page.wait_for_timeout(50)
        self.episode_id = page.evaluate("() => WOB_EPISODE_ID")
        utterance = page.evaluate("() => core.getUtterance()")
        return utterance["utterance"] if isinstance(utterance, dict) else str(utterance)

    def screenshot(self) -> Image.Image:
        return self.browser.screenshot()

    def execute(self, action: Action, size: tuple[int, int]) -> dict:
        """Act only while the episode runs: once it has ended (say, timed out) the page shows its START
        cover, and a click there would begin a new, unseen episode."""
        if self.browser.page.evaluate("() => WOB_EPISODE_ID") != self.episode_id:
            raise ActionError("the episode had already ended (MiniWoB++ time limit); nothing was done")
        return self.browser.execute(action, size)

    def status(self) -> dict:
        return self.browser.page.evaluate(
            "() => ({done: WOB_DONE_GLOBAL, reward: WOB_REWARD_GLOBAL, raw_reward: WOB_RAW_REWARD_GLOBAL,"
            " reason: WOB_REWARD_REASON === null ? null : String(WOB_REWARD_REASON)})")

    def finish(self) -> dict:
        """The final status; an episode still running is ended with reward 0 (as the package's force stop)."""
        status = self.status()
        if not status["done"]:
            self.browser.page.evaluate("() => core.endEpisode(0)")
            status = {**self.status(), "done": False, "stopped": True}
        return status


def run_miniwob(task: str, policy, episodes: int, seed: int, out_dir: str | Path, *, browser_factory,
                max_steps: int = 5, max_seconds: float = 60.0, episode_seconds: float = 10.0,
                tool_format: str = "hermes") -> dict:
    """``episodes`` episodes of ``task`` (seeds ``seed``, ``seed + 1``, ...); a summary dict."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    out = Path(out_dir)
    results = []
    with browser_factory(VIEWPORT) as browser:
        env = MiniWoB(browser, task, episode_seconds)
        for e in range(episodes):
            utterance = env.reset(seed + e)
            episode = run_episode(env, policy, utterance, out / f"episode_{e:03d}", max_steps=max_steps,
                                  max_seconds=max_seconds, tool_format=tool_format)
            status = env.finish()
            results.append({"seed": seed + e, "utterance": utterance, "success": bool(status.get("raw_reward", 0) > 0),
                            "reward": status.get("reward", 0.0), "raw_reward": status.get("raw_reward", 0.0),
                            "steps": len(episode.steps), "stop_reason": episode.stop_reason,
                            "format_errors": sum(1 for s in episode.steps if s["action"] is None)})
    successes = sum(r["success"] for r in results)
    summary = {"task": task, "episodes": episodes, "seed": seed, "successes": successes,
               "success_rate": successes / episodes, "ci95": list(wilson_interval(successes, episodes)),
               "mean_reward": sum(r["reward"] for r in results) / episodes, "trajectory_dir": str(out),
               "results": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary
