"""A preallocated key/value cache for the decoder.

The cache slot of a token is not its rotary position: an image of ``h x w`` merged tokens
occupies ``h*w`` slots but advances the M-RoPE position by only ``max(h, w)``. The engine
therefore tracks positions separately (``cache_len + rope_delta``) and tells the cache, per
token, which slot to write.

Rows are independent: each row ``b`` has its own fill level ``lengths[b]`` and a ``valid`` mask
over slots (left padding of a batched prefill is written but never valid), so rows can finish,
be reset and be refilled on their own (continuous batching).
"""

from __future__ import annotations

import copy

import torch

from ..config import TextConfig


class KVCache:
    def __init__(self, config: TextConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # slot holds a real token
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # next free slot per row
        self.max_len = max_len
        self.view_len = max_len  # attention reads slots [0, view_len); the engine narrows it on CPU

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor):
        """Write k/v ``(B, KV, T, D)`` at ``slots`` ``(B, T)``; return the cached ``(B, KV, view_len, D)``."""
        index = slots.view(slots.shape[0], 1, slots.shape[1], 1).expand_as(k)
        self.k[layer].scatter_(2, index, k)
        self.v[layer].scatter_(2, index, v)
        return self.k[layer][:, :, : self.view_len], self.v[layer][:, :, : self.view_len]

    def mark(self, slots: torch.Tensor, real: torch.Tensor) -> None:
        """Record which of the written slots ``(B, T)`` hold real tokens (``real`` bool ``(B, T)``)."""
        self.valid.scatter_(1, slots, real)

    def attention_mask(self, slots: torch.Tensor) -> torch.Tensor:
        """Mask ``(B, 1, T, view_len)`` for queries at ``slots`` ``(B, T)``: each sees the valid slots up
        to its own, and always itself (so a padding query never has an empty row)."""
        keys = torch.arange(self.view_len, device=slots.device)
        own = keys == slots.unsqueeze(-1)  # (B, T, S)
        visible = self.valid[:, None, : self.view_len] & (keys <= slots.unsqueeze(-1))
        return (visible | own).unsqueeze(1)

    def narrow(self, rows: int) -> KVCache:
        """The first ``rows`` rows as a cache sharing this one's storage (writes go through)."""
        view = copy.copy(self)
        view.k = [t[:rows] for t in self.k]
        view.v = [t[:rows] for t in self.v]
        view.valid = self.valid[:rows]
        view.lengths = self.lengths[:rows]
        return view

    def reset_rows(self, rows: torch.Tensor | list[int]) -> None:
        self.valid[rows] = False
        self.lengths[rows] = 0

    def copy_row(self, dst: int, src: KVCache, src_row: int, length: int) -> None:
        """Copy the first ``length`` slots of ``src``'s row into row ``dst`` of this cache."""
        for layer in range(len(self.k)):
            self.k[layer][dst, :, :length] = src.k[layer][src_row, :, :length]
            self.v[layer][dst, :, :length] = src.v[layer][src_row, :, :length]
        self.valid[dst] = False
        self.valid[dst, :length] = src.valid[src_row, :length]
        self.lengths[dst] = length
