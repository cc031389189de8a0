"""A complete tiny checkpoint directory (tokenizer, configs, random weights) and media files for engine tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from oracle import hf_model
from PIL import Image
from processing_helpers import build_model_dir, make_video
from train_helpers import tiny_model_config

from qwen2vl.processing.tokenizer import Tokenizer


def build_checkpoint(directory: Path, seed: int = 1, std: float = 0.02) -> Path:
    """tokenizer.json + configs + a random transformers model saved in the released layout."""
    build_model_dir(str(directory), preprocessor={"min_pixels": 3136, "max_pixels": 56 * 56 * 4,
                                                  "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2})
    tok = Tokenizer.from_pretrained(str(directory))
    hf_model(tiny_model_config(directory), seed=seed, std=std).save_pretrained(directory)
    # transformers writes its own generation_config.json; ours follows the released models' form
    (directory / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [tok.im_end_id, tok.endoftext_id], "pad_token_id": tok.endoftext_id, "do_sample": False}))
    return directory


def write_image(path: Path, size=(90, 70), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def write_video(path: Path, frames: int = 8) -> Path:
    make_video(str(path), "mpeg4", frames, fps=4, width=84, height=56)
    return path
