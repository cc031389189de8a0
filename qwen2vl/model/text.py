"""The Qwen2 decoder: RMSNorm, grouped-query attention with q/k/v bias and M-RoPE, SwiGLU MLP."""

from __future__ import annotations

import sys

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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        """x: input embeddings (B, T, H); cos/sin (B, T, D); mask bool (B, 1, T, S) or None for causal."""
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, slots)
        return self.norm(x)


def attention_mask_from_segments(segments: torch.Tensor) -> torch.Tensor:
    """Causal mask ``(B, 1, T, T)`` (True = attend) from per-token segment ids ``(B, T)``.

    A token attends to earlier tokens of its own segment; segment 0 is padding. A padding row
    attends to itself only, so no row is empty (an all-masked row would give NaN, and NaN
    values of padding would then poison the real rows through ``0 * NaN``).

    Example: segments [[0, 1, 1, 2]] (left pad, a 2-token sample, a 1-token sample) lets token 2
    see tokens 1-2 and token 3 see only itself.
    """
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    same = segments.unsqueeze(2) == segments.unsqueeze(1)  # (B, T, T)
    real = (segments > 0).unsqueeze(1)  # key is not padding
    eye = torch.eye(t, dtype=torch.bool, device=segments.device)
    return ((causal & same & real) | eye).unsqueeze(1)
