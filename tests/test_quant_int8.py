"""The CPU int8 kernel (qwen2vl.quant.int8_cpu) and its fallback.

The kernel splits each input row into two int8 vectors (x ~ s1 q1 + s2 q2, as oneDNN's path does) and
sums the int8 weights times those integers exactly; so its output is the float64 product of the int8
weight with s1 q1 + s2 q2 to float32 rounding (checked at 1e-5 of the output's scale), and it differs
from the product with x itself by at most sum_k |w[n, k]| * s2 / 2 (tests/test_quant.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_quant import int8_split, tiny

from qwen2vl import Qwen2VL
from qwen2vl.quant import int8_cpu
from qwen2vl.quant.linear import Int8Linear
from qwen2vl.quant.weights import QuantWeight

needs_kernel = pytest.mark.skipif(not int8_cpu.available(), reason="int8 kernel not built or no AVX512-VNNI")


def random_qw(n, k, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(1, 256, (n, k), dtype=torch.uint8, generator=g)
    scales = torch.rand(n, 1, generator=g) * 0.02 + 1e-3
    b = torch.randn(n, generator=g) if bias else None
    return QuantWeight(8, k, q, scales, torch.full((n, 1), 128, dtype=torch.int16), b)


def split_product(x, module):
    """The float64 product of the rounded input ``s1 q1 + s2 q2`` with the module's int8 weight."""
    xr = sum(s.double() * q.double() for s, q in int8_split(x))
    return F.linear(xr, module._dequantize(torch.float64))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_the_float_product_of_the_split_input(dtype):
    # odd shapes: outputs not a multiple of 16, inputs not a multiple of 4 or 16, 1-9 rows (tiles of 4, 2, 1)
    for n, k, rows in ((1, 5, 1), (40, 130, 3), (333, 1536, 7), (17, 64, 9), (2048, 1536, 1), (16, 3, 2)):
        module = Int8Linear(random_qw(n, k, seed=n + k), dtype)
        assert module.kernel == "vnni" and module.qweight.dtype == torch.uint8
        x = (torch.randn(rows, k) * torch.rand(k) * 4).to(dtype)  # uneven channel sizes
        ref = split_product(x, module)
        y = module(x)
        assert y.shape == (rows, n) and y.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2 ** -8  # bfloat16: the output's own rounding
        torch.testing.assert_close(y.double(), ref, atol=tol * ref.abs().max().item(), rtol=tol)


@needs_kernel
def test_rows_are_independent_and_zero_rows_give_the_bias():
    module = Int8Linear(random_qw(50, 96, bias=True))
    x = torch.randn(6, 96)
    x[2] = 0
    y = module(x)
    assert torch.equal(y[2], module.bias)
    for i in range(6):  # the same numbers one row at a time (tiles of 4 and 2 rows vs 1)
        torch.testing.assert_close(module(x[i:i + 1]), y[i:i + 1], atol=1e-6, rtol=1e-6)
    assert module(torch.empty(0, 96)).shape == (0, 50)


@needs_kernel
def test_float16_input_goes_through_float32():
    module = Int8Linear(random_qw(24, 64), torch.float16)
    x = torch.randn(3, 64, dtype=torch.float16)
    y = module(x)
    assert y.dtype == torch.float16
    ref = split_product(x.float(), module)
    torch.testing.assert_close(y.double(), ref, atol=1e-3 * ref.abs().max().item(), rtol=1e-3)


def test_layout_reads_back_and_matches_the_fallback(monkeypatch):
    qw = random_qw(333, 130, bias=True)
    fast = Int8Linear(qw)
    monkeypatch.setattr(int8_cpu, "available", lambda: False)
    slow = Int8Linear(qw)  # oneDNN's packed weight (333 >= ONEDNN_MIN_OUT outputs), or plain int8
    assert slow.kernel != "vnni"
    for module in (fast, slow):
        back = module.quant_weight()
        assert torch.equal(back.q, qw.q) and torch.equal(back.scales, qw.scales) and torch.equal(back.zeros, qw.zeros)
    x = torch.randn(4, 130)
    ref = split_product(x, fast) + qw.bias.double()
    tol = 1e-5 if slow.kernel == "onednn" else 1e-2  # weight-only int8 without the split: float inputs
    torch.testing.assert_close(slow(x).double(), ref, atol=tol * ref.abs().max().item(), rtol=0)
    torch.testing.assert_close(fast(x).double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=0)


def test_env_switch_and_failed_build_fall_back(monkeypatch):
    monkeypatch.setenv("QWEN2VL_INT8_KERNEL", "onednn")
    assert int8_cpu.available.__wrapped__() is False
    monkeypatch.delenv("QWEN2VL_INT8_KERNEL")
    monkeypatch.setattr(int8_cpu, "SOURCE", "#error no compiler here\n")
    monkeypatch.setattr("torch.utils.cpp_extension.load_inline",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("error: build failed")))
    with pytest.warns(UserWarning, match="int8 VNNI kernel was not built"):
        assert int8_cpu.available.__wrapped__() is False


@needs_kernel
def test_kernel_refuses_bad_inputs_by_name():
    module = Int8Linear(random_qw(32, 64))
    with pytest.raises(RuntimeError, match="qweight must be uint8"):
        int8_cpu.matmul(torch.randn(2, 60), module.qweight, module.row_scales, 32)
    with pytest.raises(RuntimeError, match="out_features"):
        int8_cpu.matmul(torch.randn(2, 64), module.qweight, module.row_scales, 40)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        int8_cpu.matmul(torch.randn(2, 64, dtype=torch.float16), module.qweight, module.row_scales, 32)


@pytest.mark.parametrize("kernel", ["vnni", "onednn"])
def test_checkpoint_round_trip_across_kernels(tmp_path, monkeypatch, kernel):
    """Saved with one kernel's layout, loaded with the other's: the same integers and logits."""
    if kernel == "vnni" and not int8_cpu.available():
        pytest.skip("int8 kernel not built or no AVX512-VNNI")
    model = tiny().quantize("int8")
    model.save_pretrained(tmp_path)
    if kernel == "onednn":
        monkeypatch.setattr(int8_cpu, "available", lambda: False)
    loaded = Qwen2VL.from_pretrained(tmp_path)
    layers = [(a, b) for a, b in zip(model.modules(), loaded.modules(), strict=True) if isinstance(a, Int8Linear)]
    assert layers and all(torch.equal(a.int8_weight(), b.int8_weight()) for a, b in layers)
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=1e-4, rtol=1e-4)
