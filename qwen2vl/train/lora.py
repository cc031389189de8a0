"""LoRA through peft: adapters on chosen linear layers, merged back into plain weights at export.

Adapters are injected in place, so the model keeps its own class and parameter names gain only the
adapter pieces (``model.layers.0.self_attn.q_proj.base_layer.weight``, ``...q_proj.lora_A.default.weight``).
Merging gives ``W + (alpha / r) * B @ A`` in each adapted layer and a plain :class:`Qwen2VL` whose
checkpoint any Qwen2-VL loader reads.
"""

from __future__ import annotations

import torch
from torch import nn

from .options import LLM_LORA_TARGETS, VISION_LORA_TARGETS, LoraOptions, OptionError
from .stages import part_of


def target_names(model: nn.Module, opts: LoraOptions) -> list[str]:
    """Full names of the linear layers that get adapters.

    >>> # llm=True: model.layers.0.self_attn.q_proj, ..., model.layers.1.mlp.down_proj
    """
    wanted = {"llm": opts.llm, "vision": opts.vision}
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name == "lm_head":
            continue
        part = part_of(name + ".weight")
        if not wanted.get(part, False):
            continue
        suffixes = opts.target_modules or (LLM_LORA_TARGETS if part == "llm" else VISION_LORA_TARGETS)
        if any(name == s or name.endswith("." + s) for s in suffixes):
            names.append(name)
    if not names:
        raise OptionError(f"LoRA target_modules {opts.target_modules} match no linear layer of the "
                          f"{' and '.join(p for p, on in wanted.items() if on)} part(s)")
    return names


def lora_config(model: nn.Module, opts: LoraOptions):
    from peft import LoraConfig
    return LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout,
                      target_modules=target_names(model, opts))


def add_lora(model: nn.Module, config, seed: int | None = None, low_cpu_mem_usage: bool = False):
    """Inject adapters into ``model`` in place (seeded: every process must start identical).

    Returns the peft wrapper, whose ``merge_and_unload()`` gives back the plain model.
    """
    from peft import get_peft_model
    if seed is not None:
        torch.manual_seed(seed)
    return get_peft_model(model, config, low_cpu_mem_usage=low_cpu_mem_usage)
