"""Quantized linear layers: drop-in replacements of ``nn.Linear`` (same ``forward(x)``).

* :class:`Int8Linear`: int8 weights with one scale per output row. On the CPU they are multiplied in
  integers, each input row going in as two int8 vectors, its rounding and the rounding of the rest
  (about 15 bits): by our AVX512-VNNI kernel (:mod:`qwen2vl.quant.int8_cpu`), or where that is not
  built by oneDNN's (``onednn::qlinear_pointwise`` on its packed weight, :func:`int8_matmul`; the
  same numbers). Checkpoints with per-group int8 scales
  or zero points other than 128 (some GPTQ-Int8 releases) dequantize and matmul: correct, not fast.
* :class:`Int4Linear`: 4-bit weights with a scale and zero point per group of 32/64/128/256 input
  columns. On the CPU each input row is rounded to int8 in blocks of 32 and multiplied in integers
  by our AVX512-VNNI kernel (:mod:`qwen2vl.quant.int4_cpu`); where that kernel is not built, torch's
  ``_weight_int4pack_mm_for_cpu`` (float activations).

Neither has a ``weight`` attribute. Both keep an optional act-order input permutation (GPTQ
``desc_act``) and bias. Off the CPU (CUDA) they dequantize the weight and call ``F.linear``:
correct, without the memory-bandwidth gain.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import int4_cpu, int8_cpu
from .weights import QuantWeight, quantize_weight

INT4_GROUPS = (32, 64, 128, 256)
# From this many rows (prompt tokens) on, dequantizing the weight once per call and running the
# float GEMM beats the packed kernel. Int4 with torch's kernel (not ours: see Int4Linear): on the 2B's gate/up (17920x1536, 1 thread) the kernel
# costs about 0.6 ms per row, the dequantize about 190 ms per call whatever the rows
# (benchmarks/quant_paths.py). Int8 without oneDNN (``torch._weight_int8pack_mm``): a
# matrix-vector kernel.
GEMM_ROWS = {4: 256, 8: 16}
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
# oneDNN's int8 kernel takes milliseconds of CPU time for narrow outputs (1536 inputs, 2 rows: 64 outputs
# 4.7 ms, 128 9.4 ms; 320 outputs 31 us, 2048 144 us); narrower layers keep the weight-only kernel.
ONEDNN_MIN_OUT = 320
_BLOCK_N = 64  # the CPU int4 layout packs rows in blocks of 64


class QuantLinear(nn.Module):
    """Shared forward: ``(..., K) -> (..., N)`` through ``_matmul`` on ``(M, K)`` rows."""

    in_features: int
    out_features: int
    bits: int

    def _set_common(self, qw: QuantWeight, dtype: torch.dtype) -> None:
        self.in_features, self.out_features, self.group_size = qw.in_features, qw.out_features, qw.group_size
        self.register_buffer("bias", None if qw.bias is None else qw.bias.to(dtype))
        self.register_buffer("perm", qw.perm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        y = self._matmul(x2)  # (M, N)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, act_order={self.perm is not None}")


class Int8Linear(QuantLinear):
    bits = 8

    def __init__(self, qw: QuantWeight, dtype: torch.dtype = torch.float32):
        super().__init__()
        if qw.bits != 8:
            raise ValueError(f"Int8Linear needs 8-bit weights, got {qw.bits}-bit")
        self._set_common(qw, dtype)
        q = (qw.q.to(torch.int16) - 128).to(torch.int8)  # (N, K)
        self.register_buffer("scales", qw.scales.to(dtype).contiguous())  # (N, G)
        self.register_buffer("offsets", qw.zeros.to(torch.int16) - 128)  # (N, G) zero point - 128
        # one scale per row and zero point 128: the integer kernels apply
        self.per_row = qw.scales.shape[1] == 1 and not bool(self.offsets.any())
        # On the CPU the weight is kept in a kernel's layout: ours (``kernel == "vnni"``, ``qweight`` in
        # :mod:`~qwen2vl.quant.int8_cpu`'s blocks) or, where that is not built, oneDNN's (the packed weight
        # replaces ``qweight``: not a buffer, it cannot leave the CPU). ``int8_weight()`` reads either back.
        self.kernel, self.packed = None, None
        if self.per_row and q.device.type == "cpu" and q.shape[1] < int8_cpu.MAX_K and int8_cpu.available():
            self.kernel = "vnni"
            self.row_scales = F.pad(self.scales.float().view(-1), (0, -q.shape[0] % int8_cpu.BLOCK_N))  # (Np,)
            q = int8_cpu.pack(q)  # (Np/16, ceil(K/4), 64) uint8
        elif self.per_row and ONEDNN and q.device.type == "cpu" and q.shape[0] >= ONEDNN_MIN_OUT:
            self.kernel = "onednn"
            self.packed = torch.ops.onednn.qlinear_prepack(q, None)  # (K, N) opaque
            self.packed_scales = self.scales.float().view(-1)  # (N,) float32, as the kernel takes them
            self.packed_zeros = torch.zeros(q.shape[0], dtype=torch.long)
            q = None
        self.register_buffer("qweight", q)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "vnni" and x.device.type == "cpu":
            xk = x if x.dtype in int8_cpu.DTYPES else x.float()
            return int8_cpu.matmul(xk, self.qweight, self.row_scales, self.out_features).to(x.dtype)
        if self.packed is not None:
            return int8_matmul(x, self.packed, self.packed_scales, self.packed_zeros)
        if self.per_row and x.device.type == "cpu" and x.shape[0] < GEMM_ROWS[8]:
            return torch._weight_int8pack_mm(x, self.qweight, self.scales.view(-1).to(x.dtype))
        return F.linear(x, self._dequantize(x.dtype))

    def int8_weight(self) -> torch.Tensor:
        """The int8 values ``(N, K)``, read back from a kernel's layout."""
        if self.kernel == "vnni":
            return int8_cpu.unpack(self.qweight, self.out_features, self.in_features)
        return self.qweight if self.packed is None else self.packed.to_dense().t().contiguous()

    def _dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        q = self.int8_weight()
        n, k = q.shape
        g = self.group_size
        w = q.view(n, k // g, g).to(dtype) - self.offsets.unsqueeze(-1).to(dtype)  # (N, G, g)
        return (w * self.scales.unsqueeze(-1).to(dtype)).view(n, k)

    def _apply(self, fn, recurse=True):
        if self.kernel is not None and fn(torch.zeros(())).device.type != "cpu":  # leaving the CPU: plain int8
            self.qweight, self.packed, self.kernel = self.int8_weight(), None, None
        return super()._apply(fn, recurse)

    def quant_weight(self) -> QuantWeight:
        q = (self.int8_weight().to(torch.int16) + 128).to(torch.uint8)
        zeros = self.offsets + 128
        return QuantWeight(8, self.group_size, q, self.scales.clone(), zeros, self.bias, self.perm)


@torch.library.custom_op("qwen2vl::int8_matmul", mutates_args=())
def int8_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """``x (M, K)`` float times the oneDNN-packed int8 weight ``(K, N)`` -> ``(M, N)`` in x's dtype.

    Each row of ``x`` is split into two int8 vectors, its rounding and the rounding of what is left:
    ``x = s1 * q1 + s2 * q2 + e`` with ``s1 = absmax(x) / 127``, ``s2 = absmax(x - s1 * q1) / 127 <=
    s1 / 254`` and ``|e| <= s2 / 2`` (about 15 bits, below bfloat16's rounding of all but the smallest
    entries). Both go through one kernel call of 2M rows: at decode the weight is read once either
    way. The kernel sums ``q * weight`` exactly in int32 and applies the weight's row scales (input
    scale 1); the rows' scales multiply its float32 output. A custom op, so ``torch.compile`` runs
    it as it is (the same numbers as eager; Inductor's own lowering of the kernel wants the packed
    weight frozen into the graph).
    """
    m = x.shape[0]
    xf = x.float()
    s1 = xf.abs().amax(-1, keepdim=True).clamp_(min=1e-30) / 127  # (M, 1)
    q1 = (xf / s1).round_()  # (M, K), |q1| <= 127
    rest = xf - q1 * s1
    s2 = rest.abs().amax(-1, keepdim=True).clamp_(min=1e-30) / 127
    q = torch.cat([q1, rest.div_(s2).round_()]).to(torch.int8)  # (2M, K)
    y = torch.ops.onednn.qlinear_pointwise(q, 1.0, 0, packed, scales, zeros, None, 1.0, 0, torch.float32,
                                           "none", [], "")  # (2M, N) float32
    return torch.addcmul(y[:m] * s1, y[m:], s2).to(x.dtype)


@int8_matmul.register_fake
def _(x, packed, scales, zeros):
    return x.new_empty((x.shape[0], scales.shape[0]))


class Int4Linear(QuantLinear):
    """4-bit weights, a scale and an offset per output row and group. Two kernels, each with its own
    layout, chosen when the layer is built: ``kernel == "vnni"`` (:mod:`qwen2vl.quant.int4_cpu`, int8
    activations, where it builds and the CPU has AVX512-VNNI) or ``"aten"``
    (``torch._weight_int4pack_mm_for_cpu``, float activations). Both hold the same integers and
    scales; saving reads them back (:meth:`quant_weight`)."""

    bits = 4

    def __init__(self, qw: QuantWeight, dtype: torch.dtype = torch.float32):
        super().__init__()
        if qw.bits != 4:
            raise ValueError(f"Int4Linear needs 4-bit weights, got {qw.bits}-bit")
        n, k = qw.q.shape
        if qw.group_size not in INT4_GROUPS or k % qw.group_size:
            raise ValueError(f"int4 group_size must be one of {INT4_GROUPS} and divide in_features; "
                             f"got group_size {qw.group_size} for in_features {k}")
        self._set_common(qw, dtype)
        self.kernel = "vnni" if qw.q.device.type == "cpu" and int4_cpu.available() else "aten"
        pad = -n % (int4_cpu.BLOCK_N if self.kernel == "vnni" else _BLOCK_N)  # rows padded to the layout's block
        q = F.pad(qw.q, (0, 0, 0, pad))
        scales = F.pad(qw.scales.float(), (0, 0, 0, pad), value=1.0)
        zeros = F.pad(qw.zeros.float(), (0, 0, 0, pad), value=8.0)
        # the kernels compute (q - 8) * scale + offset per group, so offset = (8 - zero) * scale
        offset = (8.0 - zeros) * scales
        if self.kernel == "vnni":
            kdtype = dtype if dtype in int4_cpu.DTYPES else torch.float32
            self.register_buffer("qweight", int4_cpu.pack(q))  # (Np/16, K/8, 64) uint8
            self.register_buffer("scales", int4_cpu.block_rows(scales.to(kdtype)))  # (Np/16, G, 16)
            self.register_buffer("offsets", int4_cpu.block_rows(offset.to(kdtype)) if offset.any() else None)
        else:
            self.register_buffer("qweight", torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))  # (Np, K/2)
            self.register_buffer("scales_and_zeros",
                                 torch.stack([scales.t(), offset.t()], dim=-1).to(dtype).contiguous())  # (G, Np, 2)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and self.kernel == "vnni" and self.scales.dtype in int4_cpu.DTYPES:
            y = int4_cpu.matmul(x.to(self.scales.dtype), self.qweight, self.scales, self.offsets, self.group_size,
                                self.out_features)
            return y.to(x.dtype)
        if x.device.type == "cpu" and self.kernel == "aten" and x.shape[0] < GEMM_ROWS[4]:
            sz = self.scales_and_zeros.to(x.dtype)
            return torch._weight_int4pack_mm_for_cpu(x, self.qweight, self.group_size, sz)[:, : self.out_features]
        return F.linear(x, self._dequantize(x.dtype).to(x.device))

    def _parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The values ``(N, K)`` uint8, scales and offsets ``(N, G)``, whatever the layout."""
        n = self.out_features
        if self.kernel == "vnni":
            scales = int4_cpu.unblock_rows(self.scales)
            offsets = torch.zeros_like(scales) if self.offsets is None else int4_cpu.unblock_rows(self.offsets)
            return int4_cpu.unpack(self.qweight)[:n], scales[:n], offsets[:n]
        sz = self.scales_and_zeros[:, :n]
        return _unpack(self.qweight)[:n], sz[..., 0].t(), sz[..., 1].t()

    def _dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight ``(N, K)`` (sorted input order), as the kernels compute it: (q - 8) * s + offset."""
        q, scales, offsets = self._parts()
        n, k = q.shape
        w = (q.view(n, k // self.group_size, self.group_size).to(dtype) - 8) * scales.to(dtype).unsqueeze(-1)
        return (w + offsets.to(dtype).unsqueeze(-1)).view(n, k)

    def quant_weight(self) -> QuantWeight:
        if self.kernel == "aten":
            _check_int4_layout()
        q, scales, offsets = self._parts()
        zeros = (8.0 - offsets.float() / scales.float()).round().to(torch.int16)
        return QuantWeight(4, self.group_size, q.cpu(), scales.contiguous(), zeros, self.bias, self.perm)


class Int8Embedding(nn.Module):
    """A token embedding table kept as int8 rows, one power-of-two scale per row, dequantized at lookup.

    Used where a tied ``lm_head`` is quantized: the float table then serves the lookup only (the 2B's
    is 0.47 GB in bfloat16; this is 0.23 GB). Each row is ``q * 2**e`` with ``e`` the smallest
    exponent for which ``|q| <= 127``: at least 7 significant bits for the row's largest entries
    (error at most ``2**e / 2 <= absmax / 128`` per entry), and exact in bfloat16, float16 and
    float32, so a checkpoint stores the table as the lookup computes it and loading quantizes it back
    to the same integers.
    """

    def __init__(self, weight: torch.Tensor, chunk: int = 16384):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.dtype = weight.dtype
        q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scales = torch.empty(self.num_embeddings, dtype=torch.float32, device=weight.device)
        for start in range(0, self.num_embeddings, chunk):  # a float32 copy of a chunk at a time
            w = weight[start:start + chunk].detach().float()
            scale = torch.exp2(torch.ceil(torch.log2(w.abs().amax(-1, keepdim=True) / 127)).clamp(min=-126))
            q[start:start + chunk] = (w / scale).round()
            scales[start:start + chunk] = scale.view(-1)
        self.register_buffer("qweight", q)  # (V, H) int8
        self.register_buffer("scales", scales)  # (V,) float32 powers of two

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].to(self.dtype) * self.scales[ids].unsqueeze(-1).to(self.dtype)

    def table(self) -> torch.Tensor:
        """The whole table ``(V, H)`` as the lookup computes it (a checkpoint's ``embed_tokens.weight``)."""
        return self.qweight.to(self.dtype) * self.scales.unsqueeze(-1).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"


class ConcatLinear(nn.Module):
    """Quantized projections that read the same input, outputs concatenated: the fused q/k/v or
    gate/up of a GPTQ act-order checkpoint whose parts were permuted differently (one packed matrix
    cannot hold them)."""

    def __init__(self, parts: list[QuantLinear]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    """``(Np, K/2)`` uint8 in torch's CPU int4 layout -> ``(Np, K)`` uint8 values.

    The layout (checked once against torch's packer, see :func:`_check_int4_layout`): rows in
    blocks of 64; within a block, for each input column, 32 bytes whose low nibbles are rows 0-31
    and high nibbles rows 32-63.
    """
    n, half = packed.shape
    k = 2 * half
    b = packed.view(n // _BLOCK_N, k, _BLOCK_N // 2)  # (Np/64, K, 32)
    q = torch.cat([b & 15, b >> 4], dim=-1)  # (Np/64, K, 64)
    return q.permute(0, 2, 1).reshape(n, k).contiguous()


@functools.cache
def _check_int4_layout() -> None:
    probe = torch.randint(0, 16, (2 * _BLOCK_N, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    if not torch.equal(_unpack(torch._convert_weight_to_int4pack_for_cpu(probe, 1)).int(), probe):
        raise RuntimeError("this torch build packs int4 weights in an unknown layout; int4 weights cannot be "
                           "read back (saving a quantized checkpoint needs that)")


def build_linear(qw: QuantWeight, dtype: torch.dtype) -> QuantLinear:
    return Int8Linear(qw, dtype) if qw.bits == 8 else Int4Linear(qw, dtype)


def quantize_linear(linear: nn.Linear, scheme: str, group_size: int | None = None, sym: bool = True) -> QuantLinear:
    """``nn.Linear`` -> :class:`Int8Linear` (``"int8"``, per output row by default) or :class:`Int4Linear`
    (``"int4"``, group 64 by default)."""
    if scheme not in ("int8", "int4"):
        raise ValueError(f"unknown quantization scheme {scheme!r}; expected 'int8' or 'int4'")
    bits = 8 if scheme == "int8" else 4
    if bits == 4 and group_size is None:
        group_size = 64
    qw = quantize_weight(linear.weight, bits, group_size, sym, linear.bias)
    return build_linear(qw, linear.weight.dtype).to(linear.weight.device)
