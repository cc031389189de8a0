"""Export: the trained model as a plain Hugging Face checkpoint directory (LoRA merged).

``final/`` gets ``config.json`` + safetensors in the released key layout, and the tokenizer,
chat-template, preprocessor and generation files of the source checkpoint (or tokenizer
directory), so ``Qwen2VL.from_pretrained``, transformers and vLLM load it as they load Qwen's own.
Its ``preprocessor_config.json`` carries the image pixel bounds the training processor used, so the
exported model sizes images as it saw them in training.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from ..config import Qwen2VLConfig, parse_dtype
from ..model.qwen2vl import Qwen2VL
from .distributed import Dist
from .lora import add_lora

SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
              "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
              "video_preprocessor_config.json", "generation_config.json")

# Qwen2-VL's image processor settings, the base when the source directory has none (pixel bounds
# are always the training processor's).
DEFAULT_PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
    "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
    "rescale_factor": 1 / 255,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
}


def full_state_dict(loss_model: nn.Module, d: Dist) -> dict[str, torch.Tensor] | None:
    """Collective: a copy of the unsharded weights on process 0 (CPU, ``net.`` prefix removed); None elsewhere.

    Never the live tensors (FSDP gathers fresh ones; one process copies): merging LoRA works in place.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(loss_model, options=options)
    if not d.main:
        return None
    return {k.removeprefix("net."): v.detach().to("cpu", copy=not d.sharded) for k, v in state.items()}


def plain_model(state: dict[str, torch.Tensor], config: Qwen2VLConfig, lora_config=None) -> Qwen2VL:
    """A :class:`Qwen2VL` holding ``state`` (a training state dict, with LoRA pieces if ``lora_config``)."""
    with torch.device("meta"):
        model = Qwen2VL(config)
    wrapper = add_lora(model, lora_config, low_cpu_mem_usage=True) if lora_config is not None else None
    if config.text.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.text.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"training state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if wrapper is not None:
        model = wrapper.merge_and_unload()
    model.tie_weights()
    return model.eval()


def preprocessor_settings(base: dict, min_pixels: int, max_pixels: int) -> dict:
    """``base`` (a preprocessor_config.json) with its image pixel bounds set to (min_pixels, max_pixels).

    Both spellings are written (``min_pixels``/``max_pixels`` and ``size``), as transformers reads either.
    """
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"pixel bounds must be 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
    out = dict(base)
    out["min_pixels"], out["max_pixels"] = int(min_pixels), int(max_pixels)
    out["size"] = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}
    return out


def export_checkpoint(state: dict[str, torch.Tensor], config: Qwen2VLConfig, out_dir: str | Path,
                      source_dir: str | Path | None, pixels: tuple[int, int],
                      dtype: str | torch.dtype | None = None, lora_config=None) -> Path:
    """Write ``out_dir`` (replacing it) as a plain HF checkpoint; side files come from ``source_dir``.

    ``pixels``: the (min_pixels, max_pixels) the training processor resized images with.
    """
    out = Path(out_dir)
    model = plain_model(state, config, lora_config)
    if dtype is not None:
        model.to(parse_dtype(dtype))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if source_dir is not None:
        for name in SIDE_FILES:
            src = Path(source_dir) / name
            if src.is_file():
                shutil.copyfile(src, tmp / name)
    preprocessor = tmp / "preprocessor_config.json"
    base = json.loads(preprocessor.read_text()) if preprocessor.is_file() else DEFAULT_PREPROCESSOR
    preprocessor.write_text(json.dumps(preprocessor_settings(base, *pixels), indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
