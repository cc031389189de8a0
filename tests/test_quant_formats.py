"""GPTQ and AWQ checkpoints, packed here from known integers in each published layout, load unchanged.

The packers below follow the published loops (AutoGPTQ's ``pack``: 32/bits input rows per int32
of ``qweight``, zeros stored minus one in ``qzeros``; AutoAWQ's GEMM ``from_linear``: output
columns packed 8 to an int32 in the order 0 2 4 6 1 3 5 7), one value at a time, independently of
the vectorised readers in qwen2vl.quant.formats.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from oracle import tiny_config
from safetensors.torch import save_file

from qwen2vl import Qwen2VL
from qwen2vl.config import Qwen2VLConfig
from qwen2vl.quant import int4_cpu
from qwen2vl.quant.linear import ConcatLinear, Int4Linear, Int8Linear

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


@pytest.fixture(autouse=True)
def float_input_int4_kernel(monkeypatch):
    """These tests check the published layouts against the float model, to float rounding: int4
    layers use torch's kernel (float inputs). Our int8-input kernel, its layout and its loading of
    the same checkpoints are tested in test_quant_int4.py."""
    monkeypatch.setattr(int4_cpu, "available", lambda: False)


def gptq_pack(q, zeros, bits):
    """q (N, K), zeros (G, N) ints -> qweight (K*bits/32, N), qzeros (G, N*bits/32) int32, one value at a time."""
    per = 32 // bits
    intweight = q.t().numpy().astype(np.uint32)  # (K, N)
    qweight = np.zeros((intweight.shape[0] // per, intweight.shape[1]), dtype=np.uint32)
    for row in range(qweight.shape[0]):
        for j in range(per):
            qweight[row] |= intweight[row * per + j] << np.uint32(bits * j)
    stored = (zeros.numpy() - 1).astype(np.uint32)
    qzeros = np.zeros((stored.shape[0], stored.shape[1] // per), dtype=np.uint32)
    for col in range(qzeros.shape[1]):
        for j in range(per):
            qzeros[:, col] |= stored[:, col * per + j] << np.uint32(bits * j)
    return torch.from_numpy(qweight.view(np.int32)), torch.from_numpy(qzeros.view(np.int32))


def awq_pack(q, zeros):
    """q (N, K), zeros (G, N) -> qweight (K, N/8), qzeros (G, N/8) int32 in AutoAWQ's GEMM order."""
    def pack(values):  # (R, C) -> (R, C/8)
        out = np.zeros((values.shape[0], values.shape[1] // 8), dtype=np.uint32)
        for col in range(out.shape[1]):
            for i in range(8):
                out[:, col] |= values[:, col * 8 + AWQ_ORDER[i]] << np.uint32(4 * i)
        return torch.from_numpy(out.view(np.int32))
    return pack(q.t().numpy().astype(np.uint32)), pack(zeros.numpy().astype(np.uint32))


def random_layer(n, k, bits, group, perm, gen):
    """Known integers, zeros, fp16 scales and g_idx (act-order when ``perm`` is given), and the float weight."""
    g = k if group == -1 else group
    q = torch.randint(0, 2**bits, (n, k), generator=gen)
    zeros = torch.randint(1, 2**bits, (k // g, n), generator=gen)
    scales = (torch.rand(k // g, n, generator=gen) * 0.01 + 0.002).half()
    if perm is not None:
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // g).to(torch.int32)
    else:
        g_idx = (torch.arange(k) // g).to(torch.int32)
    gi = g_idx.long()
    weight = (scales.float()[gi].t() * (q - zeros[gi].t()).float())  # (N, K)
    return q, zeros, scales, g_idx, weight


def write_checkpoint(tmp_path, method, bits, group, act_order, tied=False, shared_perm=True):
    """A tiny checkpoint whose decoder linears are quantized; returns (directory, float reference model).

    With act-order, q/k/v (and gate/up) share one permutation, as GPTQ gives projections of the same
    input (one Hessian), unless ``shared_perm`` is False.
    """
    config = tiny_config(tied=tied)
    config["quantization_config"] = (
        {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order, "sym": False,
         "checkpoint_format": "gptq"} if method == "gptq" else
        {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm", "zero_point": True})
    reference = Qwen2VL.from_config(Qwen2VLConfig.from_dict(tiny_config(tied=tied)), seed=4)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    if tied:
        state.pop("lm_head.weight")
    gen = torch.Generator().manual_seed(7)
    for layer in range(config["num_hidden_layers"]):
        for name in LINEARS:
            key = f"model.layers.{layer}.{name}"
            n, k = state[f"{key}.weight"].shape
            if name in ("self_attn.q_proj", "mlp.gate_proj", "self_attn.o_proj", "mlp.down_proj") or not shared_perm:
                perm = torch.randperm(k, generator=gen) if act_order else None
            q, zeros, scales, g_idx, weight = random_layer(n, k, bits, group, perm, gen)
            del state[f"{key}.weight"]
            if method == "gptq":
                state[f"{key}.qweight"], state[f"{key}.qzeros"] = gptq_pack(q, zeros, bits)
                state[f"{key}.g_idx"] = g_idx
            else:
                state[f"{key}.qweight"], state[f"{key}.qzeros"] = awq_pack(q, zeros)
            state[f"{key}.scales"] = scales
            reference.get_submodule(key).weight.data.copy_(weight)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path, reference


CASES = [("gptq", 4, 32, False), ("gptq", 4, 32, True), ("gptq", 4, 64, False),
         ("gptq", 8, -1, False), ("gptq", 8, 32, False), ("gptq", 8, 32, True), ("awq", 4, 32, False)]


@pytest.mark.parametrize("method,bits,group,act_order", CASES)
def test_published_layouts_load_and_equal_the_dequantized_model(tmp_path, method, bits, group, act_order):
    directory, reference = write_checkpoint(tmp_path, method, bits, group, act_order)
    model = Qwen2VL.from_pretrained(directory)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, Int4Linear if bits == 4 else Int8Linear)  # loaded fused
    assert (attn.qkv_proj.perm is not None) == act_order
    assert type(model.lm_head) is torch.nn.Linear  # float where the checkpoint is float
    ids = torch.randint(0, 240, (2, 11))
    expected = reference(ids)
    got = model(ids)
    torch.testing.assert_close(got, expected, atol=1e-5 * expected.abs().max().item(), rtol=0)
    # the checkpoint directory, written again (GPTQ layout) and read back, gives the same logits
    model.save_pretrained(tmp_path / "again")
    qc = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == bits and qc["desc_act"] == act_order
    assert torch.equal(Qwen2VL.from_pretrained(tmp_path / "again")(ids), got)


def test_act_order_parts_permuted_differently(tmp_path):
    directory, reference = write_checkpoint(tmp_path, "gptq", 4, 32, True, shared_perm=False)
    model = Qwen2VL.from_pretrained(directory)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, ConcatLinear)
    ids = torch.randint(0, 240, (1, 9))
    got = model(ids)
    torch.testing.assert_close(got, reference(ids), atol=1e-5 * got.abs().max().item(), rtol=0)
    model.save_pretrained(tmp_path / "again")
    assert torch.equal(Qwen2VL.from_pretrained(tmp_path / "again")(ids), got)


def test_tied_checkpoint_with_float_head(tmp_path):
    directory, reference = write_checkpoint(tmp_path, "awq", 4, 32, False, tied=True)
    model = Qwen2VL.from_pretrained(directory)
    ids = torch.randint(0, 240, (1, 7))
    torch.testing.assert_close(model(ids), reference(ids), atol=1e-5, rtol=0)


def test_unsupported_configs_are_named(tmp_path):
    directory, _ = write_checkpoint(tmp_path, "awq", 4, 32, False)
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"]["version"] = "gemv"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="AWQ version 'gemv' is not supported"):
        Qwen2VL.from_pretrained(directory)
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quant_method 'bitsandbytes' is not supported"):
        Qwen2VL.from_pretrained(directory)
