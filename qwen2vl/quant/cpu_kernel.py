"""What the CPU kernels (:mod:`.int4_cpu`, :mod:`.int8_cpu`) share: a C++ prelude and the build.

:data:`PRELUDE` opens each kernel's source: the headers, the ``VNNI`` target attribute, ``bf16``,
``store16`` (16 float32 lanes to float32 or to bfloat16, rounded to nearest even, NaN kept), ``word``
(4 int8 values as one int32, what ``vpdpbusd`` broadcasts) and ``vnni_supported()`` (the CPU check each
library registers as its ``supported`` op). :func:`build` compiles a kernel at first use with
``torch.utils.cpp_extension.load_inline`` (cached by torch) and falls back with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

PRELUDE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

#define VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))
using bf16 = at::BFloat16;

VNNI inline void store16(float* p, __m512 v, __mmask16 k) { _mm512_mask_storeu_ps(p, k, v); }
VNNI inline void store16(bf16* p, __m512 v, __mmask16 k) {  // round to nearest even, NaN kept
  __m512i b = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  b = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  b = _mm512_mask_mov_epi32(b, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(b));
}

inline int32_t word(const int8_t* p) { int32_t v; std::memcpy(&v, p, 4); return v; }

bool vnni_supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

}  // namespace
"""


def build(name: str, source: str, op: str, fake: Callable, what: str, fallback: str,
          cflags: tuple[str, ...] = ()) -> bool:
    """Compile ``PRELUDE + source`` as extension ``name`` and give ``op`` (``"library::name"``) its fake
    (the output's shape, for ``torch.compile``). True when it built and this CPU runs it (the library's
    ``supported`` op); False, with a warning naming ``what``, the compiler's reason and ``fallback``,
    when it did not build."""
    try:
        from torch.utils.cpp_extension import load_inline
        load_inline(name, PRELUDE + source, is_python_module=False, no_implicit_headers=True,
                    extra_cflags=["-O3", "-std=c++17", "-fopenmp", *cflags], extra_ldflags=["-fopenmp"])
    except Exception as e:  # noqa: BLE001 - no compiler, failed build: the fallback serves
        lines = str(e).strip().splitlines() or [""]
        reason = next((line for line in lines if "error" in line.lower()), lines[-1])
        warnings.warn(f"{what} was not built ({type(e).__name__}: {reason}); {fallback}", stacklevel=3)
        return False
    torch.library.register_fake(op)(fake)
    return bool(getattr(torch.ops, op.split("::")[0]).supported())
