"""Fixtures for training tests: a tiny model directory (tokenizer + config) and small multimodal JSONL sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from oracle import tiny_config
from PIL import Image
from processing_helpers import build_model_dir

from qwen2vl.processing.tokenizer import Tokenizer

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (230, 220, 40),
          "black": (10, 10, 10), "white": (245, 245, 245)}


def tiny_model_config(tokenizer_dir: str | Path, **text) -> dict:
    """A tiny config.json dict whose vocabulary and vision ids fit the tokenizer in ``tokenizer_dir``."""
    tok = Tokenizer.from_pretrained(str(tokenizer_dir))
    cfg = tiny_config(**text)
    cfg.update(vocab_size=-(-len(tok) // 16) * 16, image_token_id=tok.image_pad_id, video_token_id=tok.video_pad_id,
               vision_start_token_id=tok.vision_start_id, vision_end_token_id=tok.vision_end_id,
               vision_token_id=tok.vision_pad_id, bos_token_id=tok.endoftext_id, eos_token_id=tok.im_end_id)
    return cfg


def make_tokenizer_dir(directory: Path) -> Path:
    build_model_dir(str(directory), vocab_size=300)
    return directory


def make_config_file(tokenizer_dir: Path, path: Path, **text) -> Path:
    path.write_text(json.dumps(tiny_model_config(tokenizer_dir, **text)))
    return path


def save_image(path: Path, rgb, size=(56, 56), seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(rgb)[None, None] + rng.integers(-8, 9, (size[1], size[0], 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path.name


def make_color_data(directory: Path, name: str = "data.jsonl", repeats: int = 1, sharegpt: bool = False) -> Path:
    """Records 'what color is this?' -> the colour name, one per colour (x ``repeats``), images beside the file."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in range(repeats):
        for i, (color, rgb) in enumerate(COLORS.items()):
            image = save_image(directory / f"{color}-{r}.png", rgb, seed=10 * r + i)
            if sharegpt:
                lines.append({"images": [image], "conversations": [
                    {"from": "human", "value": "<image>What color is this?"}, {"from": "gpt", "value": color}]})
            else:
                lines.append({"messages": [
                    {"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": "What color is this?"}]},
                    {"role": "assistant", "content": color}]})
    path = directory / name
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def train_args(tmp: Path, data: Path, out: Path, **options) -> list[str]:
    """Command-line arguments for a tiny from-scratch run (``options`` override the defaults)."""
    tok = tmp / "tok"
    if not (tok / "tokenizer.json").is_file():
        make_tokenizer_dir(tok)
    config = tmp / "tiny-config.json"
    if not config.is_file():
        make_config_file(tok, config)
    base = {"model_config": config, "tokenizer": tok, "data": data, "output_dir": out, "seq_len": 128,
            "batch_size": 2, "max_steps": 4, "lr": 1e-3, "progress": False, "seed": 0}
    base.update(options)
    args = []
    for key, value in base.items():
        args += [f"--{key}", str(value)]
    return args
