"""Qwen2-VL configuration: read any config.json layout, write the flat hub layout.

Three layouts exist in the wild:

* flat (the hub's, written by transformers 4.41): text keys at the top level, a
  ``rope_scaling = {"type": "mrope", "mrope_section": [16, 24, 24]}`` dict and a ``vision_config``;
* nested with ``text_config`` holding ``rope_scaling`` (transformers 4.5x);
* nested with ``text_config`` holding ``rope_parameters`` (transformers 5), where ``rope_theta``
  lives inside ``rope_parameters``.

All read into the same :class:`Qwen2VLConfig`; :meth:`Qwen2VLConfig.to_dict` writes the flat
layout, which every version of transformers and vLLM reads.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``"torch.bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class VisionConfig:
    """The ViT encoder and the 2x2 patch merger. ``hidden_size`` is the merger's output width (= LLM width)."""

    depth: int = 32
    embed_dim: int = 1280
    hidden_size: int = 3584
    hidden_act: str = "quick_gelu"
    mlp_ratio: float = 4
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: C * T * P * P (1176 for the released models)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass
class TextConfig:
    """The Qwen2 decoder. Defaults are the transformers class defaults (a 72B-like shape)."""

    vocab_size: int = 152064
    hidden_size: int = 8192
    intermediate_size: int = 29568
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1000000.0
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 80
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# Keys that belong to TextConfig when they appear at the top level of a flat config.json.
_TEXT_KEYS = {f.name for f in dataclasses.fields(TextConfig)}
_VISION_KEYS = {f.name for f in dataclasses.fields(VisionConfig)}
# Keys we understand but do not keep (derived, or bookkeeping of other libraries).
_DROPPED = {"model_type", "architectures", "transformers_version", "layer_types", "use_cache",
            "rope_scaling", "rope_parameters", "text_config", "vision_config", "torch_dtype", "dtype",
            "in_chans", "spatial_patch_size", "_name_or_path"}


@dataclass
class Qwen2VLConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    vision_token_id: int = 151654
    torch_dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown top-level keys, written back unchanged

    @property
    def quantization_config(self) -> dict | None:
        """config.json's ``quantization_config`` (GPTQ / AWQ), kept in ``extra`` and written back unchanged."""
        return self.extra.get("quantization_config")

    # ----------------------------------------------------------------- reading
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Qwen2VLConfig:
        raw = copy.deepcopy(raw)
        if "text_config" in raw and isinstance(raw["text_config"], dict):
            text_raw = dict(raw["text_config"])
            # transformers 5 keeps tie_word_embeddings on the outer config
            if "tie_word_embeddings" in raw and "tie_word_embeddings" not in text_raw:
                text_raw["tie_word_embeddings"] = raw["tie_word_embeddings"]
        else:
            text_raw = {k: v for k, v in raw.items() if k in _TEXT_KEYS or k in ("rope_scaling", "rope_parameters")}
        text_kwargs = {k: v for k, v in text_raw.items() if k in _TEXT_KEYS}
        rope = text_raw.get("rope_parameters") or text_raw.get("rope_scaling") or {}
        if rope.get("mrope_section") is not None:
            text_kwargs["mrope_section"] = list(rope["mrope_section"])
        if "rope_theta" in rope:
            text_kwargs["rope_theta"] = rope["rope_theta"]
        text = TextConfig(**text_kwargs)

        vision_raw = raw.get("vision_config") or {}
        vision_kwargs = {k: v for k, v in vision_raw.items() if k in _VISION_KEYS}
        if "in_chans" in vision_raw and "in_channels" not in vision_raw:
            vision_kwargs["in_channels"] = vision_raw["in_chans"]
        if "hidden_size" not in vision_kwargs:
            vision_kwargs["hidden_size"] = text.hidden_size
        vision = VisionConfig(**vision_kwargs)

        top = {k: raw[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                   "vision_end_token_id", "vision_token_id") if k in raw}
        dtype = raw.get("torch_dtype") or raw.get("dtype") or text_raw.get("torch_dtype") or text_raw.get("dtype")
        extra = {k: v for k, v in raw.items()
                 if k not in _TEXT_KEYS and k not in _DROPPED and k not in top}
        config = cls(text=text, vision=vision, torch_dtype=dtype, extra=extra, **top)
        config.validate()
        return config

    @classmethod
    def from_json_file(cls, path: str | Path) -> Qwen2VLConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(raw)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Qwen2VLConfig:
        """Read ``config.json`` from a checkpoint directory (or the file itself), or a preset name."""
        if isinstance(path, str) and path in PRESETS:
            return preset(path)
        path = Path(path)
        return cls.from_json_file(path / "config.json" if path.is_dir() else path)

    # ----------------------------------------------------------------- writing
    def to_dict(self) -> dict[str, Any]:
        """The flat hub layout (what Qwen ships), readable by transformers 4.x/5.x and vLLM."""
        t = self.text
        out: dict[str, Any] = {
            "architectures": ["Qwen2VLForConditionalGeneration"],
            "model_type": "qwen2_vl",
        }
        text = dataclasses.asdict(t)
        text.pop("mrope_section")
        out.update(text)
        out["rope_scaling"] = {"type": "mrope", "mrope_section": list(t.mrope_section)}
        out.update(image_token_id=self.image_token_id, video_token_id=self.video_token_id,
                   vision_start_token_id=self.vision_start_token_id,
                   vision_end_token_id=self.vision_end_token_id, vision_token_id=self.vision_token_id)
        out["vision_config"] = dataclasses.asdict(self.vision)
        if self.torch_dtype is not None:
            out["torch_dtype"] = self.torch_dtype
        out.update(self.extra)
        return out

    def save(self, directory: str | Path) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    # ----------------------------------------------------------------- checks
    def validate(self) -> None:
        t, v = self.text, self.vision
        problems = []
        if t.hidden_size % t.num_attention_heads:
            problems.append(f"hidden_size {t.hidden_size} is not divisible by num_attention_heads {t.num_attention_heads}")
        elif t.num_attention_heads % t.num_key_value_heads:
            problems.append(f"num_attention_heads {t.num_attention_heads} is not divisible by "
                            f"num_key_value_heads {t.num_key_value_heads}")
        elif sum(t.mrope_section) * 2 != t.head_dim:
            problems.append(f"mrope_section {t.mrope_section} sums to {sum(t.mrope_section)}, "
                            f"expected head_dim/2 = {t.head_dim // 2}")
        if v.embed_dim % v.num_heads:
            problems.append(f"vision embed_dim {v.embed_dim} is not divisible by num_heads {v.num_heads}")
        elif v.head_dim % 4:
            problems.append(f"vision head_dim {v.head_dim} must be divisible by 4 (2-D rotary halves)")
        if v.hidden_size != t.hidden_size:
            problems.append(f"vision_config.hidden_size {v.hidden_size} != text hidden_size {t.hidden_size}")
        if problems:
            raise ValueError("invalid Qwen2-VL config: " + "; ".join(problems))


def _hub_config(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                vocab: int, tied: bool) -> Qwen2VLConfig:
    text = TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      rms_norm_eps=1e-6, tie_word_embeddings=tied, sliding_window=32768,
                      max_window_layers=layers)
    vision = VisionConfig(depth=32, embed_dim=1280, hidden_size=hidden, num_heads=16)
    return Qwen2VLConfig(text=text, vision=vision, torch_dtype="bfloat16")


PRESETS = {
    "qwen2-vl-2b": lambda: _hub_config(1536, 8960, 28, 12, 2, 151936, True),
    "qwen2-vl-7b": lambda: _hub_config(3584, 18944, 28, 28, 4, 152064, False),
    "qwen2-vl-72b": lambda: _hub_config(8192, 29568, 80, 64, 8, 152064, False),
}


def preset(name: str) -> Qwen2VLConfig:
    """Shapes of the released checkpoints: ``qwen2-vl-2b``, ``qwen2-vl-7b``, ``qwen2-vl-72b``."""
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[key]()
