"""Published packed layouts of quantized linear layers <-> :class:`QuantWeight`.

GPTQ (AutoGPTQ / GPTQModel ``checkpoint_format="gptq"``, what Qwen's -GPTQ-Int4/-Int8 ship):

* ``qweight`` int32 ``(K * bits / 32, N)``: ``32/bits`` consecutive input rows per int32, row
  ``i * 32/bits + j`` in bits ``[bits*j, bits*(j+1))``;
* ``qzeros`` int32 ``(G, N * bits / 32)``: packed the same way along the output dimension, and
  holding ``zero - 1`` (``gptq_v2`` holds the zero itself);
* ``scales`` ``(G, N)``; ``g_idx`` int32 ``(K,)``: the group of each input column (not sorted
  when the checkpoint was quantized with act-order, ``desc_act``);
* the float weight is ``scales[g_idx[k], n] * (q[k, n] - zeros[g_idx[k], n])``.

AWQ GEMM (AutoAWQ ``version="gemm"``, what Qwen's -AWQ ship), 4-bit only:

* ``qweight`` int32 ``(K, N / 8)`` and ``qzeros`` int32 ``(G, N / 8)``, both packed along the
  output dimension with nibble ``i`` of an int32 holding column ``AWQ_ORDER[i]`` of its 8;
* ``scales`` ``(G, N)``; no zero offset, groups in order: ``w = (q - z) * s``.
"""

from __future__ import annotations

import torch

from .weights import QuantWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``(R, C)`` packed along rows -> ``(R * 32/bits, C)`` int16 values."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)  # (per,)
    values = (packed.unsqueeze(1) >> shifts.view(1, per, 1)) & (2**bits - 1)  # (R, per, C)
    return values.reshape(-1, packed.shape[1]).to(torch.int16)


def unpack_cols(packed: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 ``(R, C)`` packed along columns -> ``(R, C * 32/bits)`` int16; field ``i`` is column ``order[i]``."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    values = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)  # (R, C, per): field i
    if order is not None:
        inverse = torch.argsort(torch.tensor(order))  # column j sits in field inverse[j]
        values = values[..., inverse]
    return values.reshape(packed.shape[0], -1).to(torch.int16)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """``(R, C)`` values -> int32 ``(R * bits/32, C)``, the inverse of :func:`unpack_rows`."""
    per = 32 // bits
    r, c = values.shape
    if r % per:
        raise ValueError(f"{r} rows cannot be packed {per} to an int32")
    v = values.to(torch.int64).view(r // per, per, c)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64).view(1, per, 1)
    return _to_int32((v << shifts).sum(1))


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """``(R, C)`` values -> int32 ``(R, C * bits/32)``, the inverse of :func:`unpack_cols` (natural order)."""
    per = 32 // bits
    r, c = values.shape
    if c % per:
        raise ValueError(f"{c} columns cannot be packed {per} to an int32")
    v = values.to(torch.int64).view(r, c // per, per)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    return _to_int32((v << shifts).sum(-1))


def _to_int32(v: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns held in int64 -> the same bits as int32."""
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def from_gptq(tensors: dict[str, torch.Tensor], bits: int, group_size: int, v2: bool = False,
              name: str = "layer") -> QuantWeight:
    """A GPTQ layer (``qweight``, ``qzeros``, ``scales``, optional ``g_idx`` and ``bias``) -> QuantWeight."""
    _require(tensors, ("qweight", "qzeros", "scales"), name)
    q = unpack_rows(tensors["qweight"], bits).t()  # (N, K)
    n, k = q.shape
    g = k if group_size in (-1, None) else group_size
    if k % g:
        raise ValueError(f"{name}: in_features {k} is not divisible by group_size {g}")
    zeros = unpack_cols(tensors["qzeros"], bits)[:, :n] + (0 if v2 else 1)  # (G, N)
    scales = tensors["scales"]  # (G, N)
    if scales.shape != (k // g, n) or zeros.shape != (k // g, n):
        raise ValueError(f"{name}: scales {tuple(scales.shape)} / qzeros {tuple(zeros.shape)} do not fit "
                         f"{k} inputs in groups of {g} and {n} outputs")
    perm = None
    g_idx = tensors.get("g_idx")
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(k) // g):
        g_idx = g_idx.long()
        counts = torch.bincount(g_idx, minlength=k // g)
        if g_idx.shape != (k,) or counts.numel() != k // g or bool((counts != g).any()):
            raise ValueError(f"{name}: g_idx does not assign exactly {g} input columns to each of {k // g} groups")
        perm = torch.argsort(g_idx, stable=True)  # sorted column j is input feature perm[j]
        q = q[:, perm]
    return QuantWeight(bits, g, q.to(torch.uint8).contiguous(), scales.t().contiguous(), zeros.t().contiguous(),
                       tensors.get("bias"), perm)


def to_gptq(qw: QuantWeight) -> dict[str, torch.Tensor]:
    """QuantWeight -> GPTQ tensors (``checkpoint_format="gptq"``: zeros stored minus one)."""
    q = qw.q
    k = qw.in_features
    if qw.perm is not None:
        q = torch.empty_like(q).index_copy_(1, qw.perm, q)  # back to input order
        g_idx = torch.empty(k, dtype=torch.int32).index_copy_(
            0, qw.perm, (torch.arange(k) // qw.group_size).to(torch.int32))
    else:
        g_idx = (torch.arange(k) // qw.group_size).to(torch.int32)
    stored = qw.zeros.t().to(torch.int32) - 1  # (G, N)
    if bool((stored < 0).any()):
        raise ValueError("a zero point of 0 cannot be written in the GPTQ layout (it stores zero - 1)")
    out = {"qweight": pack_rows(q.t(), qw.bits), "qzeros": pack_cols(stored, qw.bits),
           "scales": qw.scales.t().contiguous(), "g_idx": g_idx}
    if qw.bias is not None:
        out["bias"] = qw.bias
    return out


def from_awq(tensors: dict[str, torch.Tensor], bits: int, group_size: int, name: str = "layer") -> QuantWeight:
    """An AWQ GEMM layer (``qweight``, ``qzeros``, ``scales``, optional ``bias``) -> QuantWeight."""
    if bits != 4:
        raise ValueError(f"{name}: AWQ GEMM checkpoints are 4-bit; got bits={bits}")
    _require(tensors, ("qweight", "qzeros", "scales"), name)
    q = unpack_cols(tensors["qweight"], 4, AWQ_ORDER).t()  # (N, K)
    zeros = unpack_cols(tensors["qzeros"], 4, AWQ_ORDER)  # (G, N)
    n, k = q.shape
    if k % group_size or tensors["scales"].shape != (k // group_size, n) or zeros.shape != (k // group_size, n):
        raise ValueError(f"{name}: scales {tuple(tensors['scales'].shape)} / qzeros {tuple(zeros.shape)} do not "
                         f"fit {k} inputs in groups of {group_size} and {n} outputs")
    return QuantWeight(4, group_size, q.to(torch.uint8).contiguous(), tensors["scales"].t().contiguous(),
                       zeros.t().contiguous(), tensors.get("bias"))


def _require(tensors: dict, names: tuple[str, ...], layer: str) -> None:
    absent = [n for n in names if n not in tensors]
    if absent:
        raise ValueError(f"{layer}: quantized layer lacks {', '.join(absent)}")
