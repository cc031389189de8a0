"""The CPU int4 kernel with int8 activations (qwen2vl.quant.int4_cpu) and its fallback.

The kernel rounds each input row to int8 in blocks of 32 columns (scale absmax / 127) and sums the
4-bit weights times those integers exactly; so its output is the float64 product of the dequantized
weight with the rounded input to float32 rounding (checked at 1e-5 of the output's scale), and it
differs from the product with the input itself by at most sum_k |w[n, k]| * s_b(k) / 2.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_quant import int8_blocks, tiny
from torch import nn

from qwen2vl import Qwen2VL
from qwen2vl.quant import int4_cpu
from qwen2vl.quant.linear import Int4Linear, Int8Embedding, QuantLinear, quantize_linear
from qwen2vl.quant.weights import QuantWeight

needs_kernel = pytest.mark.skipif(not int4_cpu.available(), reason="int4 kernel not built or no AVX512-VNNI")


def random_qw(n, k, group, sym=True, perm=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scales = torch.rand(n, k // group, generator=g) * 0.02 + 1e-3
    zeros = (torch.full((n, k // group), 8, dtype=torch.int16) if sym
             else torch.randint(1, 16, (n, k // group), dtype=torch.int16, generator=g))
    return QuantWeight(4, group, q, scales, zeros, None, torch.randperm(k, generator=g) if perm else None)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("sym", [True, False])
def test_kernel_equals_the_float_product_of_the_rounded_input(dtype, group, sym):
    for n, rows in ((1, 1), (40, 3), (200, 7), (16, 9)):  # odd row counts: tiles of 4, 2 and 1; partial blocks
        qw = random_qw(n, 512, group, sym, seed=n)
        module = Int4Linear(qw, dtype)
        assert module.kernel == "vnni" and (module.offsets is None) == sym
        x = torch.randn(rows, 512, dtype=dtype) * torch.rand(512, dtype=dtype) * 4  # uneven channel sizes
        ref = F.linear(int8_blocks(x), module._dequantize(torch.float64))  # its scales, rounded to dtype
        y = module(x)
        assert y.shape == (rows, n) and y.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2 ** -8  # bfloat16: the output's own rounding
        torch.testing.assert_close(y.double(), ref, atol=tol * ref.abs().max().item(), rtol=tol)


@needs_kernel
@pytest.mark.parametrize("group", [32, 256])
def test_kernel_error_is_within_the_activation_rounding_bound(group):
    qw = random_qw(96, 1024, group)
    module = Int4Linear(qw)
    x = torch.randn(5, 1024) * torch.rand(1024) * 4
    w = qw.dequantize(torch.float64)
    exact = F.linear(x.double(), w)
    s = x.unflatten(-1, (-1, 32)).abs().amax(-1).double() / 127  # (rows, K/32)
    bound = (s.repeat_interleave(32, dim=-1) / 2) @ w.abs().t()  # (rows, N)
    err = (module(x).double() - exact).abs()
    assert bool((err <= bound * (1 + 1e-4) + 1e-5 * exact.abs().max()).all())
    assert err.max() > 0  # the input is rounded (not the float product)


@needs_kernel
def test_rows_are_independent_and_zero_rows_are_exact():
    """Each input row is rounded on its own: a row gives the same bits alone or among others, in
    any of the kernel's row tiles; an all-zero row gives zeros."""
    module = Int4Linear(random_qw(72, 256, 64, sym=False), torch.bfloat16)
    x = torch.randn(11, 256, dtype=torch.bfloat16)
    x[3] = 0
    together = module(x)
    assert torch.equal(torch.cat([module(x[i:i + 1]) for i in range(11)]), together)
    assert torch.equal(together[3], torch.zeros(72, dtype=torch.bfloat16))
    assert module(x[:0]).shape == (0, 72)


@needs_kernel
def test_act_order_permutes_the_input_before_rounding():
    qw = random_qw(48, 256, 32, perm=True)
    module = Int4Linear(qw)
    x = torch.randn(3, 256)
    xp = int8_blocks(x[:, qw.perm])  # the module rounds the permuted input
    w_sorted = qw.dequantize(torch.float64)[:, qw.perm]  # columns in the order of the packed weight
    ref = F.linear(xp, w_sorted)
    torch.testing.assert_close(module(x).double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=0)


@needs_kernel
def test_layout_reads_back_and_matches_the_fallback(monkeypatch):
    qw = random_qw(40, 192, 64, sym=False)
    assert torch.equal(int4_cpu.unpack(int4_cpu.pack(F.pad(qw.q, (0, 0, 0, 8)))), F.pad(qw.q, (0, 0, 0, 8)))
    fast = Int4Linear(qw)
    monkeypatch.setattr(int4_cpu, "available", lambda: False)
    slow = Int4Linear(qw)
    assert slow.kernel == "aten" and fast.kernel == "vnni"
    for module in (fast, slow):
        back = module.quant_weight()
        assert torch.equal(back.q, qw.q) and torch.equal(back.zeros, qw.zeros)
        torch.testing.assert_close(back.scales, qw.scales)
        torch.testing.assert_close(module._dequantize(torch.float64), qw.dequantize(torch.float64))
    x = torch.randn(2, 192)
    torch.testing.assert_close(fast(x), slow(x), atol=2e-2 * slow(x).abs().max().item(), rtol=0)


def test_fallback_is_torchs_kernel_with_float_inputs(monkeypatch):
    monkeypatch.setattr(int4_cpu, "available", lambda: False)
    linear = nn.Linear(128, 40)
    module = quantize_linear(linear, "int4", 32)
    assert module.kernel == "aten"
    x = torch.randn(3, 128)
    ref = F.linear(x.double(), module.quant_weight().dequantize(torch.float64), linear.bias.double())
    torch.testing.assert_close(module(x).double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=0)


def test_env_switch_and_failed_build_fall_back(monkeypatch):
    monkeypatch.setenv("QWEN2VL_INT4_KERNEL", "aten")
    assert int4_cpu.available.__wrapped__() is False

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'qwen2vl_int4_cpu': c++: command not found")
    monkeypatch.delenv("QWEN2VL_INT4_KERNEL")
    monkeypatch.setattr("torch.utils.cpp_extension.load_inline", no_compiler)
    with pytest.warns(UserWarning, match="command not found"):
        assert int4_cpu.available.__wrapped__() is False


@needs_kernel
def test_kernel_refuses_bad_inputs_by_name():
    module = Int4Linear(random_qw(32, 128, 64))
    with pytest.raises(RuntimeError, match="scales must be"):
        int4_cpu.matmul(torch.randn(1, 128, dtype=torch.bfloat16), module.qweight, module.scales, None, 64, 32)
    with pytest.raises(RuntimeError, match="out_features 40"):
        int4_cpu.matmul(torch.randn(1, 128), module.qweight, module.scales, None, 64, 40)


@pytest.mark.parametrize("kernel", ["vnni", "aten"])
def test_checkpoint_round_trip_across_kernels(tmp_path, monkeypatch, kernel):
    """Saved from one kernel's layout, loaded into the other's: the same integers and scales."""
    if kernel == "vnni" and not int4_cpu.available():
        pytest.skip("int4 kernel not built")
    model = tiny(tied=True).quantize("int4", group_size=32, sym=False)
    model.save_pretrained(tmp_path)
    if kernel == "vnni":
        monkeypatch.setattr(int4_cpu, "available", lambda: False)
    loaded = Qwen2VL.from_pretrained(tmp_path)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, module in loaded.named_modules():
        if isinstance(module, QuantLinear):
            a, b = layers[name].quant_weight(), module.quant_weight()
            assert torch.equal(a.q, b.q) and torch.equal(a.zeros, b.zeros) and torch.equal(a.scales, b.scales), name



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_embedding_rows_are_exact_in_the_model_dtype_and_idempotent(dtype):
    weight = (torch.randn(300, 64) * torch.rand(300, 1) * 3).to(dtype)
    weight[7] = 0
    embed = Int8Embedding(weight, chunk=128)
    table = embed.table()
    assert table.dtype == dtype and embed.qweight.dtype == torch.int8 and int(embed.qweight.abs().max()) <= 127
    step = embed.scales.unsqueeze(-1)  # a power of two per row, at most absmax / 63.5
    assert bool((torch.log2(embed.scales) == torch.log2(embed.scales).round()).all())
    assert bool(((table.float() - weight.float()).abs() <= step / 2).all())
    amax = weight.float().abs().amax(-1)
    assert bool(((step[:, 0] <= amax / 63.5) | (amax == 0)).all())
    assert torch.equal(table.float(), embed.qweight.float() * step)  # no rounding in dtype
    again = Int8Embedding(table)  # what loading a saved table does
    assert torch.equal(again.qweight, embed.qweight) and torch.equal(again.scales, embed.scales)
    ids = torch.tensor([[3, 7], [299, 3]])
    assert torch.equal(embed(ids), table[ids])


@pytest.mark.parametrize("scheme,tied,compact", [("int4", True, True), ("int8", True, False), ("int4", False, False)])
def test_a_tied_int4_head_leaves_an_int8_table(tmp_path, scheme, tied, compact):
    model = tiny(tied=tied).quantize(scheme, group_size=32 if scheme == "int4" else None)
    embed = model.model.embed_tokens
    assert isinstance(embed, Int8Embedding) == compact
    if not compact:
        return
    assert not hasattr(model.lm_head, "weight") and not any("embed_tokens" in n for n, _ in model.named_parameters())
    ids = torch.randint(0, 240, (2, 5))
    logits = model(ids)
    model.save_pretrained(tmp_path)  # the file's embed_tokens.weight is the table the lookup computes
    from safetensors.torch import load_file
    assert torch.equal(load_file(tmp_path / "model.safetensors")["model.embed_tokens.weight"], embed.table())
    loaded = Qwen2VL.from_pretrained(tmp_path)
    assert isinstance(loaded.model.embed_tokens, Int8Embedding) and torch.equal(loaded(ids), logits)
    assert torch.equal(loaded.model.embed_tokens.qweight, embed.qweight)
