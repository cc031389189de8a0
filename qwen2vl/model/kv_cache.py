"""A fixed-slot key/value cache for the decoder: ``rows`` independent rows of ``capacity`` slots.

The cache slot of a token is not its rotary position: an image of ``h x w`` merged tokens
occupies ``h*w`` slots but advances the M-RoPE position by only ``max(h, w)``. The engine
therefore tracks positions separately (``slot + rope_delta``) and tells the cache, per token,
which slot to write.

Every row is one sequence, written from slot 0 without padding; ``valid[row, slot]`` says which
slots hold its tokens, so a row can be reset and refilled on its own while the other rows keep
decoding (continuous batching). Storage never moves: no row is ever compacted or resized.

A model call sees the cache through a :class:`CacheWindow`: some rows (all, or one being
prefilled) and the first ``span`` slots of them. On CUDA the decode step always uses the whole
cache (fixed shapes for the captured graph); on CPU it narrows the window to the slots in use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import TextConfig


class KVCache:
    def __init__(self, config: TextConfig, rows: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        shape = (rows, config.num_key_value_heads, capacity, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.valid = torch.zeros(rows, capacity, dtype=torch.bool, device=device)  # slot holds a real token

    @property
    def rows(self) -> int:
        return self.valid.shape[0]

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def window(self, rows: slice = slice(None), span: int | None = None) -> CacheWindow:
        """The rows ``rows`` and their slots ``[0, span)`` (all slots by default), for one model call."""
        return CacheWindow(self, rows, self.capacity if span is None else span)

    def reset_row(self, row: int) -> None:
        self.valid[row] = False

    def copy_row(self, dst: int, src: KVCache, src_row: int, length: int) -> None:
        """Copy slots ``[0, length)`` of ``src``'s row ``src_row`` into row ``dst`` (the rest is invalid)."""
        for layer in range(len(self.k)):
            self.k[layer][dst, :, :length] = src.k[layer][src_row, :, :length]
            self.v[layer][dst, :, :length] = src.v[layer][src_row, :, :length]
        self.valid[dst] = False
        self.valid[dst, :length] = src.valid[src_row, :length]

    def snapshot_row(self, row: int, length: int) -> KVCache:
        """A one-row cache holding a copy of slots ``[0, length)`` of ``row`` (e.g. a chat turn's prefix)."""
        out = object.__new__(KVCache)
        out.k = [t[row:row + 1, :, :length].clone() for t in self.k]
        out.v = [t[row:row + 1, :, :length].clone() for t in self.v]
        out.valid = self.valid[row:row + 1, :length].clone()
        return out


@dataclass(frozen=True)
class CacheWindow:
    """What one model call reads and writes: ``cache`` rows ``rows``, slots ``[0, span)``."""

    cache: KVCache
    rows: slice
    span: int

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor):
        """Write k/v ``(B, KV, T, D)`` at ``slots`` ``(B, T)``; return the window's ``(B, KV, span, D)``."""
        index = slots.view(slots.shape[0], 1, slots.shape[1], 1).expand_as(k)
        keys, values = self.cache.k[layer][self.rows], self.cache.v[layer][self.rows]
        keys.scatter_(2, index, k)
        values.scatter_(2, index, v)
        return keys[:, :, : self.span], values[:, :, : self.span]

    def attention_mask(self, slots: torch.Tensor) -> torch.Tensor:
        """Mask ``(B, 1, T, span)`` for queries at ``slots`` ``(B, T)``: each sees the valid slots up to
        its own, and always itself, or the window's last slot when its own lies beyond the window (an
        idle row's scratch slot): no query has an empty row."""
        keys = torch.arange(self.span, device=slots.device)
        own = keys == slots.clamp(max=self.span - 1).unsqueeze(-1)  # (B, T, S)
        visible = self.cache.valid[self.rows, None, : self.span] & (keys <= slots.unsqueeze(-1))
        return (visible | own).unsqueeze(1)
