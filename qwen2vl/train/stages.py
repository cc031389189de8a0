"""What trains: the paper's three stages, explicit freeze flags, LoRA parts, per-part learning rates.

Every parameter belongs to one part, by name:

* ``vision``: ``visual.*`` except the merger (patch embedding and ViT blocks);
* ``merger``: ``visual.merger.*`` (the vision -> LLM projector);
* ``llm``: ``model.*`` and ``lm_head.*`` (embeddings, decoder, final norm, head).

Stage 1 trains vision + merger (LLM frozen), stage 2 everything, stage 3 LLM + merger (vision
frozen). ``freeze_<part>: true/false`` overrides the stage. A part that carries LoRA adapters trains
only its adapters; its base weights stay frozen.
"""

from __future__ import annotations

from torch import nn

from .options import OptionError, TrainOptions

PARTS = ("vision", "merger", "llm")
STAGE_PARTS = {1: {"vision", "merger"}, 2: {"vision", "merger", "llm"}, 3: {"merger", "llm"}}


def part_of(name: str) -> str:
    """``visual.merger.mlp.0.weight`` -> merger; ``visual.blocks.3.attn.qkv.weight`` -> vision; else llm.

    A wrapper prefix (``net.``) is ignored.
    """
    name = name.removeprefix("net.")
    if name.startswith("visual.merger."):
        return "merger"
    if name.startswith("visual."):
        return "vision"
    if name.startswith(("model.", "lm_head.")):
        return "llm"
    raise ValueError(f"parameter {name!r} belongs to no part (vision, merger, llm)")


def is_lora(name: str) -> bool:
    return ".lora_" in name


def trainable_parts(opts: TrainOptions) -> set[str]:
    parts = set(STAGE_PARTS[opts.stage])
    for part in PARTS:
        frozen = getattr(opts, f"freeze_{part}")
        if frozen is True:
            parts.discard(part)
        elif frozen is False:
            parts.add(part)
    if not parts:
        raise OptionError(f"nothing to train: stage {opts.stage} with the freeze flags leaves every part frozen")
    return parts


def lora_parts(opts: TrainOptions) -> set[str]:
    """Parts that get LoRA adapters; each must be trainable."""
    if not opts.lora.enabled:
        return set()
    parts = {p for p, on in (("llm", opts.lora.llm), ("vision", opts.lora.vision)) if on}
    frozen = parts - trainable_parts(opts)
    if frozen:
        raise OptionError(f"LoRA on {', '.join(sorted(frozen))} needs it trainable, but stage {opts.stage} "
                          "(with the freeze flags) freezes it")
    return parts


def apply_freezing(model: nn.Module, trainable: set[str], adapted: set[str]) -> None:
    """Set ``requires_grad``: parts in ``trainable`` train, except base weights of ``adapted`` parts."""
    for name, p in model.named_parameters():
        part = part_of(name)
        if is_lora(name):
            p.requires_grad_(part in adapted)
        else:
            p.requires_grad_(part in trainable and part not in adapted)


def learning_rates(opts: TrainOptions) -> dict[str, float]:
    return {part: (getattr(opts, f"lr_{part}") if getattr(opts, f"lr_{part}") is not None else opts.lr)
            for part in PARTS}


def param_groups(model: nn.Module, lrs: dict[str, float], weight_decay: float) -> list[dict]:
    """AdamW groups per (part, decay): weight decay on matrices only, not on biases or norms.

    Each group records its ``part`` and ``base_lr`` (the schedule scales ``base_lr`` every step).
    """
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((part_of(name), p.ndim >= 2), []).append(p)
    return [{"params": params, "part": part, "base_lr": lrs[part], "lr": lrs[part],
             "weight_decay": weight_decay if decay else 0.0}
            for (part, decay), params in sorted(groups.items())]
