"""The web chat page in headless Chromium: attach an image, send, watch the answer stream in and its box drawn.

A random tiny model never writes a box, so the server runs a scripted engine: the real tiny model
does the prefill and every decode step, and a constraint allows only the next token of a script (an
answer with a grounded box, in Qwen2-VL's syntax). Everything else is the real server and page.
"""

import shutil
import time
from pathlib import Path

import pytest
import torch
from engine_helpers import build_checkpoint, write_image
from serve_helpers import ServerThread

from qwen2vl.generation.engine import Engine
from qwen2vl.serve.app import ServeSettings, create_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ANSWER = "The cat sits here: <|object_ref_start|>cat<|object_ref_end|><|box_start|>(100,200),(500,600)<|box_end|>"
SHOWN = "The cat sits here: cat [(100,200),(500,600)]"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="no chromium binary (apt-get install chromium; scripts/ci-system-deps.sh)")


class Script:
    """A constraint that allows exactly the next token of a script (a stream visible one chunk at a time)."""

    def __init__(self, tokens: list[int]):
        self.tokens, self.at = tokens, 0

    def allowed(self, vocab: int) -> torch.Tensor:
        mask = torch.zeros(vocab, dtype=torch.bool)
        mask[self.tokens[min(self.at, len(self.tokens) - 1)]] = True
        return mask

    def advance(self, token: int) -> None:
        self.at += 1
        time.sleep(0.01)

    def finished(self) -> bool:
        return False


class ScriptedEngine(Engine):
    """The tiny model's steps, with every request's tokens forced to spell ``ANSWER`` then ``<|im_end|>``."""

    def script(self, script: list[int]) -> None:
        self.tokens, self.saw_image = script, False

    def sampling_params(self, **overrides):
        return super().sampling_params(**{**overrides, "constraint": Script(self.tokens)})

    def prompts(self, batches):
        self.saw_image = self.saw_image or any(b.get("image_grid_thw") is not None for b in batches)
        return super().prompts(batches)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    build_checkpoint(root / "model")
    write_image(root / "cat.png", (160, 120), seed=3)
    engine = ScriptedEngine.from_pretrained(root / "model")
    engine.script(engine.tokenizer.encode(ANSWER) + [engine.tokenizer.im_end_id])
    with ServerThread(create_app(engine, ServeSettings(model_name="tiny"))) as server:
        yield server, engine, root / "cat.png"


def test_attach_send_stream_and_draw_the_box(served):
    playwright = pytest.importorskip("playwright.sync_api")
    server, engine, image = served
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            page.goto(server.url)
            page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#attachments img")
            page.fill("#prompt", "Where is the cat?")
            page.click("#send")
            page.wait_for_selector(".message.assistant[data-done='true']", timeout=60_000)

            assert page.inner_text(".message.user").strip() == "Where is the cat?"
            assert page.locator(".message.user .thumbs img").count() == 1
            assistant = page.locator(".message.assistant")
            assert assistant.locator(".answer").inner_text() == SHOWN
            assert assistant.get_attribute("data-raw") == ANSWER
            assert int(assistant.get_attribute("data-chunks")) > 5  # the answer arrived in pieces
            assert assistant.locator(".error").count() == 0
            assert "answer tokens" in assistant.locator(".usage").inner_text()

            box = assistant.locator("figure.grounding .box")
            assert box.count() == 1
            assert box.get_attribute("data-coords") == "100,200,500,600"
            assert box.locator(".box-label").inner_text() == "cat"
            picture = assistant.locator("figure.grounding img").bounding_box()
            drawn = box.bounding_box()
            assert picture["width"] > 100
            for got, want in [(drawn["x"] - picture["x"], 0.1 * picture["width"]),
                              (drawn["y"] - picture["y"], 0.2 * picture["height"]),
                              (drawn["width"], 0.4 * picture["width"]),
                              (drawn["height"], 0.4 * picture["height"])]:
                assert abs(got - want) <= 3
        finally:
            browser.close()
    assert engine.saw_image  # the page sent the attached image to the model
