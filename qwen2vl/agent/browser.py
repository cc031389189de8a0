"""A headless Chromium page that executes :class:`~qwen2vl.agent.actions.Action` s, over Playwright's Python API.

Chromium is the system's (Debian's ``chromium``; ``$QWEN2VL_CHROMIUM`` or ``--chromium`` to choose
another), launched through ``executable_path``: Playwright's own browser download is never used.
Each :class:`Browser` has a fresh user-data directory (deleted on close) and these flags::

    --headless --no-sandbox --disable-gpu --disable-background-networking
    --disable-component-update --disable-sync --no-first-run

Actions are in bins of the screenshot; :meth:`Browser.execute` converts them to the page's CSS
pixels (screenshot pixels / device scale) and returns what it did, in screenshot pixels.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile

from PIL import Image

from .actions import Action, ActionError

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
KEY_NAMES = {"enter": "Enter", "return": "Enter", "tab": "Tab", "esc": "Escape", "escape": "Escape",
             "backspace": "Backspace", "delete": "Delete", "del": "Delete", "space": "Space", "up": "ArrowUp",
             "down": "ArrowDown", "left": "ArrowLeft", "right": "ArrowRight", "home": "Home", "end": "End",
             "pageup": "PageUp", "pagedown": "PageDown", "ctrl": "Control", "control": "Control", "alt": "Alt",
             "shift": "Shift", "cmd": "Meta", "meta": "Meta", "win": "Meta"}


def chromium_path(explicit: str | None = None) -> str:
    """The Chromium binary: ``explicit``, ``$QWEN2VL_CHROMIUM``, or ``chromium`` / ``chromium-browser`` on PATH."""
    path = explicit or os.environ.get("QWEN2VL_CHROMIUM") or shutil.which("chromium") or shutil.which(
        "chromium-browser")
    if not path or not os.path.exists(path):
        raise FileNotFoundError("no Chromium found: install Debian's chromium (scripts/ci-system-deps.sh) or set "
                                "QWEN2VL_CHROMIUM to the binary")
    return path


def playwright_key(key: str) -> str:
    """``"ctrl+a"`` -> ``"Control+a"``; single characters and Playwright names pass through."""
    parts = [p.strip() for p in key.split("+")] if key != "+" else ["+"]
    if not all(parts):
        raise ValueError(f"key {key!r}: empty key name")
    return "+".join(KEY_NAMES.get(p.lower(), p) if len(p) > 1 else p for p in parts)


class Browser:
    """One page of a headless Chromium; ``init_script`` runs in every document before its own scripts."""

    def __init__(self, viewport: tuple[int, int] = (1280, 800), scale: float = 1.0, chromium: str | None = None,
                 init_script: str | None = None):
        from playwright.sync_api import sync_playwright

        self.viewport, self.scale = (int(viewport[0]), int(viewport[1])), float(scale)
        self.profile = tempfile.mkdtemp(prefix="qwen2vl-chromium-")
        self._playwright = sync_playwright().start()
        try:
            self.context = self._playwright.chromium.launch_persistent_context(
                self.profile, executable_path=chromium_path(chromium), args=CHROMIUM_FLAGS, headless=True,
                viewport={"width": self.viewport[0], "height": self.viewport[1]}, device_scale_factor=self.scale)
            if init_script:
                self.context.add_init_script(init_script)
            self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
        except BaseException:
            self.close()
            raise

    def goto(self, url: str) -> None:
        self.page.goto(url, wait_until="load")

    def screenshot(self) -> Image.Image:
        """The viewport as RGB, ``viewport * scale`` pixels."""
        return Image.open(io.BytesIO(self.page.screenshot(type="png"))).convert("RGB")

    def _css(self, point: tuple[float, float]) -> tuple[float, float]:
        return point[0] / self.scale, point[1] / self.scale

    def execute(self, action: Action, size: tuple[int, int]) -> dict:
        """Do ``action`` on a screenshot of ``size`` (width, height); returns the pixels it used.

        What the page refuses (an unknown key name, say) is an :class:`ActionError`.
        """
        from playwright.sync_api import Error

        try:
            return self._execute(action, size)
        except (Error, ValueError) as e:
            raise ActionError(f"{action.kind} failed in the page: {str(e).splitlines()[0][:200]}") from None

    def _execute(self, action: Action, size: tuple[int, int]) -> dict:
        mouse, done = self.page.mouse, {}
        if action.point is not None:
            x, y = action.pixels(size)
            done["pixels"] = [x, y]
            cx, cy = self._css((x, y))
        if action.kind == "click":
            mouse.click(cx, cy)
        elif action.kind == "double_click":
            mouse.dblclick(cx, cy)
        elif action.kind == "long_press":
            mouse.move(cx, cy)
            mouse.down()
            self.page.wait_for_timeout(1000 * action.seconds)
            mouse.up()
        elif action.kind == "type":
            self.page.keyboard.type(action.text)
        elif action.kind == "key":
            self.page.keyboard.press(playwright_key(action.key))
        elif action.kind == "scroll":
            mouse.move(cx, cy)
            dx = {"left": -1, "right": 1}.get(action.direction, 0) * self.viewport[0] / 2
            dy = {"up": -1, "down": 1}.get(action.direction, 0) * self.viewport[1] / 2
            mouse.wheel(dx, dy)
        elif action.kind == "drag":
            x2, y2 = action.pixels(size, second=True)
            done["pixels2"] = [x2, y2]
            mouse.move(cx, cy)
            mouse.down()
            mouse.move(*self._css((x2, y2)), steps=8)
            mouse.up()
        elif action.kind == "wait":
            self.page.wait_for_timeout(1000 * action.seconds)
        return done  # answer / terminate: nothing to do in the page

    def close(self) -> None:
        context = getattr(self, "context", None)
        try:
            if context is not None:
                context.close()
        finally:
            self._playwright.stop()
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
