"""The agent loop in real headless Chromium: a page of our own and two MiniWoB++ tasks, with the embedded model.

Every page gets a logger (an init script) that records the DOM events the executor causes; each
executed action must show up there at the pixels the action said, and the click drawn on the
trajectory screenshot must be where the action said.
"""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from qwen2vl.agent.actions import Action, ActionError
from qwen2vl.agent.tools import format_call

pytest.importorskip("playwright")
CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (scripts/ci-system-deps.sh)")

LOGGER = """
window.__events = [];
for (const type of ['click', 'dblclick', 'mousedown', 'mouseup', 'keydown', 'wheel']) {
  window.addEventListener(type, (e) => window.__events.push({type, x: e.clientX, y: e.clientY, key: e.key,
    dy: e.deltaY, target: e.target && e.target.id}), true);
}
"""
PAGE = """<!doctype html><html><body style="margin:0;font:16px sans-serif">
<button id="go" style="position:absolute;left:40px;top:30px;width:120px;height:40px">Go</button>
<input id="name" style="position:absolute;left:40px;top:100px;width:200px;height:30px">
<div id="area" style="position:absolute;left:0;top:160px;width:320px;height:80px;background:#eef"></div>
</body></html>"""
SIZE = (320, 240)


@pytest.fixture(scope="module")
def engine():
    from qwen2vl.generation.cli import EMBEDDED_MODEL
    from qwen2vl.generation.engine import Engine

    return Engine.from_pretrained(EMBEDDED_MODEL, dtype="float32", device="cpu")


@pytest.fixture
def page_url(tmp_path):
    path = tmp_path / "page.html"
    path.write_text(PAGE)
    return path.as_uri()


def _browser(size):
    from qwen2vl.agent.browser import Browser

    return Browser(size, init_script=LOGGER)


def _events(browser):
    return browser.page.evaluate("() => window.__events.splice(0)")


def _check_step_in_log(step: dict, events: list[dict]) -> None:
    """The DOM events of one executed step are those of its action, at its pixels (CSS px = screenshot px)."""
    kind = step["action"]["kind"] if step["executed"] else None  # not executed: nothing may happen
    types = [e["type"] for e in events]
    if "pixels" in step:
        ends = {"mousedown": step["pixels"], "wheel": step["pixels"], "click": step.get("pixels2", step["pixels"]),
                "dblclick": step["pixels"], "mouseup": step.get("pixels2", step["pixels"])}
        pointer = [e for e in events if e["type"] in ends]
        assert pointer and all(abs(e["x"] - ends[e["type"]][0]) <= 1 and abs(e["y"] - ends[e["type"]][1]) <= 1
                               for e in pointer), (step, events)
    if kind == "click":
        assert types == ["mousedown", "mouseup", "click"], events
    elif kind == "double_click":
        assert types.count("click") == 2 and types[-1] == "dblclick", events
    elif kind == "long_press":
        assert types[:2] == ["mousedown", "mouseup"], events
    elif kind == "type":
        assert "".join(e["key"] for e in events if e["type"] == "keydown") == step["action"]["text"]
    elif kind == "key":
        assert [e for e in events if e["type"] == "keydown"], events
    elif kind == "scroll":
        assert types == ["wheel"] and (events[0]["dy"] < 0) == (step["action"]["direction"] == "up"), events
    elif kind == "drag":
        assert types[0] == "mousedown" and "mouseup" in types, events
    else:  # wait, answer, terminate, a format error, a refused action: nothing happens in the page
        assert events == [], (step, events)


def _check_drawn_click(directory, step: dict) -> None:
    """The cross drawn at the click is where the action said: its densest column and row are x and y."""
    raw = np.asarray(Image.open(directory / step["screenshot"]), dtype=np.int16)
    drawn = np.asarray(Image.open(directory / step["drawn"]), dtype=np.int16)
    assert raw.shape == drawn.shape
    if "pixels" not in step:
        return
    changed = np.abs(raw - drawn).sum(-1) > 0
    x, y = step["pixels"]
    r = max(4, round(min(raw.shape[:2]) / 40))  # the mark's radius; its cross reaches 2 r
    x0, y0 = max(0, int(x) - 2 * r), max(0, int(y) - 2 * r)
    window = changed[y0:int(y) + 2 * r + 1, x0:int(x) + 2 * r + 1]  # the mark, not a drag's line beyond
    assert window.sum() > 10
    assert abs(x0 + window.sum(0).argmax() - x) <= 1 and abs(y0 + window.sum(1).argmax() - y) <= 1


class LoggingPolicy:
    """Wraps a policy; after each reply, reads the page's event log of the previous step."""

    def __init__(self, policy, browser):
        self.policy, self.browser, self.logs, self.messages = policy, browser, [], []

    def __call__(self, messages):
        self.logs.append(_events(self.browser))  # what the previous action did (empty before the first)
        self.messages.append(messages)
        return self.policy(messages)


def _run(env, browser, policy, task, out, steps):
    from qwen2vl.agent.loop import run_episode

    logged = LoggingPolicy(policy, browser)
    episode = run_episode(env, logged, task, out, max_steps=steps, max_seconds=120)
    logs = logged.logs[1:] + [_events(browser)]
    assert len(logs) == len(episode.steps)
    lines = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert lines == json.loads(json.dumps(episode.steps))
    for step, events in zip(episode.steps, logs):
        assert (out / step["screenshot"]).is_file() and (out / step["drawn"]).is_file()
        _check_step_in_log(step, events)
        _check_drawn_click(out, step)
    assert json.loads((out / "episode.json").read_text())["steps"] == len(episode.steps)
    for k, messages in enumerate(logged.messages):  # the history rule: this screenshot, the previous one halved
        system, user = messages
        assert "# Tools" in system["content"] and '"name": "computer_use"' in system["content"]
        images = [p["image"] for p in user["content"] if p["type"] == "image"]
        assert len(images) == min(k, 1) + 1 and images[-1].endswith(f"step_{k:03d}.png")
        if k:
            assert Image.open(images[0]).size == tuple(v // 2 for v in Image.open(images[1]).size)
            assert f"Previous actions:\n1. {episode.steps[0]['action']['kind'] if episode.steps[0]['action'] else 'format'}" \
                in user["content"][0]["text"]
        assert user["content"][0]["text"].startswith(f"Task: {task}")
    return episode


def test_every_action_kind_lands_in_the_page(page_url, tmp_path):
    from qwen2vl.agent.loop import WebPage

    script = [Action("click", point=(312, 208)),  # the button at (100, 50) px of 320 x 240
              Action("type", text="hi"), Action("key", key="Enter"), Action("double_click", point=(100, 500)),
              Action("scroll", point=(500, 800), direction="up"), Action("drag", point=(100, 800), point2=(900, 800)),
              Action("long_press", point=(50, 800), seconds=0.1), Action("wait", seconds=0.05),
              Action("key", key="NoSuchKey"), Action("answer", text="done")]
    replies = iter([format_call("computer_use", a.call_arguments()) for a in script])
    with _browser(SIZE) as browser:
        env = WebPage(browser, page_url)
        episode = _run(env, browser, lambda messages: next(replies), "Use the page.", tmp_path / "t", 20)
        assert browser.page.evaluate("() => document.getElementById('name').value") == ""  # focus stayed on the button
    assert [s["action"]["kind"] for s in episode.steps] == [a.kind for a in script]
    assert episode.stop_reason == "answer" and episode.answer == "done"
    assert episode.steps[0]["pixels"] == [312.5 * 320 / 1000, 208.5 * 240 / 1000]
    refused = episode.steps[-2]
    assert not refused["executed"] and "key failed in the page" in refused["error"]
    assert all(s["executed"] for s in episode.steps if s is not refused)


def test_embedded_model_on_a_local_page(engine, page_url, tmp_path):
    from qwen2vl.agent.loop import WebPage
    from qwen2vl.agent.policy import EnginePolicy

    with _browser(SIZE) as browser:
        env = WebPage(browser, page_url)
        episode = _run(env, browser, EnginePolicy(engine), "Click the Go button.", tmp_path / "m", 3)
    # the grammar makes every reply an action of the model's own choosing
    assert episode.steps and all(s["action"] is not None for s in episode.steps)


@pytest.mark.parametrize("task", ["click-test", "click-button"])
def test_embedded_model_on_miniwob(engine, task, tmp_path):
    from qwen2vl.agent.miniwob import VIEWPORT, MiniWoB
    from qwen2vl.agent.policy import EnginePolicy

    with _browser(VIEWPORT) as browser:
        env = MiniWoB(browser, task, episode_seconds=60)
        utterance = env.reset(seed=3)
        assert utterance.startswith("Click")
        _run(env, browser, EnginePolicy(engine, actions=["click"]), utterance, tmp_path / task, 2)
        status = env.finish()
        assert set(status) >= {"done", "reward", "raw_reward"}
        # reward and done come from the page: clicking the right element (found in the DOM) succeeds
        env.reset(seed=4)
        target = "#subbtn" if task == "click-test" else None
        if target is None:
            wanted = browser.page.evaluate("() => core.getUtterance()").split('"')[1]
            box = browser.page.evaluate("(t) => { const b = [...document.querySelectorAll('#area button')]"
                                        ".find(b => b.textContent === t).getBoundingClientRect();"
                                        " return [b.left, b.top, b.right, b.bottom]; }", wanted)
        else:
            box = browser.page.evaluate("(s) => { const b = document.querySelector(s).getBoundingClientRect();"
                                        " return [b.left, b.top, b.right, b.bottom]; }", target)
        action = Action("click", point=(int(1000 * (box[0] + box[2]) / 2 / VIEWPORT[0]),
                                        int(1000 * (box[1] + box[3]) / 2 / VIEWPORT[1])))
        env.execute(action, VIEWPORT)
        status = env.status()
        assert status["done"] and status["raw_reward"] == 1 and status["reward"] > 0
        with pytest.raises(ActionError, match="episode had already ended"):  # no click on the START cover
            env.execute(action, VIEWPORT)


def test_agent_cli_miniwob_json(tmp_path, capsys):
    from qwen2vl.agent import cli

    out = tmp_path / "runs"
    assert cli.main(["--miniwob", "click-test", "--episodes", "2", "--seed", "5", "--max-steps", "1",
                     "--actions", "click", "--trajectory-dir", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"task", "episodes", "successes", "success_rate", "random_baseline", "trajectory_dir", "ci95"} <= set(result)
    assert result["task"] == "click-test" and result["episodes"] == 2 and result["trajectory_dir"] == str(out)
    assert 0 <= result["success_rate"] <= 1 and result["ci95"][0] <= result["success_rate"] <= result["ci95"][1]
    assert 0 <= result["random_baseline"]["success_rate"] <= 1
    for policy in ("model", "random"):
        for e in range(2):
            assert (out / policy / f"episode_{e:03d}" / "step_000_action.png").is_file()
            assert (out / policy / f"episode_{e:03d}" / "steps.jsonl").is_file()
    from qwen2vl.cli import UserError

    with pytest.raises(UserError, match="unknown MiniWoB\\+\\+ task 'click-nothing'"):
        cli.main(["--miniwob", "click-nothing", "--trajectory-dir", str(out)])


def test_agent_cli_on_a_page_with_an_openai_compatible_server(engine, page_url, tmp_path, capsys):
    """--base-url: screenshots go to a server as data URLs; its replies are parsed (here: format errors)."""
    from serve_helpers import ServerThread

    from qwen2vl.agent import cli
    from qwen2vl.serve.app import ServeSettings, create_app

    out = tmp_path / "web"
    with ServerThread(create_app(engine, ServeSettings(model_name="nano"))) as server:
        assert cli.main(["--url", page_url, "--task", "Click the Go button.", "--base-url", f"{server.url}/v1",
                         "--max-steps", "2", "--max-new-tokens", "24", "--viewport", "320x240",
                         "--trajectory-dir", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["policy"] == f"openai:{server.url}/v1" and result["steps"] == 2
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert all(s["reply"] is not None and s["size"] == [320, 240] for s in steps)
    assert result["format_errors"] == sum(s["action"] is None for s in steps)
    assert all("error" in s for s in steps if s["action"] is None)
