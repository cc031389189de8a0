"""Processes and sharding: torchrun's environment, FSDP2 on each ViT block and decoder layer, then the root.

Under ``torchrun --nproc_per_node N`` (or its multi-node flags) every process reads RANK,
WORLD_SIZE and LOCAL_RANK; GPUs use NCCL, CPUs gloo. A single process runs without a process group.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1


def init_distributed() -> Dist:
    """Join the process group when launched by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return Dist(rank, world, local, device)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(loss_model: nn.Module) -> None:
    """FSDP2: ``fully_shard`` each vision block and decoder layer, then the root (the loss wrapper)."""
    from torch.distributed.fsdp import fully_shard
    net = loss_model.net
    for block in net.visual.blocks:
        fully_shard(block)
    for layer in net.model.layers:
        fully_shard(layer)
    fully_shard(loss_model)


def barrier(d: Dist) -> None:
    if d.sharded:
        dist.barrier()


def all_sum(d: Dist, values: list[float]) -> list[float]:
    """Element-wise sum over processes (float64 on the CPU, exact for counts)."""
    if not d.sharded:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(d: Dist, obj: Any) -> list[Any]:
    if not d.sharded:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(d: Dist, obj: Any) -> Any:
    if not d.sharded:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
