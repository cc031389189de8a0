"""Turn a model holding one rank's weight slices into a tensor-parallel model (DTensor).

The slices become DTensors on a 1-D device mesh and ``parallelize_module`` installs PyTorch's
parallel styles, which convert activations at module boundaries:

* column-parallel (``q/k/v_proj`` or the fused ``qkv_proj``, ``gate/up_proj`` or ``gate_up_proj``;
  the ViT's ``attn.qkv`` and ``mlp.fc1``): replicated input, this rank's heads / MLP columns out,
  no communication;
* row-parallel (``o_proj``, ``down_proj``; the ViT's ``attn.proj`` and ``mlp.fc2``, whose biases
  are replicated): sharded input, partial sums all-reduced to a replicated output;
* ``embed_tokens``: row-wise over the vocabulary (ids outside the rank's range give zeros, then an all-reduce);
* ``lm_head``: column-wise over the vocabulary, the logits all-gathered, so every rank holds the same
  full ``(B, V)`` logits and samples the same token.

Attention modules are told their local head counts, and ``model.config`` becomes the rank's
(:meth:`TensorParallelLayout.rank_config`) so the KV cache holds this rank's KV heads only.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from .layout import TensorParallelLayout


def _plan(model: nn.Module) -> dict[str, tuple]:
    """Module path -> (parallel style, placement of its weight, of its bias), for the modules present."""
    column, row = (ColwiseParallel(), Shard(0), Shard(0)), (RowwiseParallel(), Shard(1), Replicate())
    plan = {"model.embed_tokens": (RowwiseParallel(input_layouts=Replicate()), Shard(0), None),
            "lm_head": (ColwiseParallel(output_layouts=Replicate()), Shard(0), None)}
    for i, layer in enumerate(model.model.layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        qkv = ["qkv_proj"] if layer.self_attn.qkv_proj is not None else ["q_proj", "k_proj", "v_proj"]
        gate_up = ["gate_up_proj"] if layer.mlp.gate_up_proj is not None else ["gate_proj", "up_proj"]
        plan.update({f"{attn}.{p}": column for p in qkv})
        plan.update({f"{mlp}.{p}": column for p in gate_up})
        plan[f"{attn}.o_proj"] = row
        plan[f"{mlp}.down_proj"] = row
    for i in range(len(model.visual.blocks)):
        block = f"visual.blocks.{i}"
        plan.update({f"{block}.attn.qkv": column, f"{block}.mlp.fc1": column,
                     f"{block}.attn.proj": row, f"{block}.mlp.fc2": row})
    return plan


def parallelize(model: nn.Module, layout: TensorParallelLayout, mesh: DeviceMesh, fuse: bool = False) -> nn.Module:
    """``model`` (a Qwen2VL whose sharded parameters hold this rank's slices as plain tensors) -> the
    tensor-parallel model, in place. ``fuse`` joins q/k/v and gate/up first (on the local slices:
    this rank's q, k and v rows side by side, which is what its fused matmul needs)."""
    if mesh.size() != layout.world:
        raise ValueError(f"device mesh of {mesh.size()} ranks for a layout of {layout.world}")
    for layer in model.model.layers:
        layer.self_attn.num_heads, layer.self_attn.num_kv_heads = layout.local_heads, layout.local_kv_heads
    for block in model.visual.blocks:
        block.attn.num_heads = layout.vision_heads // layout.world
    if fuse:
        model.fuse_projections()
    plan = _plan(model)
    for path, (_, weight, bias) in plan.items():
        module = model.get_submodule(path)
        for name, param in list(module.named_parameters(recurse=False)):
            if not isinstance(param, DTensor):  # a tied lm_head shares the embedding's, already wrapped
                placement = weight if name == "weight" else bias
                local = DTensor.from_local(param.detach(), mesh, [placement], run_check=False)
                module.register_parameter(name, nn.Parameter(local, requires_grad=False))
        model.tie_weights()
    parallelize_module(model, mesh, {path: style for path, (style, _, _) in plan.items()})
    model.tie_weights()
    model.config = layout.rank_config(model.config)
    model.tensor_parallel = layout
    return model
