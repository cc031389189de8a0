"""The CPU int8 kernel: int8 weights (one scale per output row) times int8 activations (AVX512-VNNI).

Each input row ``x`` goes in as two int8 vectors, its rounding and the rounding of what is left
(the numbers of :func:`qwen2vl.quant.linear.int8_matmul`, oneDNN's path):
``s1 = absmax(x) / 127``, ``q1 = round(x / s1)``, ``r = x - s1 * q1``, ``s2 = absmax(r) / 127``,
``q2 = round(r / s2)``, all in float32 (round half to even), so ``x = s1 q1 + s2 q2 + e`` with
``|e| <= s2 / 2`` (about 15 bits). The weight is kept as ``u = q + 128`` (uint8, GPTQ's stored
values) and meets the activations in ``vpdpbusd`` (16 output rows x 4 columns per instruction);
per output ``n`` with row scale ``S[n]``:

    y[m, n] = S[n] * (s1 * (sum_k u[n, k] q1[k] - 128 sum_k q1[k]) + s2 * (sum_k u[n, k] q2[k] - 128 sum_k q2[k]))

The integer sums are exact (int32: ``255 * 127 * K`` fits for ``K < 66000``); the rest is float32.
So the result is the float product of the int8 weight with ``s1 q1 + s2 q2`` to float32 rounding,
as oneDNN's. At decode both vectors go over each 64-byte load of weights together: the weight is read
once, at close to the memory bandwidth (oneDNN's kernel read the 2B at about 56 % of it at 2 threads).

Layout (:func:`pack`): output rows in blocks of 16 (padded with zero weights), input columns padded to a
multiple of 4; per block and 4 columns, 64 bytes: byte ``4 r + i`` is row ``r``'s column ``4 c + i``.
Output rows are split over threads (``at::parallel_for``) in pairs of blocks (each broadcast input word
feeds both); input rows go 4 (then 2, then 1) at a time over them, while they stay in the core's cache.

Built at first use with ``torch.utils.cpp_extension.load_inline`` (cached by torch); registers
``torch.ops.qwen2vl_int8.int8_mm``, opaque to ``torch.compile`` (a fake gives its shape). Without a
compiler, on a CPU without AVX512-VNNI, or with ``QWEN2VL_INT8_KERNEL=onednn``, :func:`available` is
False and :class:`~qwen2vl.quant.linear.Int8Linear` keeps oneDNN's path.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from .cpu_kernel import build

BLOCK_N = 16  # output rows per block of the layout
DTYPES = (torch.float32, torch.bfloat16)  # what the kernel takes and returns (x, output)
MAX_K = 66000  # int32 sums stay exact below this many inputs

SOURCE = r"""
namespace {  // after cpu_kernel.PRELUDE

constexpr int64_t PREFETCH = 4096;  // weight bytes read ahead, as in the int4 kernel

VNNI inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
VNNI inline __m512 load16(const bf16* p, __mmask16 k) {
  __m256i h = _mm256_maskz_loadu_epi16(k, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __mmask16 tail(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

VNNI inline __m512i round_div(__m512 v, float s) {
  return _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_div_ps(v, _mm512_set1_ps(s)),
                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// Row m of x (M, K) -> rows 2m, 2m+1 of xq (2M, Kp) int8 (q1, q2; columns K..Kp zero), their scales
// xs (2M) and sums xsum (2M); rest (K) float32 scratch. As torch computes it: s = max(absmax, 1e-30) / 127,
// q = round_half_even(x / s), rest = x - q * s (no fused multiply-add: built with -ffp-contract=off).
template <typename T>
VNNI void split_row(const T* x, int64_t K, int64_t Kp, int8_t* xq, float* xs, int32_t* xsum, float* rest) {
  const __m512 sign = _mm512_set1_ps(-0.f);
  std::memset(xq, 0, 2 * Kp);
  float amax = 0.f;
  for (int64_t k = 0; k < K; k += 16)
    amax = std::max(amax, _mm512_reduce_max_ps(_mm512_andnot_ps(sign, load16(x + k, tail(K - k)))));
  const float s1 = std::max(amax, 1e-30f) / 127.f;
  __m512i sum = _mm512_setzero_si512();
  float amax2 = 0.f;
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 t = tail(K - k);
    const __m512 v = load16(x + k, t);
    const __m512i q = round_div(v, s1);
    const __m512 r = _mm512_sub_ps(v, _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(s1)));
    _mm512_mask_storeu_ps(rest + k, t, r);
    amax2 = std::max(amax2, _mm512_reduce_max_ps(_mm512_andnot_ps(sign, r)));
    _mm_mask_storeu_epi8(xq + k, t, _mm512_cvtsepi32_epi8(q));
    sum = _mm512_add_epi32(sum, q);
  }
  xs[0] = s1;
  xsum[0] = _mm512_reduce_add_epi32(sum);
  const float s2 = std::max(amax2, 1e-30f) / 127.f;
  sum = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 t = tail(K - k);
    const __m512i q = round_div(_mm512_maskz_loadu_ps(t, rest + k), s2);
    _mm_mask_storeu_epi8(xq + Kp + k, t, _mm512_cvtsepi32_epi8(q));
    sum = _mm512_add_epi32(sum, q);
  }
  xs[1] = s2;
  xsum[1] = _mm512_reduce_add_epi32(sum);
}

// MT int8 rows from r0 (MT / 2 input rows) times NW blocks of 16 output rows from n0 (weights w, row
// scales sc): each broadcast of 4 input bytes feeds NW multiply-adds
template <int MT, int NW, typename T>
VNNI void tile(const uint8_t* w, const float* sc, int64_t Kp, int64_t r0, const int8_t* xq, const float* xs,
               const int32_t* xsum, T* out, int64_t N, int64_t n0) {
  const int64_t bs = Kp * 16;  // bytes per block of 16 rows
  __m512i dot[NW][MT];
  for (int j = 0; j < NW; j++)
    for (int m = 0; m < MT; m++) dot[j][m] = _mm512_setzero_si512();
  for (int64_t c = 0; c < Kp / 4; c++) {
    __m512i v[NW];
    for (int j = 0; j < NW; j++) {
      _mm_prefetch(reinterpret_cast<const char*>(w + j * bs + c * 64 + PREFETCH), _MM_HINT_T0);
      v[j] = _mm512_loadu_si512(w + j * bs + c * 64);
    }
    for (int m = 0; m < MT; m++) {
      const __m512i a = _mm512_set1_epi32(word(xq + (r0 + m) * Kp + c * 4));
      for (int j = 0; j < NW; j++) dot[j][m] = _mm512_dpbusd_epi32(dot[j][m], v[j], a);
    }
  }
  for (int j = 0; j < NW; j++) {
    const __mmask16 mask = tail(N - n0 - 16 * j);
    const __m512 s = _mm512_loadu_ps(sc + 16 * j);
    for (int m = 0; m < MT; m += 2) {
      __m512 acc = _mm512_setzero_ps();
      for (int h = 0; h < 2; h++) {
        const int64_t r = r0 + m + h;
        const __m512i t = _mm512_sub_epi32(dot[j][m + h], _mm512_set1_epi32(128 * xsum[r]));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(xs[r]), acc);
      }
      store16(out + (r0 + m) / 2 * N + n0 + 16 * j, _mm512_mul_ps(acc, s), mask);
    }
  }
}

template <int NW, typename T>
void tiles(const uint8_t* w, const float* sc, int64_t Kp, int64_t M, const int8_t* xq, const float* xs,
           const int32_t* xsum, T* out, int64_t N, int64_t n0) {
  int64_t r = 0;
  for (; r + 8 <= 2 * M; r += 8) tile<8, NW, T>(w, sc, Kp, r, xq, xs, xsum, out, N, n0);
  for (; r + 4 <= 2 * M; r += 4) tile<4, NW, T>(w, sc, Kp, r, xq, xs, xsum, out, N, n0);
  for (; r < 2 * M; r += 2) tile<2, NW, T>(w, sc, Kp, r, xq, xs, xsum, out, N, n0);
}

template <typename T>
void run(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1), NB = qweight.size(0), Kp = qweight.size(1) * 4;
  auto xq = at::empty({2 * M, Kp}, x.options().dtype(at::kChar));
  auto xs = at::empty({2 * M}, x.options().dtype(at::kFloat));
  auto xsum = at::empty({2 * M}, x.options().dtype(at::kInt));
  const T* px = x.data_ptr<T>();
  int8_t* pq = xq.data_ptr<int8_t>();
  float* ps = xs.data_ptr<float>();
  int32_t* pz = xsum.data_ptr<int32_t>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> rest(K);
    for (int64_t m = begin; m < end; m++) split_row<T>(px + m * K, K, Kp, pq + 2 * m * Kp, ps + 2 * m, pz + 2 * m, rest.data());
  });
  const uint8_t* w = qweight.data_ptr<uint8_t>();
  const float* sc = scales.data_ptr<float>();
  T* po = out.data_ptr<T>();
  at::parallel_for(0, (NB + 1) / 2, 1, [&](int64_t begin, int64_t end) {  // pairs of blocks
    for (int64_t p = begin; p < end; p++) {
      const int64_t nb = 2 * p;
      if (nb + 1 < NB) tiles<2, T>(w + nb * Kp * 16, sc + nb * 16, Kp, M, pq, ps, pz, po, N, nb * 16);
      else tiles<1, T>(w + nb * Kp * 16, sc + nb * 16, Kp, M, pq, ps, pz, po, N, nb * 16);
    }
  });
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t out_features) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "int8_mm: x must be a contiguous 2-D CPU tensor");
  const int64_t M = x.size(0), K = x.size(1), NB = qweight.size(0);
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous() && qweight.dim() == 3 &&
              qweight.size(1) == (K + 3) / 4 && qweight.size(2) == 64, "int8_mm: qweight must be uint8 (N/16, ceil(K/4), 64)");
  TORCH_CHECK(K < 66000, "int8_mm: in_features ", K, " too large for exact int32 sums");
  TORCH_CHECK(out_features <= NB * 16 && out_features > (NB - 1) * 16, "int8_mm: out_features ", out_features,
              " does not fit ", NB, " blocks of 16 rows");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == NB * 16,
              "int8_mm: scales must be float32 (N/16 * 16,)");
  auto out = at::empty({M, out_features}, x.options());
  if (M == 0) return out;
  if (x.scalar_type() == at::kFloat) {
    run<float>(x, qweight, scales, out);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "int8_mm: x must be float32 or bfloat16");
    run<bf16>(x, qweight, scales, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(qwen2vl_int8, m) {
  m.def("int8_mm(Tensor x, Tensor qweight, Tensor scales, int out_features) -> Tensor");
  m.def("supported() -> bool");
}

TORCH_LIBRARY_IMPL(qwen2vl_int8, CPU, m) { m.impl("int8_mm", &int8_mm); }
TORCH_LIBRARY_IMPL(qwen2vl_int8, CompositeExplicitAutograd, m) { m.impl("supported", &vnni_supported); }
"""


@functools.cache
def available() -> bool:
    """True when the kernel is built (at the first call) and this CPU runs it."""
    if os.environ.get("QWEN2VL_INT8_KERNEL", "").lower() == "onednn":
        return False
    return build("qwen2vl_int8_cpu", SOURCE, "qwen2vl_int8::int8_mm",
                 lambda x, qweight, scales, out_features: x.new_empty((x.shape[0], out_features)),
                 "the int8 VNNI kernel", "int8 layers use oneDNN's kernel", cflags=("-ffp-contract=off",))


def matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x (M, K)`` float32 or bfloat16 times the packed weight -> ``(M, out_features)`` in x's dtype."""
    return torch.ops.qwen2vl_int8.int8_mm(x.contiguous(), qweight, scales, out_features)


def pack(q: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` int8 values -> ``(ceil(N/16), ceil(K/4), 64)`` uint8 ``q + 128``, padded with zero weights."""
    n, k = q.shape
    u = F.pad((q.to(torch.int16) + 128).to(torch.uint8), (0, -k % 4, 0, -n % BLOCK_N), value=128)
    nb, c = u.shape[0] // BLOCK_N, u.shape[1] // 4
    return u.view(nb, BLOCK_N, c, 4).transpose(1, 2).reshape(nb, c, 64).contiguous()


def unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the int8 values ``(N, K)``."""
    nb, c, _ = packed.shape
    u = packed.view(nb, c, BLOCK_N, 4).transpose(1, 2).reshape(nb * BLOCK_N, c * 4)[:n, :k]
    return (u.to(torch.int16) - 128).to(torch.int8).contiguous()
