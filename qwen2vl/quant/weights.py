"""Integer weights of one linear layer, unpacked: the form every format converts through.

A :class:`QuantWeight` holds one value per weight (``q``, uint8), a scale and an integer zero point
per output row and group of ``group_size`` input columns, and optionally an input permutation
(GPTQ act-order). The float weight it stands for is

    w[n, perm[j]] = (q[n, j] - zeros[n, j // group_size]) * scales[n, j // group_size]

Round-to-nearest quantization (:func:`quantize_weight`), GPTQ/AWQ checkpoints and the packed
kernels of :mod:`qwen2vl.quant.linear` all meet here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantWeight:
    bits: int  # 4 or 8
    group_size: int  # input columns per scale; == in_features for one scale per output row
    q: torch.Tensor  # (N, K) uint8 in [0, 2**bits)
    scales: torch.Tensor  # (N, G) float
    zeros: torch.Tensor  # (N, G) int16 (GPTQ's stored zero + 1 can reach 2**bits)
    bias: torch.Tensor | None = None  # (N,)
    perm: torch.Tensor | None = None  # (K,) int64: column j of q multiplies input feature perm[j]

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def in_features(self) -> int:
        return self.q.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``(N, K)`` in the original input order."""
        n, k = self.q.shape
        g = self.group_size
        q = self.q.view(n, k // g, g).float()  # (N, G, g)
        w = ((q - self.zeros.float().unsqueeze(-1)) * self.scales.float().unsqueeze(-1)).view(n, k)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w.to(dtype)


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None = None, sym: bool = True,
                    bias: torch.Tensor | None = None) -> QuantWeight:
    """Round-to-nearest quantization of ``weight`` (N, K), one scale per row and group.

    ``group_size=None`` means one group per row. Symmetric: zero point ``2**(bits-1)`` and scale
    ``absmax / (2**(bits-1) - 1)``. Asymmetric: the group's [min, max] over ``2**bits - 1`` steps, with
    the zero point kept in ``[1, 2**bits - 1]`` so the GPTQ layout (which stores ``zero - 1``) holds it.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    n, k = weight.shape
    g = k if group_size in (None, -1) else group_size
    if k % g:
        raise ValueError(f"in_features {k} is not divisible by group_size {g}")
    w = weight.detach().float().view(n, k // g, g)  # (N, G, g)
    top = 2**bits - 1
    if sym:
        scales = w.abs().amax(-1) / (2 ** (bits - 1) - 1)
        zeros = torch.full_like(scales, 2 ** (bits - 1))
    else:
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scales = (hi - lo) / top
        zeros = (-lo / scales.clamp(min=1e-12)).round().clamp(1, top)
    scales = scales.clamp(min=1e-10)
    q = (w / scales.unsqueeze(-1)).round() + zeros.unsqueeze(-1)
    q = q.clamp(0, top).to(torch.uint8).view(n, k)
    return QuantWeight(bits, g, q, scales, zeros.to(torch.int16),
                       None if bias is None else bias.detach().clone())


def concat(parts: list[QuantWeight]) -> QuantWeight:
    """Stack along the output dimension (q/k/v -> qkv); the parts must share bits, groups and permutation."""
    first = parts[0]
    for p in parts[1:]:
        if (p.bits, p.group_size, p.in_features) != (first.bits, first.group_size, first.in_features):
            raise ValueError(f"cannot fuse {p.bits}-bit group {p.group_size} x {p.in_features} with "
                             f"{first.bits}-bit group {first.group_size} x {first.in_features}")
        if (p.perm is None) != (first.perm is None) or (p.perm is not None and not torch.equal(p.perm, first.perm)):
            raise ValueError("cannot fuse projections with different act-order permutations")
    if any(p.bias is None for p in parts) != all(p.bias is None for p in parts):
        raise ValueError("cannot fuse projections where only some have a bias")
    bias = None if first.bias is None else torch.cat([p.bias for p in parts])
    return QuantWeight(first.bits, first.group_size, torch.cat([p.q for p in parts]),
                       torch.cat([p.scales for p in parts]), torch.cat([p.zeros for p in parts]), bias, first.perm)
