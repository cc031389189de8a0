"""Test fixtures for qwen2vl.processing: a tiny Qwen2-style tokenizer, the Jinja template, media makers,
and a stand-in ``torchvision`` so qwen-vl-utils 0.0.14 (the video oracle) can be imported."""

from __future__ import annotations

import importlib.machinery
import json
import os
import sys
import types
from enum import Enum

import numpy as np
import pytest
import torch
import torch.nn.functional as F

# Qwen2 pre-tokenizer split (spec section 2).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
            "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

# The Qwen2-VL Instruct chat template (spec 3.1), written as Jinja for transformers' apply_chat_template.
QWEN2VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "You are a helpful assistant.", "Describe this image in detail.", "What is happening in the video?",
    "The quick brown fox jumps over the lazy dog. It's 3:45 pm and we'll leave at 10.",
    "def main():\n    return {'a': 1, \"b\": [2, 3]}\n\n", "user assistant system\n\n  tabs\tand  spaces",
    "这是一只猫。图片里有什么？视频中的人在做什么？", "Emoji: 🐱🎉👍🏽 café naïve résumé Ünïcödé",
    "Box (12,34),(560,780) and the red car. Picture 1: Video 2:", "日本語のテキスト、한국어 텍스트, русский текст.",
]


def build_model_dir(directory: str, preprocessor: dict | None = None, vocab_size: int = 700) -> str:
    """Write tokenizer.json, tokenizer_config.json (with the Jinja template) and preprocessor_config.json."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.add_special_tokens(SPECIALS)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in SPECIALS}
    config = {"tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "bos_token": None,
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
              "clean_up_tokenization_spaces": False, "errors": "replace", "model_max_length": 32768,
              "split_special_tokens": False, "chat_template": QWEN2VL_TEMPLATE}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    if preprocessor is not None:
        with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
            json.dump(preprocessor, f)
    return directory


_SHARED: dict[str, str] = {}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """One tokenizer/config directory for the whole test session (import this fixture into a test module)."""
    if "dir" not in _SHARED:
        _SHARED["dir"] = build_model_dir(str(tmp_path_factory.mktemp("qwen2vl_processing")))
    return _SHARED["dir"]


# ------------------------------------------------------------------ torchvision stand-in

def _standin_resize(video: torch.Tensor, size, interpolation=None, antialias=True) -> torch.Tensor:
    """torchvision.transforms.functional.resize for uint8 tensors, bicubic (its tensor path)."""
    if list(video.shape[-2:]) == list(size):
        return video
    out = F.interpolate(video.float(), size=list(size), mode="bicubic", align_corners=False, antialias=antialias)
    return out.clamp(0, 255).round().to(video.dtype)


def _standin_read_video(path, start_pts=0.0, end_pts=None, pts_unit="sec", output_format="TCHW"):
    """torchvision.io.read_video: decode every frame with PyAV, RGB, stacked (no seeking tricks)."""
    import av

    path = path[7:] if path.startswith("file://") else path
    with av.open(path) as container:
        stream = container.streams.video[0]
        frames = [f.to_rgb().to_ndarray() for f in container.decode(stream)
                  if end_pts is None or f.time is None or f.time <= end_pts]
        fps = float(stream.average_rate)
    video = torch.from_numpy(np.stack(frames))
    return (video.permute(0, 3, 1, 2) if output_format == "TCHW" else video), torch.empty(0), {"video_fps": fps}


def _standin_modules() -> dict[str, types.ModuleType]:
    class InterpolationMode(Enum):
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"

    modules = {name: types.ModuleType(name) for name in
               ("torchvision", "torchvision.io", "torchvision.transforms", "torchvision.transforms.functional")}
    for name, module in modules.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    tv, tv_io = modules["torchvision"], modules["torchvision.io"]
    transforms, functional = modules["torchvision.transforms"], modules["torchvision.transforms.functional"]
    tv.__version__ = "0.21.0"
    tv_io.read_video = _standin_read_video
    functional.resize = _standin_resize
    transforms.functional, transforms.InterpolationMode = functional, InterpolationMode
    tv.io, tv.transforms = tv_io, transforms
    return modules


def qwen_vl_utils():
    """qwen_vl_utils.vision_process (0.0.14), imported over a stand-in ``torchvision`` and reading
    videos with its torchvision reader. The stand-in leaves sys.modules right after the import, so
    transformers (which probes for torchvision) still sees none and keeps its PIL path."""
    module = sys.modules.get("qwen_vl_utils.vision_process")
    if module is None:
        standin = _standin_modules()
        assert not any(name in sys.modules for name in standin), "a real torchvision is imported"
        sys.modules.update(standin)
        try:
            from qwen_vl_utils import vision_process as module
        finally:
            for name in standin:
                sys.modules.pop(name, None)
    module.FORCE_QWENVL_VIDEO_READER = "torchvision"
    module.get_video_reader_backend.cache_clear()
    return module


# ----------------------------------------------------------------------------- media

def frame_pattern(i: int, height: int, width: int) -> np.ndarray:
    """A smooth, frame-dependent RGB test pattern (compresses well, identifiable after lossy coding)."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = (i * 4) % 256
    img[..., 1] = (x * 255 // max(1, width - 1))
    img[..., 2] = ((y + 3 * i) * 255 // max(1, height - 1 + 3 * i)) % 256
    return img


def make_video(path: str, codec: str, n: int, fps: int = 30, width: int = 96, height: int = 64,
               options: dict | None = None) -> str:
    """Encode ``n`` frames of ``frame_pattern`` with PyAV."""
    import av

    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 4_000_000
        if options:
            stream.options = options
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(frame_pattern(i, height, width), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
