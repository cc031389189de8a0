"""The embedded qwen2vl-nano checkpoint: transformers 4.57.1 loads it and answers as we do, it is the
default model of `qwen2vl generate`, `--draw` draws its boxes, and the README's first command
prints what the README shows."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from qwen2vl import Engine
from qwen2vl.agent.grounding import parse_regions
from qwen2vl.generation import cli as generate_cli
from qwen2vl.generation.cli import EMBEDDED_MODEL

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "examples" / "shapes.png"
RECEIPT = ROOT / "examples" / "receipt.png"
GROUNDING_PROMPT = "Find the green hexagon and give its box."


def conversation(image: Path, prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": prompt}]}]


def qwen2vl(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen2vl", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained(EMBEDDED_MODEL, dtype="float32", device="cpu")


def test_embedded_checkpoint_is_complete_and_small():
    names = {p.name for p in EMBEDDED_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "generation_config.json", "README.md"} <= names
    assert sum(p.stat().st_size for p in EMBEDDED_MODEL.rglob("*") if p.is_file()) <= 25 * 2**20


@pytest.mark.hf
@pytest.mark.parametrize("image, prompt", [(SHAPES, GROUNDING_PROMPT), (RECEIPT, "What is the total?")])
def test_transformers_gives_the_same_greedy_answer(engine, image, prompt):
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    # Qwen2VLProcessor needs torchvision for its video half: compose it from the directory's parts
    hf = Qwen2VLForConditionalGeneration.from_pretrained(EMBEDDED_MODEL, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    image_processor = Qwen2VLImageProcessor.from_pretrained(EMBEDDED_MODEL)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    pixels = image_processor(images=[Image.open(image).convert("RGB")], return_tensors="pt")
    tokens = int(pixels["image_grid_thw"].prod()) // 4
    inputs = tokenizer([text.replace("<|image_pad|>", "<|image_pad|>" * tokens)], return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, **pixels, max_new_tokens=40, do_sample=False)
    theirs = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=False)
    ours = engine.generate(conversation(image, prompt), max_new_tokens=40, temperature=0.0)[0]
    assert theirs.removesuffix("<|im_end|>") == ours.text


def test_generate_without_model_uses_the_embedded_checkpoint(engine, monkeypatch, capsys):
    loaded = []
    real = Engine.from_pretrained.__func__

    def spy(cls, path, *args, **kwargs):
        loaded.append(Path(path))
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(Engine, "from_pretrained", classmethod(spy))
    assert generate_cli.main(["--image", str(SHAPES), "--prompt", GROUNDING_PROMPT]) == 0
    assert loaded == [EMBEDDED_MODEL]
    expected = engine.generate(conversation(SHAPES, GROUNDING_PROMPT), temperature=0.0)[0].text
    assert capsys.readouterr().out == expected + "\n"


def test_draw_writes_the_boxes_on_the_image(engine, tmp_path, capsys):
    out = tmp_path / "drawn.png"
    assert generate_cli.main(["--image", str(SHAPES), "--prompt", GROUNDING_PROMPT, "--draw", str(out)]) == 0
    answer = capsys.readouterr().out.strip()
    assert len(parse_regions(answer)) == 1
    with Image.open(SHAPES) as original, Image.open(out) as drawn:
        assert drawn.size == original.size
        assert drawn.convert("RGB").tobytes() != original.convert("RGB").tobytes()


def readme_first_command() -> tuple[list[str], str]:
    """(the `qwen2vl generate` arguments of the README's first command, the output the README shows)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)
    command = blocks[0][1].strip()
    assert blocks[0][0] == "bash" and command.startswith("pip install") and "qwen2vl generate" in command
    generate = shlex.split(command[command.index("qwen2vl generate"):])
    assert blocks[1][0] == "text", "the README shows the first command's output right after it"
    return generate[1:], blocks[1][1]


def test_readme_first_command_prints_what_the_readme_shows():
    args, shown = readme_first_command()
    assert "--model" not in args
    out = qwen2vl(*args)
    assert out.returncode == 0, out.stderr
    assert out.stdout == shown
