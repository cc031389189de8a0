"""AdamW, the warmup + cosine schedule, and gradient clipping that works on FSDP2-sharded gradients.

The schedule is a pure function of the optimizer step, so resuming needs only the step number.
"""

from __future__ import annotations

import math

import torch

from .options import TrainOptions


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based).

    Linear warmup to 1 over ``warmup`` steps, then a cosine from 1 down to ``min_ratio`` at ``total``.
    Example with warmup 2, total 6, min_ratio 0: steps 0..5 -> 0.5, 1.0, 1.0, 0.75, 0.25, 0.0.
    """
    if step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup - 1, 1)
    progress = min((step - warmup) / span, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(groups: list[dict], opts: TrainOptions, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups, lr=opts.lr, betas=(opts.adam_beta1, opts.adam_beta2), eps=opts.adam_eps,
                             foreach=device.type == "cuda" or None)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


@torch.no_grad()
def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Global L2 norm of the gradients (over all shards); scales them down to ``max_norm`` if above.

    ``max_norm <= 0`` only measures. FSDP2 gradients are DTensors sharded over the processes: their
    local shards partition each gradient, so one all-reduce of the local sums of squares gives the norm.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    sharded = [hasattr(g, "to_local") for g in grads]
    local = [g.to_local() if s else g for g, s in zip(grads, sharded)]
    squares = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) ** 2 for g in local]).sum()
    if any(sharded):
        import torch.distributed as dist
        dist.all_reduce(squares)
    total = float(squares.sqrt())
    if max_norm > 0 and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g in local:
            g.mul_(scale)
    return total
