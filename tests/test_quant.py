"""Weight-only int8/int4: the kernels against the dequantized weights, Qwen2VL.quantize, save -> load."""

from __future__ import annotations

import gc
import json
import os

import pytest
import torch
import torch.nn.functional as F
from oracle import tiny_config
from torch import nn

from qwen2vl import Qwen2VL
from qwen2vl.config import Qwen2VLConfig
from qwen2vl.quant import int8_cpu
from qwen2vl.quant.linear import (
    GEMM_ROWS,
    ONEDNN,
    ONEDNN_MIN_OUT,
    Int4Linear,
    Int8Linear,
    QuantLinear,
    quantize_linear,
)
from qwen2vl.quant.weights import quantize_weight


def tiny(tied=False, seed=0):
    return Qwen2VL.from_config(Qwen2VLConfig.from_dict(tiny_config(tied=tied)), seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme,group,sym,cls", [("int8", None, True, Int8Linear), ("int8", 32, False, Int8Linear),
                                                  ("int4", 32, True, Int4Linear), ("int4", 64, False, Int4Linear)])
@pytest.mark.parametrize("out_features", [40, 128])  # 40: not a multiple of the int4 kernel's 64-row block
def test_linear_equals_its_dequantized_weight(dtype, scheme, group, sym, cls, out_features):
    linear = nn.Linear(128, out_features, dtype=dtype)
    module = quantize_linear(linear, scheme, group, sym)
    assert isinstance(module, cls) and not hasattr(module, "weight")
    x = torch.randn(2, 3, 128, dtype=dtype)
    qw = module.quant_weight()
    ref = reference(module, x, qw, linear.bias)
    y = module(x)
    assert y.shape == (2, 3, out_features) and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), ref, atol=tol * ref.abs().max().item(), rtol=0)
    # a prompt's worth of rows (the dequantize + GEMM path where there is one): the same numbers
    xs = torch.randn(1, GEMM_ROWS[qw.bits] + 5, 128, dtype=dtype)
    ref = reference(module, xs, qw, linear.bias)
    torch.testing.assert_close(module(xs).double(), ref, atol=tol * ref.abs().max().item(), rtol=0)
    # and the dequantized weight is the float weight to within half a quantization step (plus, in
    # bfloat16, the rounding of the stored scale: up to 2**-8 of 2**(bits-1) steps)
    step = qw.scales.float().repeat_interleave(qw.group_size, dim=1)
    slack = 0.5 if dtype == torch.float32 else 0.5 + 2 ** (qw.bits - 1) / 256
    assert bool(((qw.dequantize() - linear.weight.float()).abs() <= step * slack + 1e-6).all())


def reference(module, x, qw, bias):
    """What ``module`` computes, in float64: an int8 layer with a kernel (ours or oneDNN's) sees each
    row of x as its two int8 roundings (computed in float32, as the module does), our int4 kernel sees
    it rounded to int8 in blocks of 32."""
    if isinstance(module, Int8Linear) and module.kernel is not None:
        x = sum(s.double() * q.double() for s, q in int8_split(x))
    elif getattr(module, "kernel", None) == "vnni":
        x = int8_blocks(x)
    return F.linear(x.double(), qw.dequantize(torch.float64), bias.double())


def int8_blocks(x):
    """x rounded as the int4 kernel rounds it: int8 per block of 32 columns, scale absmax / 127 (float32)."""
    b = x.float().unflatten(-1, (-1, 32))
    s = b.abs().amax(-1, keepdim=True) / 127
    return (torch.where(s > 0, (b / s).round(), 0) * s).flatten(-2).double()


def int8_split(x):
    """[(s1, q1), (s2, q2)]: x ~ s1 * q1 + s2 * q2 per row, as qwen2vl.quant.linear.int8_matmul splits it."""
    x = x.float()
    s1 = x.abs().amax(-1, keepdim=True) / 127
    q1 = (x / s1).round()
    rest = x - q1 * s1
    s2 = rest.abs().amax(-1, keepdim=True) / 127
    return [(s1, q1), (s2, (rest / s2).round())]


@pytest.mark.skipif(not ONEDNN and not int8_cpu.available(), reason="no int8 kernel (oneDNN or ours)")
@pytest.mark.parametrize("kernel", ["vnni", "onednn"])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_int8_packed_error_is_within_the_activation_rounding_bound(rows, kernel, monkeypatch):
    """Per-row int8 on the CPU multiplies each input row as two int8 roundings; what is left, at most
    s2 / 2 per entry (s2 <= absmax / 127 / 254), bounds the difference from the weight-only product
    by sum_k |w[n, k]| * s2 / 2 per output."""
    if kernel == "onednn":
        if not ONEDNN:
            pytest.skip("torch built without oneDNN")
        monkeypatch.setattr(int8_cpu, "available", lambda: False)
    elif not int8_cpu.available():
        pytest.skip("int8 kernel not built or no AVX512-VNNI")
    linear = nn.Linear(1536, ONEDNN_MIN_OUT, bias=False)
    module = quantize_linear(linear, "int8")
    assert module.kernel == kernel and (module.packed is None) == (kernel == "vnni")
    assert torch.equal(module.int8_weight(), (module.quant_weight().q.to(torch.int16) - 128).to(torch.int8))
    x = torch.randn(rows, 1536) * torch.rand(1536) * 4  # uneven channel sizes
    w = module.quant_weight().dequantize(torch.float64)
    exact = F.linear(x.double(), w)
    (s1, q1), (s2, q2) = int8_split(x)
    assert bool((s2 <= s1 / 254 * (1 + 1e-5)).all()) and q1.abs().max() <= 127 and q2.abs().max() <= 127
    bound = (s2.double() / 2) * w.abs().sum(1)  # (rows, N)
    err = (module(x).double() - exact).abs()
    assert bool((err <= bound * (1 + 1e-4) + 1e-6 * exact.abs().max()).all())
    torch.testing.assert_close(module(x).double(), reference(module, x, module.quant_weight(), torch.zeros(ONEDNN_MIN_OUT)),
                               atol=1e-5 * exact.abs().max().item(), rtol=0)


@pytest.mark.parametrize("kernel", ["vnni", "onednn"])
def test_int8_packed_weight_moves_off_the_cpu_as_plain_int8(kernel, monkeypatch):
    if kernel == "onednn":
        monkeypatch.setattr(int8_cpu, "available", lambda: False)
    module = quantize_linear(nn.Linear(64, ONEDNN_MIN_OUT), "int8")
    q = module.int8_weight()
    expected = {"vnni": int8_cpu.available(), "onednn": ONEDNN}[kernel]
    module.to(torch.float64)  # a dtype change keeps the kernel's layout
    assert (module.kernel == kernel) == expected and torch.equal(module.int8_weight(), q)
    module._apply(lambda t: t.to("meta"))  # leaving the CPU (meta stands in for CUDA): plain int8 again
    assert module.kernel is None and module.packed is None
    assert module.qweight.shape == q.shape and module.qweight.device.type == "meta"


def test_int4_packing_reads_back_and_per_row_int8_uses_the_kernel():
    w = torch.randn(192, 256)
    qw = quantize_weight(w, 4, 128, sym=False)
    module = Int4Linear(qw)
    assert torch.equal(module.quant_weight().q, qw.q)
    assert torch.equal(module.quant_weight().zeros, qw.zeros)
    assert Int8Linear(quantize_weight(w, 8)).per_row
    assert not Int8Linear(quantize_weight(w, 8, 64)).per_row


def test_bad_group_sizes_name_the_layer():
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize_linear(nn.Linear(96, 32), "int4", group_size=48)
    with pytest.raises(ValueError, match=r"visual\.blocks\.0\.attn\.qkv \(32 -> 96\)"):
        tiny().quantize("int4", group_size=64)  # the tiny vision tower is 32 wide
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'"):
        tiny().quantize("int3")


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("scheme,group,sym", [("int8", None, True), ("int4", 32, True), ("int4", 32, False)])
def test_quantized_checkpoint_round_trip(tmp_path, tied, scheme, group, sym):
    model = tiny(tied).quantize(scheme, group_size=group, sym=sym)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert "lm_head" in quantized and "model.layers.1.mlp.gate_up_proj" in quantized
    assert "visual.merger.mlp.2" in quantized
    ids = torch.randint(0, 240, (2, 9))
    logits = model(ids)
    model.save_pretrained(tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": 8 if scheme == "int8" else 4,
                  "group_size": -1 if group is None else group, "sym": sym, "desc_act": False, "lm_head": True}
    loaded = Qwen2VL.from_pretrained(tmp_path)
    assert {n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)} == quantized
    assert torch.equal(loaded(ids), logits)
    for (name, a), (_, b) in zip(model.named_buffers(), loaded.named_buffers()):
        assert torch.equal(a, b), name
    # and writing it again gives the same files' tensors
    loaded.save_pretrained(tmp_path / "again")
    from safetensors.torch import load_file
    first, second = load_file(tmp_path / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert "model.layers.0.self_attn.q_proj.qweight" in first and "model.layers.0.self_attn.qkv_proj.qweight" not in first


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_no_float_copy_of_a_quantized_weight_is_kept(tmp_path, scheme):
    """Quantized in memory or loaded: the float tensors left are the embedding table (int8 rows with a
    tied int4 lm_head), norms, biases, the patch embedding and the per-row/group scales, nothing of a
    quantized layer's size."""
    model = tiny(tied=True).quantize(scheme, group_size=None if scheme == "int8" else 32)
    model.save_pretrained(tmp_path)
    for m in (model, Qwen2VL.from_pretrained(tmp_path)):
        layers = {n: mod for n, mod in m.named_modules() if isinstance(mod, QuantLinear)}
        for name, layer in layers.items():
            for key, t in layer.named_buffers():
                if t.is_floating_point():  # scale (and offset) per row and group; int4 rows padded to 64
                    rows = -(-layer.out_features // 64) * 64
                    assert t.numel() <= 2 * rows * layer.in_features // layer.group_size, (name, key)
        embed = getattr(m.model.embed_tokens, "weight", None)
        assert (embed is None) == (scheme == "int4")  # with an int4 lm_head the tied table is int8 rows
        big = [n for n, p in m.named_parameters() if p.numel() >= 32 * 32 and p is not embed and "patch_embed" not in n]
        assert big == [], big


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_loaded_quantized_model_keeps_no_file_mapped(tmp_path, scheme):
    """Every tensor is copied out of the checkpoint's memory map: a view kept by any module would keep
    the whole file mapped and each page read from it resident."""
    tiny(tied=True).quantize(scheme, group_size=None if scheme == "int8" else 32).save_pretrained(tmp_path)
    model = Qwen2VL.from_pretrained(tmp_path)
    gc.collect()
    mapped = [line for line in open("/proc/self/maps") if str(tmp_path) in line]
    assert mapped == [] and model.lm_head is not None


def test_quantize_keeps_float_where_asked():
    model = tiny().quantize("int8", lm_head=False, vision=False)
    assert type(model.lm_head) is nn.Linear
    assert not any(isinstance(m, QuantLinear) for m in model.visual.modules())
    with pytest.raises(ValueError, match="already quantized"):
        model.quantize("int8")


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_linear_compiles_fullgraph(scheme):
    module = quantize_linear(nn.Linear(256, 192, dtype=torch.bfloat16), scheme)
    x = torch.randn(1, 3, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(torch.compile(module, fullgraph=True)(x), module(x))
