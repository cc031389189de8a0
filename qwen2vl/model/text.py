"""The Qwen2 decoder: RMSNorm, grouped-query attention with q/k/v bias and M-RoPE, SwiGLU MLP."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from .kv_cache import KVCache
from .rope import apply_rotary
from .vision import activation


class RMSNorm(nn.Module):
    """``weight * (x / rms(x))``: normalised in float32, cast back, then scaled in the model dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, c.hidden_size, bias=False)
        self.qkv_proj = None  # q, k and v in one matmul after fuse()

    @property
    def split_sizes(self) -> list[int]:
        return [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim]

    @torch.no_grad()
    def fuse(self) -> None:
        """Replace q_proj, k_proj and v_proj by one projection (same numbers, one matmul instead of three)."""
        if self.qkv_proj is not None:
            return
        parts = (self.q_proj, self.k_proj, self.v_proj)
        fused = _fused_linear(parts, bias=True)
        del self.q_proj, self.k_proj, self.v_proj
        self.qkv_proj = fused

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | Segments | None,
                cache: KVCache | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, slots)  # (B, KV, S, D)
        if isinstance(mask, Segments):
            out = mask.attend(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1,
                                                 enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = activation(config.hidden_act)
        self.gate_up_proj = None  # gate and up in one matmul after fuse()

    @torch.no_grad()
    def fuse(self) -> None:
        if self.gate_up_proj is not None:
            return
        fused = _fused_linear((self.gate_proj, self.up_proj), bias=False)
        del self.gate_proj, self.up_proj
        self.gate_up_proj = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def _fused_linear(parts: tuple[nn.Linear, ...], bias: bool) -> nn.Linear:
    """One Linear whose output is the concatenation of ``parts``' outputs."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor exists (importing costs ~2 s)
    if dtensor is not None and any(isinstance(p.weight, dtensor.DTensor) for p in parts):
        raise RuntimeError("the projections of a tensor-parallel model are fused while it is sharded: "
                           "load it with qwen2vl.distributed.load_tensor_parallel(..., fuse=True)")
    weight = torch.cat([p.weight for p in parts])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if bias:
        fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return fused


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache=None, slots=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, slots)
        return x + self.mlp(self.post_attention_layernorm(x))


class Embedding(nn.Embedding):
    """nn.Embedding that skips its random initialisation on the meta device.

    There ``normal_`` goes through torch's reference implementation, which imports torch._dynamo
    (about two seconds at every start); a meta tensor has no values to initialise anyway.
    """

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class TextModel(nn.Module):
    """``model``: token embeddings, decoder layers and the final norm (the lm_head lives outside)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | Segments | None,
                cache: KVCache | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        """x: input embeddings (B, T, H); cos/sin (B, T, D); mask bool (B, 1, T, S), packed
        :class:`Segments` (no cache), or None for causal."""
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, slots)
        return self.norm(x)


@dataclass(frozen=True)
class Segments:
    """Packed rows as runs of tokens: a token attends to earlier tokens of its own run (causal), and
    a padding token (outside every run) to itself only.

    ``runs[b]`` holds row ``b``'s ``(start, end)`` per sample. Attention is computed run by run, so
    a row costs ``sum(len ** 2)`` instead of ``T ** 2``: four samples of 128 tokens in a 512-token
    row cost a quarter of the masked full-row attention.

    >>> Segments.from_ids(torch.tensor([[0, 1, 1, 2]])).runs   # left pad, a 2-token sample, a 1-token one
    (((1, 3), (3, 4)),)
    """

    runs: tuple[tuple[tuple[int, int], ...], ...]

    @classmethod
    def from_ids(cls, segment_ids: torch.Tensor) -> Segments:
        """From per-token segment ids ``(B, T)``: 0 = padding, k > 0 = sample k (each a contiguous run)."""
        rows = []
        for ids in segment_ids.tolist():
            runs, start = [], 0
            for t in range(1, len(ids) + 1):
                if t == len(ids) or ids[t] != ids[start]:
                    if ids[start] > 0:
                        runs.append((start, t))
                    start = t
            rows.append(tuple(runs))
        return cls(tuple(rows))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q ``(B, H, T, D)``, k/v ``(B, KV, T, D)`` -> ``(B, H, T, D)``.

        Rows and runs are cut with ``unbind`` and ``split`` (whose backward is one ``stack`` / ``cat``),
        not by indexing (whose backward writes a zero tensor of the whole input per piece)."""
        t, gqa, repeat = q.shape[2], q.shape[1] != k.shape[1], q.shape[1] // k.shape[1]
        rows = []
        for runs, qb, kb, vb in zip(self.runs, q.unbind(0), k.unbind(0), v.unbind(0)):  # (H or KV, T, D)
            pieces, pos = [], 0  # (length, is a run), covering the row
            for start, end in runs:
                pieces += [(start - pos, False)] if start > pos else []
                pieces.append((end - start, True))
                pos = end
            pieces += [(t - pos, False)] if t > pos else []
            sizes = [n for n, _ in pieces]
            out = []
            for (_, run), qi, ki, vi in zip(pieces, qb.split(sizes, 1), kb.split(sizes, 1), vb.split(sizes, 1)):
                if run:
                    out.append(F.scaled_dot_product_attention(qi[None], ki[None], vi[None], is_causal=True,
                                                              enable_gqa=gqa)[0])
                else:  # padding: its own value
                    out.append(vi.repeat_interleave(repeat, dim=0))
            rows.append(torch.cat(out, dim=1))
        return torch.stack(rows)
