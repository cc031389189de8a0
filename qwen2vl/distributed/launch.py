"""Processes for tensor-parallel inference: torchrun's environment, the device mesh, sharded loading.

Under ``torchrun --nproc-per-node N`` each process reads RANK / WORLD_SIZE / LOCAL_RANK;
``init_device_mesh`` joins the default process group (NCCL on GPUs, gloo on the CPU). Every rank
then runs the same engine calls on the same inputs, so they issue the same collectives in the same
order; anything random is drawn on rank 0 and broadcast (:func:`shared_seed`).
"""

from __future__ import annotations

import atexit
import os
import random
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..checkpoint import load_pretrained, resolve_checkpoint
from ..config import Qwen2VLConfig
from ..model import Qwen2VL
from .layout import TensorParallelLayout
from .parallel import parallelize


def init_tensor_parallel(size: int, device: str | None = None) -> tuple[DeviceMesh, torch.device]:
    """Join the process group of ``size`` ranks started by torchrun; -> (1-D mesh, this rank's device).

    ``device`` "cpu" uses gloo even where GPUs exist; "cuda" (the default where GPUs exist) gives
    each rank GPU ``LOCAL_RANK`` and NCCL (a device index in ``device`` is not used).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if size < 1 or world != size:
        raise ValueError(f"--tensor-parallel {size} needs {size} processes started by torchrun "
                         f"(torchrun --nproc-per-node {size} -m qwen2vl ...); this process sees WORLD_SIZE={world}")
    cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    if cuda:
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(local)
    else:
        local = torch.device("cpu")
    fresh = not dist.is_initialized()
    mesh = init_device_mesh(local.type, (world,), mesh_dim_names=("tp",))
    if fresh:
        atexit.register(close)
    return mesh, local


def close() -> None:
    """Leave the process group once every rank is done (destroying it under a peer's running
    collective can abort the process)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def shared_seed(seed: int | None) -> int | None:
    """``seed`` as given, or (None) one drawn on rank 0 and broadcast, so every rank samples alike."""
    if seed is not None or not dist.is_initialized():
        return seed
    box = [random.randrange(2**63) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def load_tensor_parallel(path: str | Path, mesh: DeviceMesh, dtype=None, device=None, fuse: bool | None = None,
                         progress: bool | None = None) -> Qwen2VL:
    """This rank's shard of the checkpoint at ``path``, read straight from the safetensors slices.

    ``fuse`` (default: on CUDA) joins q/k/v and gate/up, as ``Engine.from_pretrained`` does.
    """
    directory = resolve_checkpoint(path)
    config = Qwen2VLConfig.from_pretrained(directory)
    layout = TensorParallelLayout.for_config(config, mesh.get_local_rank(), mesh.size())
    model = load_pretrained(Qwen2VL, directory, dtype=dtype, device=device, progress=progress, shard=layout)
    fuse = torch.device(device or "cpu").type == "cuda" if fuse is None else fuse
    return parallelize(model, layout, mesh, fuse=fuse)
