"""What trains in each stage, with freeze flags and LoRA; learning-rate groups; the schedule."""

import math

import pytest
from oracle import tiny_config

from qwen2vl.config import Qwen2VLConfig
from qwen2vl.model.qwen2vl import Qwen2VL
from qwen2vl.train.lora import add_lora, lora_config
from qwen2vl.train.optim import lr_factor
from qwen2vl.train.options import OptionError, load_options
from qwen2vl.train.stages import apply_freezing, learning_rates, lora_parts, param_groups, trainable_parts


def options(**overrides):
    return load_options(None, {"model": "m", "data": "d.jsonl", **{k: str(v) for k, v in overrides.items()}})


def model(tied=False):
    return Qwen2VL.from_config(Qwen2VLConfig.from_dict(tiny_config(tied=tied)), seed=0)


def trained(opts, tied=False):
    m = model(tied)
    adapted = lora_parts(opts)
    if adapted:
        add_lora(m, lora_config(m, opts.lora), seed=0)
    apply_freezing(m, trainable_parts(opts), adapted)
    return m, {n for n, p in m.named_parameters() if p.requires_grad}


ALL = {n for n, _ in model().named_parameters()}
VISION = {n for n in ALL if n.startswith("visual.") and not n.startswith("visual.merger.")}
MERGER = {n for n in ALL if n.startswith("visual.merger.")}
LLM = {n for n in ALL if n.startswith(("model.", "lm_head."))}


@pytest.mark.parametrize("stage, expected", [(1, VISION | MERGER), (2, ALL), (3, LLM | MERGER)])
def test_stage_trains_exactly_its_parts(stage, expected):
    assert VISION and MERGER and LLM and VISION | MERGER | LLM == ALL
    assert trained(options(stage=stage))[1] == expected


def test_stage_with_tied_embeddings():
    m, names = trained(options(stage=1), tied=True)
    assert "model.embed_tokens.weight" not in names and not m.lm_head.weight.requires_grad
    m, names = trained(options(stage=3), tied=True)
    assert m.lm_head.weight.requires_grad and "model.embed_tokens.weight" in names


def test_freeze_flags_override_the_stage():
    assert trained(options(stage=2, freeze_vision=True))[1] == LLM | MERGER
    assert trained(options(stage=3, freeze_merger=True))[1] == LLM
    assert trained(options(stage=1, freeze_llm=False, freeze_merger=True))[1] == VISION | LLM
    with pytest.raises(OptionError, match="nothing to train"):
        trainable_parts(options(stage=1, freeze_vision=True, freeze_merger=True))


def test_lora_trains_adapters_only_in_adapted_parts():
    m, names = trained(options(stage=3, **{"lora.r": 4}))
    adapters = {n for n in names if ".lora_" in n}
    assert names - adapters == MERGER  # the merger trains fully, the LLM only through adapters
    # adapters sit on all seven projections of every decoder layer, A and B each
    assert len(adapters) == 2 * 7 * m.config.text.num_hidden_layers
    assert all(n.startswith("model.layers.") for n in adapters)
    _, names = trained(options(stage=2, **{"lora.r": 4, "lora.vision": True, "lora.llm": False}))
    adapters = {n for n in names if ".lora_" in n}
    assert {n.split(".")[0] for n in adapters} == {"visual"} and len(adapters) == 2 * 4 * 2
    assert names - adapters == MERGER | LLM


def test_lora_on_a_frozen_part_is_refused():
    with pytest.raises(OptionError, match="LoRA on vision needs it trainable, but stage 3"):
        lora_parts(options(stage=3, **{"lora.r": 4, "lora.vision": True}))


def test_lora_target_modules_choose_layers():
    m, names = trained(options(stage=3, freeze_merger=True, **{"lora.r": 2, "lora.target_modules": "[q_proj, v_proj]"}))
    assert {n.split(".")[4] for n in names} == {"q_proj", "v_proj"}
    with pytest.raises(OptionError, match="match no linear layer"):
        trained(options(**{"lora.r": 2, "lora.target_modules": "[nothing]"}))


def test_param_groups_carry_each_part_learning_rate_and_decay():
    opts = options(stage=2, lr=1e-4, lr_vision=1e-5, lr_merger=3e-4, weight_decay=0.1)
    m, _ = trained(opts)
    groups = param_groups(m, learning_rates(opts), opts.weight_decay)
    by_id = {id(p): g for g in groups for p in g["params"]}
    named = dict(m.named_parameters())
    assert by_id[id(named["visual.blocks.0.attn.qkv.weight"])]["lr"] == 1e-5
    assert by_id[id(named["visual.merger.mlp.0.weight"])]["lr"] == 3e-4
    assert by_id[id(named["model.layers.0.mlp.up_proj.weight"])]["lr"] == 1e-4
    assert by_id[id(named["model.layers.0.mlp.up_proj.weight"])]["weight_decay"] == 0.1
    assert by_id[id(named["model.layers.0.self_attn.q_proj.bias"])]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(ALL)


def test_warmup_then_cosine():
    values = [lr_factor(s, warmup=2, total=6, min_ratio=0.0) for s in range(6)]
    assert values == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.25, 0.0])
    assert lr_factor(9, warmup=0, total=10, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(0, warmup=0, total=10, min_ratio=0.1) == 1.0
    assert lr_factor(5, warmup=1, total=10, min_ratio=0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
