"""The CPU int4 kernel: 4-bit weights times int8 activations in integer dot products (AVX512-VNNI).

At batch-1 decode torch's ``_weight_int4pack_mm_for_cpu`` (float activations) is bound by its
arithmetic, not by the memory it reads: at 2 threads it read the 2B's weights at 43 % of the
bandwidth here. This kernel does what llama.cpp's Q4_0 x Q8_0 dot product does: each input row is
rounded to int8 in blocks of 32 columns, one float scale per block (``s_b = absmax / 127``,
``xq = round(x / s_b)``), and the 4-bit weights meet the int8 activations in ``vpdpbusd`` (4 products
summed into int32 per lane). Per output ``n``, group ``g`` of the weight (32/64/128/256 inputs,
scale ``S[n, g]``, offset ``O[n, g]``; the weight is ``(q - 8) * S + O``) and block ``b`` of 32 inputs:

    y[m, n] = sum_g S[n, g] * sum_{b in g} s_b * (sum_{k in b} q[n, k] * xq[m, k] - 8 * sum_{k in b} xq[m, k])
              + O[n, g] * sum_{b in g} s_b * sum_{k in b} xq[m, k]

The integer sums are exact; the float sums are in float32. So the result is the float product of the
dequantized weight with the rounded input ``s_b * xq`` (to float32 rounding), and differs from the
product with ``x`` itself by at most ``sum_k |w[n, k]| * s_b(k) / 2`` (tested).

Layout (``pack``): output rows in blocks of 16; per block, for every 8 input columns, 64 bytes: byte
``4 r + i`` holds row ``r``'s column ``8 c + i`` in its low nibble and ``8 c + 4 + i`` in its high
nibble (i < 4), so one 64-byte load feeds two ``vpdpbusd`` (16 rows x 4 columns each). Scales and
offsets: ``(N/16, G, 16)``. Output rows are split over threads (``at::parallel_for``); input rows
go 4 (then 2, then 1) at a time over each block of weights, which stays in the core's cache.

The C++ source is compiled at first use with ``torch.utils.cpp_extension.load_inline`` (cached by
torch under ``~/.cache/torch_extensions``) and registers ``torch.ops.qwen2vl.int4_mm``, which
``torch.compile`` treats as opaque (a fake implementation gives its output shape). Without a
compiler, on a CPU without AVX512-VNNI, or with ``QWEN2VL_INT4_KERNEL=aten``, :func:`available` is
False and :class:`~qwen2vl.quant.linear.Int4Linear` keeps torch's kernel and layout.
"""

from __future__ import annotations

import functools
import os

import torch

from .cpu_kernel import build

BLOCK_N = 16  # output rows per block of the layout
ACT_BLOCK = 32  # input columns per int8 activation scale
DTYPES = (torch.float32, torch.bfloat16)  # what the kernel takes and returns (x, scales, offsets, output)

SOURCE = r"""
namespace {  // after cpu_kernel.PRELUDE

constexpr int64_t QB = 32;  // activation block
// weight bytes read ahead (the thread's rows are one contiguous stream): 2B gate/up at 2 threads,
// from memory, 715 -> 689 us per call (no prefetch -> 4096 bytes; 512-2048 were no better)
constexpr int64_t PREFETCH = 4096;

VNNI inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
VNNI inline __m512 load16(const bf16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Row m of x (M, K) -> xq (M, K) int8, xs and xsum (M, K/32) per block, xg (M, G) = sum over a group's
// blocks of xs * xsum. q = round_half_even(x / s), s = absmax / 127 in float32 (what torch.round(x / s) gives).
template <typename T>
VNNI void quantize_row(const T* x, int64_t m, int64_t K, int64_t gs, int8_t* xq, float* xs, int32_t* xsum, float* xg) {
  const int64_t KB = K / QB, G = K / gs, per = gs / QB;
  const __m512 sign = _mm512_set1_ps(-0.f);
  for (int64_t b = 0; b < KB; b++) {
    const int64_t i = m * K + b * QB;
    const __m512 v0 = load16(x + i), v1 = load16(x + i + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1)));
    const float s = amax / 127.f;
    __m512i q0 = _mm512_setzero_si512(), q1 = _mm512_setzero_si512();
    if (s > 0.f) {
      const __m512 d = _mm512_set1_ps(s);
      q0 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_div_ps(v0, d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      q1 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_div_ps(v1, d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + i), _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + i + 16), _mm512_cvtsepi32_epi8(q1));
    xs[m * KB + b] = s;
    xsum[m * KB + b] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
  }
  for (int64_t g = 0; g < G; g++) {
    float t = 0.f;
    for (int64_t b = g * per; b < (g + 1) * per; b++) t += xs[m * KB + b] * static_cast<float>(xsum[m * KB + b]);
    xg[m * G + g] = t;
  }
}

// MT input rows from m0 times one block of 16 output rows (weights w, scales sc, offsets off or null)
template <int MT, typename T>
VNNI void tile(const uint8_t* w, const T* sc, const T* off, int64_t K, int64_t gs, int64_t m0,
               const int8_t* xq, const float* xs, const int32_t* xsum, const float* xg,
               T* out, int64_t N, int64_t n0) {
  const int64_t KB = K / QB, G = K / gs, per = gs / QB;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[MT];
  for (int m = 0; m < MT; m++) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g++) {
    __m512 gacc[MT];
    for (int m = 0; m < MT; m++) gacc[m] = _mm512_setzero_ps();
    for (int64_t b = g * per; b < (g + 1) * per; b++) {
      const uint8_t* wb = w + b * 256;  // 4 chunks of 64 bytes: 32 columns x 16 rows
      __m512i ia[MT], ib[MT];
      for (int m = 0; m < MT; m++) { ia[m] = _mm512_setzero_si512(); ib[m] = _mm512_setzero_si512(); }
      for (int c = 0; c < 4; c++) {
        _mm_prefetch(reinterpret_cast<const char*>(wb + c * 64 + PREFETCH), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(wb + c * 64);
        const __m512i lo = _mm512_and_si512(v, low);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        for (int m = 0; m < MT; m++) {
          const int8_t* xp = xq + (m0 + m) * K + b * QB + c * 8;
          ia[m] = _mm512_dpbusd_epi32(ia[m], lo, _mm512_set1_epi32(word(xp)));
          ib[m] = _mm512_dpbusd_epi32(ib[m], hi, _mm512_set1_epi32(word(xp + 4)));
        }
      }
      for (int m = 0; m < MT; m++) {
        const int64_t i = (m0 + m) * KB + b;
        const __m512i t = _mm512_sub_epi32(_mm512_add_epi32(ia[m], ib[m]), _mm512_set1_epi32(8 * xsum[i]));
        gacc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(xs[i]), gacc[m]);
      }
    }
    const __m512 s = load16(sc + g * 16);
    for (int m = 0; m < MT; m++) acc[m] = _mm512_fmadd_ps(gacc[m], s, acc[m]);
    if (off != nullptr) {
      const __m512 o = load16(off + g * 16);
      for (int m = 0; m < MT; m++) acc[m] = _mm512_fmadd_ps(o, _mm512_set1_ps(xg[(m0 + m) * G + g]), acc[m]);
    }
  }
  const int64_t left = N - n0;
  const __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
  for (int m = 0; m < MT; m++) store16(out + (m0 + m) * N + n0, acc[m], mask);
}

template <typename T>
void run(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const T* off,
         int64_t gs, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1), NB = qweight.size(0), G = K / gs;
  auto xq = at::empty({M, K}, x.options().dtype(at::kChar));
  auto xs = at::empty({M, K / QB}, x.options().dtype(at::kFloat));
  auto xsum = at::empty({M, K / QB}, x.options().dtype(at::kInt));
  auto xg = at::empty({M, G}, x.options().dtype(at::kFloat));
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; m++)
      quantize_row<T>(x.data_ptr<T>(), m, K, gs, xq.data_ptr<int8_t>(), xs.data_ptr<float>(), xsum.data_ptr<int32_t>(),
                      xg.data_ptr<float>());
  });
  const uint8_t* w = qweight.data_ptr<uint8_t>();
  const T* sc = scales.data_ptr<T>();
  const int8_t* pq = xq.data_ptr<int8_t>();
  const float* ps = xs.data_ptr<float>();
  const int32_t* pz = xsum.data_ptr<int32_t>();
  const float* pg = xg.data_ptr<float>();
  T* po = out.data_ptr<T>();
  at::parallel_for(0, NB, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; nb++) {
      const uint8_t* wn = w + nb * K * 8;
      const T* sn = sc + nb * G * 16;
      const T* on = off == nullptr ? nullptr : off + nb * G * 16;
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) tile<4, T>(wn, sn, on, K, gs, m, pq, ps, pz, pg, po, N, nb * 16);
      for (; m + 2 <= M; m += 2) tile<2, T>(wn, sn, on, K, gs, m, pq, ps, pz, pg, po, N, nb * 16);
      for (; m < M; m++) tile<1, T>(wn, sn, on, K, gs, m, pq, ps, pz, pg, po, N, nb * 16);
    }
  });
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                   const std::optional<at::Tensor>& offsets, int64_t group_size, int64_t out_features) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "int4_mm: x must be a contiguous 2-D CPU tensor");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(group_size % QB == 0 && K % group_size == 0, "int4_mm: group_size ", group_size,
              " must be a multiple of 32 dividing in_features ", K);
  const int64_t NB = qweight.size(0), G = K / group_size;
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous() && qweight.dim() == 3 &&
              qweight.size(1) == K / 8 && qweight.size(2) == 64, "int4_mm: qweight must be uint8 (N/16, K/8, 64)");
  TORCH_CHECK(out_features <= NB * 16 && out_features > (NB - 1) * 16, "int4_mm: out_features ", out_features,
              " does not fit ", NB, " blocks of 16 rows");
  TORCH_CHECK(scales.scalar_type() == x.scalar_type() && scales.is_contiguous() &&
              scales.sizes() == at::IntArrayRef({NB, G, 16}), "int4_mm: scales must be (N/16, G, 16) in x's dtype");
  const bool has_off = offsets.has_value() && offsets->defined();
  if (has_off)
    TORCH_CHECK(offsets->scalar_type() == x.scalar_type() && offsets->is_contiguous() && offsets->sizes() == scales.sizes(),
                "int4_mm: offsets must match scales");
  auto out = at::empty({M, out_features}, x.options());
  if (M == 0) return out;
  if (x.scalar_type() == at::kFloat) {
    run<float>(x, qweight, scales, has_off ? offsets->data_ptr<float>() : nullptr, group_size, out);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "int4_mm: x must be float32 or bfloat16");
    run<bf16>(x, qweight, scales, has_off ? offsets->data_ptr<bf16>() : nullptr, group_size, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(qwen2vl_int4, m) {
  m.def("int4_mm(Tensor x, Tensor qweight, Tensor scales, Tensor? offsets, int group_size, int out_features) -> Tensor");
  m.def("supported() -> bool");
}

TORCH_LIBRARY_IMPL(qwen2vl_int4, CPU, m) { m.impl("int4_mm", &int4_mm); }
TORCH_LIBRARY_IMPL(qwen2vl_int4, CompositeExplicitAutograd, m) { m.impl("supported", &vnni_supported); }
"""


@functools.cache
def available() -> bool:
    """True when the kernel is built (at the first call) and this CPU runs it."""
    if os.environ.get("QWEN2VL_INT4_KERNEL", "").lower() == "aten":
        return False
    return build("qwen2vl_int4_cpu", SOURCE, "qwen2vl_int4::int4_mm",
                 lambda x, qweight, scales, offsets, group_size, out_features: x.new_empty((x.shape[0], out_features)),
                 "the int8-activation int4 kernel", "int4 layers use torch._weight_int4pack_mm_for_cpu")


def matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
           group_size: int, out_features: int) -> torch.Tensor:
    """``x (M, K)`` (float32 or bfloat16, as ``scales``) times the packed weight -> ``(M, out_features)``."""
    return torch.ops.qwen2vl_int4.int4_mm(x.contiguous(), qweight, scales, offsets, group_size, out_features)


def pack(q: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` values in [0, 16), N a multiple of 16 -> ``(N/16, K/8, 64)`` uint8 (module docstring)."""
    n, k = q.shape
    v = q.to(torch.uint8).view(n // BLOCK_N, BLOCK_N, k // 8, 2, 4)  # (NB, r, c, half, i)
    v = v.permute(0, 2, 1, 4, 3)  # (NB, c, r, i, half)
    return (v[..., 0] | (v[..., 1] << 4)).reshape(n // BLOCK_N, k // 8, 64).contiguous()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack`: ``(N/16, K/8, 64)`` -> ``(N, K)`` uint8."""
    nb, c, _ = packed.shape
    b = packed.view(nb, c, BLOCK_N, 4)  # (NB, c, r, i)
    v = torch.stack([b & 15, b >> 4], dim=-1)  # (NB, c, r, i, half)
    return v.permute(0, 2, 1, 4, 3).reshape(nb * BLOCK_N, c * 8).contiguous()


def block_rows(t: torch.Tensor) -> torch.Tensor:
    """Per-row, per-group values ``(N, G)``, N a multiple of 16 -> the kernel's ``(N/16, G, 16)``."""
    n, g = t.shape
    return t.view(n // BLOCK_N, BLOCK_N, g).transpose(1, 2).contiguous()


def unblock_rows(t: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`block_rows`."""
    nb, g, _ = t.shape
    return t.transpose(1, 2).reshape(nb * BLOCK_N, g)
