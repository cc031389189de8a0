"""The vision tower: patch embedding, ViT blocks with per-frame-group attention, 2x2 patch merger.

Input rows are patches in the processor's order (spec 4.4): frame group major, then 2x2 merge
windows in raster order, then the four patches of each window. Attention never crosses a frame
group (two frames of a video, or one image), and it is computed without an N x N mask: frame
groups of equal length are stacked into one batched attention call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .rope import apply_rotary, vision_cos_sin, vision_rotary_ids

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@dataclass
class FrameGroups:
    """How the N patch rows split into independent attention sequences (one per frame group).

    ``lengths`` are the groups' row counts in row order (each group is a contiguous run of rows);
    ``buckets`` holds, per distinct length L, the indices of the groups of that length. Built once
    per forward and shared by all blocks.

    Example: an image of 4x6 patches and a 2-group video of 4x4 patches give lengths
    [24, 16, 16] and buckets [[1, 2], [0]] (lengths 16 and 24).
    """

    lengths: list[int]
    buckets: list[list[int]]  # per distinct length (ascending), the indices of the groups of that length

    @classmethod
    def from_grids(cls, grids: list[tuple[int, int, int]]) -> FrameGroups:
        lengths = [h * w for t, h, w in grids for _ in range(t)]
        by_length: dict[int, list[int]] = {}
        for i, length in enumerate(lengths):
            by_length.setdefault(length, []).append(i)
        return cls(lengths, [by_length[length] for length in sorted(by_length)])


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: FrameGroups) -> torch.Tensor:
    """Non-causal attention inside each frame group. q, k, v: (N, heads, D) -> (N, heads, D).

    Groups of one length are stacked into one batched call. Groups are cut out with split/stack
    and put back with cat (their backward passes are a cat and views), never with row indices,
    whose backward zero-fills an (N, heads, D) gradient per bucket: a training batch of many
    image sizes has many buckets.
    """
    n, heads, dim = q.shape
    if len(groups.buckets) == 1:
        count, length = len(groups.lengths), groups.lengths[0]
        qb, kb, vb = (x.view(count, length, heads, dim).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qb, kb, vb)  # (G, heads, L, D)
        return o.transpose(1, 2).reshape(n, heads, dim)
    pieces = [x.split(groups.lengths) for x in (q, k, v)]  # per group (L_g, heads, D)
    out: list[torch.Tensor | None] = [None] * len(groups.lengths)
    for index in groups.buckets:
        qb, kb, vb = (torch.stack([p[i] for i in index]).transpose(1, 2) for p in pieces)  # (G, heads, L, D)
        o = F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2)  # (G, L, heads, D)
        for i, group_out in zip(index, o.unbind(0)):
            out[i] = group_out
    return torch.cat(out)


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (2, 14, 14) on one patch, computed as one matmul.

    The weight keeps the checkpoint's Conv3d shape ``(embed, C, T, P, P)``; its flattening order
    equals the processor's column order, so ``x @ W.view(embed, -1).T`` is the convolution.
    """

    def __init__(self, config: VisionConfig):
        super().__init__()
        c = config
        self.embed_dim = c.embed_dim
        kernel = (c.temporal_patch_size, c.patch_size, c.patch_size)
        self.proj = nn.Conv3d(c.in_channels, c.embed_dim, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:  # (N, C*T*P*P) -> (N, embed)
        weight = self.proj.weight
        return F.linear(patches.to(weight.dtype), weight.view(self.embed_dim, -1))


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim, bias=True)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: FrameGroups) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)  # each (N, heads, D)
        # rotary in float32, then back to the activation dtype
        q = apply_rotary(q.float(), cos, sin).to(x.dtype)
        k = apply_rotary(k.float(), cos, sin).to(x.dtype)
        return self.proj(grouped_attention(q, k, v, groups).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        hidden = int(config.embed_dim * config.mlp_ratio)
        self.fc1 = nn.Linear(config.embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, config.embed_dim)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def forward(self, x, cos, sin, groups: FrameGroups):
        x = x + self.attn(self.norm1(x), cos, sin, groups)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm per patch, then each 2x2 window (4 consecutive rows) -> one LLM-width token."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.window_dim = config.embed_dim * config.spatial_merge_size**2
        self.ln_q = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.window_dim, self.window_dim), nn.GELU(),
                                 nn.Linear(self.window_dim, config.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, embed) -> (N/4, hidden)
        return self.mlp(self.ln_q(x).view(-1, self.window_dim))


class VisionTransformer(nn.Module):
    """``visual``: patches ``(N, 1176)`` + ``grid_thw`` ``(items, 3)`` -> merged tokens ``(N/4, hidden)``."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)
        self.gradient_checkpointing = False

    def compile_blocks(self, **options) -> None:
        """torch.compile each block (fuses norms, rotary and activations); ``options`` go to torch.compile."""
        for block in self.blocks:
            block.compile(**options)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grids = [tuple(g) for g in grid_thw.tolist()]
        check_grids(grids, pixel_values.shape[0], self.config)
        device = pixel_values.device
        x = self.patch_embed(pixel_values)
        cos, sin = vision_cos_sin(vision_rotary_ids(grids, self.config.spatial_merge_size, device),
                                  self.config.head_dim)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (N, 1, D): broadcast over heads
        groups = FrameGroups.from_grids(grids)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, groups, use_reentrant=False)
            else:
                x = block(x, cos, sin, groups)
        return self.merger(x)


def check_grids(grids: list[tuple[int, int, int]], rows: int, config: VisionConfig) -> None:
    m = config.spatial_merge_size
    for i, (t, h, w) in enumerate(grids):
        if t < 1 or h < m or w < m or h % m or w % m:
            raise ValueError(f"grid_thw[{i}] = {(t, h, w)} is invalid: t >= 1 and h, w positive "
                             f"multiples of spatial_merge_size {m} are required")
    expected = sum(t * h * w for t, h, w in grids)
    if expected != rows:
        raise ValueError(f"pixel values have {rows} patch rows but grid_thw {grids} describes {expected}")
