"""End-to-end training runs on CPU: overfitting a small multimodal set, outputs, LoRA export parity."""

import json

import pytest
import torch
from train_helpers import COLORS, make_color_data, train_args

from qwen2vl.cli import main as qwen2vl_main
from qwen2vl.model.qwen2vl import Qwen2VL
from qwen2vl.processing.processor import Processor
from qwen2vl.train.cli import main
from qwen2vl.train.distributed import Dist
from qwen2vl.train.metrics import read_metrics
from qwen2vl.train.options import load_options
from qwen2vl.train.records import read_jsonl
from qwen2vl.train.trainer import Trainer

OVERFIT_LOSS = 0.1  # mean token loss the tiny model must reach on the 6-colour set


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    return tmp, make_color_data(tmp / "colors")


def test_tiny_model_overfits_colour_images(workdir):
    """From scratch, 45 steps: the model must read the colour from the image, not guess it."""
    tmp, data = workdir
    out = tmp / "overfit"
    assert main(train_args(tmp, data, out, max_steps=45, seq_len=256, lr=1e-2, warmup_steps=5,
                           min_lr_ratio=0.1, eval_data=data, eval_every=15)) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 46))
    assert records[-1]["loss"] < OVERFIT_LOSS and records[-1]["eval_loss"] < OVERFIT_LOSS
    assert [r["step"] for r in records if "eval_loss" in r] == [15, 30, 45]
    assert records[0]["loss"] > 10 * records[-1]["loss"]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # the exported checkpoint answers every colour by itself (greedy first answer token)
    final = out / "final"
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= {
        p.name for p in final.iterdir()}
    model, processor = Qwen2VL.from_pretrained(final), Processor.from_pretrained(str(final))
    for (_, record), color in zip(read_jsonl(data), COLORS):
        prompt = processor.encode(record.messages[:1], add_generation_prompt=True)
        with torch.no_grad():
            logits = model(prompt.input_ids[None], pixel_values=prompt.pixel_values,
                           image_grid_thw=prompt.image_grid_thw)
        first = processor.tokenizer.encode(color)[0]
        assert int(logits[0, -1].argmax()) == first, color


def test_outputs_and_options_record(workdir):
    tmp, data = workdir
    out = tmp / "outputs"
    assert main(train_args(tmp, data, out, max_steps=3, save_every=2, keep_checkpoints=1, export=False)) == 0
    names = {p.name for p in out.iterdir()}
    assert {"metrics.jsonl", "loss.png", "options.json", "checkpoints"} <= names and "final" not in names
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000003"]  # pruned to one
    record = read_metrics(out / "metrics.jsonl")[0]
    assert {"step", "loss", "lr", "grad_norm", "tokens", "supervised_tokens", "tokens_per_s"} <= set(record)
    assert json.loads((out / "options.json").read_text())["max_steps"] == 3


def test_cpu_training_flushes_denormals_only_while_it_runs(workdir, monkeypatch):
    """Denormal floats take the CPU's slow path (1.7x slower steps on the trained nano model)."""
    tmp, data = workdir
    calls, real = [], torch.set_flush_denormal

    def record(mode):
        calls.append((mode, torch.tensor([1e-40]).item() == 0.0))  # was it flushed before this call?
        return real(mode)

    monkeypatch.setattr(torch, "set_flush_denormal", record)
    assert main(train_args(tmp, data, tmp / "flush", max_steps=1, export=False)) == 0
    assert calls == [(True, False), (False, True)]  # on for the run, off after it
    assert torch.tensor([1e-40]).item() != 0.0


def test_sample_weighting_is_the_same_objective_under_accumulation(workdir):
    """loss_weighting sample: 4 rows as one micro-step or as 2 give the same losses; and it is a
    different objective from per-token weighting (answers of several lengths)."""
    tmp, data = workdir
    common = dict(max_steps=3, seq_len=160, batch_size=4, lr=5e-3, export=False)
    runs = {}
    for name, extra in (("sample", {}), ("sample-accum", {"grad_accum": 2}), ("token", {})):
        weighting = name.split("-")[0]
        assert main(train_args(tmp, data, tmp / name, loss_weighting=weighting, **extra, **common)) == 0
        runs[name] = [r["loss"] for r in read_metrics(tmp / name / "metrics.jsonl")]
    assert runs["sample"] == pytest.approx(runs["sample-accum"], rel=1e-5)
    assert runs["sample"][0] != pytest.approx(runs["token"][0], rel=1e-3)
    with pytest.raises(ValueError, match="loss_weighting must be one of token, sqrt, sample"):
        load_options(None, {"data": "d.jsonl", "model_config": "c", "tokenizer": "t",
                            "loss_weighting": "tokens"}).validate()


def test_fine_tune_from_an_exported_checkpoint(workdir):
    """``model: <dir>`` loads a checkpoint (here a from-scratch run's export) and carries its side files on."""
    tmp, data = workdir
    assert main(train_args(tmp, data, tmp / "base", max_steps=2)) == 0
    base = tmp / "base" / "final"
    args = ["--model", str(base), "--data", str(data), "--output_dir", str(tmp / "tuned"), "--stage", "3",
            "--max_steps", "2", "--seq_len", "128", "--batch_size", "2", "--lr", "1e-3", "--progress", "false"]
    assert main(args) == 0
    tuned = tmp / "tuned" / "final"
    assert (tuned / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    before, after = Qwen2VL.from_pretrained(base), Qwen2VL.from_pretrained(tuned)
    assert torch.equal(before.visual.blocks[0].attn.qkv.weight, after.visual.blocks[0].attn.qkv.weight)  # frozen
    assert not torch.equal(before.model.layers[0].mlp.up_proj.weight, after.model.layers[0].mlp.up_proj.weight)


def test_cli_reports_bad_options_in_one_line(workdir, capsys):
    tmp, data = workdir
    assert qwen2vl_main(["train", "--max_steps", "many"]) == 2
    assert "max_steps must be int, got 'many'" in capsys.readouterr().err
    assert qwen2vl_main(["train", *train_args(tmp, data, tmp / "x", stage=3, **{"lora.r": 2, "lora.vision": True})]) == 2
    assert "LoRA on vision needs it trainable" in capsys.readouterr().err
    assert qwen2vl_main(["train", "--help"]) == 0
    assert "--lora.r" in capsys.readouterr().out


@pytest.mark.hf
def test_lora_merged_export_matches_in_transformers(workdir):
    """Stage 3 + LoRA on the LLM: merged export == the trained adapter model, in ours and transformers."""
    from transformers import Qwen2VLForConditionalGeneration

    tmp, data = workdir
    out = tmp / "lora"
    args = train_args(tmp, data, out, max_steps=3, lr=2e-2, stage=3, **{"lora.r": 4, "lora.alpha": 8})
    overrides = {a[2:]: b for a, b in zip(args[::2], args[1::2])}
    trainer = Trainer(load_options(None, overrides), Dist())
    trainer.fit()
    adapted = trainer.loss_model.net.eval()
    assert any(".lora_A." in n for n, _ in adapted.named_parameters())
    ours = Qwen2VL.from_pretrained(out / "final")
    assert not any("lora" in n for n, _ in ours.named_parameters())
    hf = Qwen2VLForConditionalGeneration.from_pretrained(out / "final", dtype=torch.float32).eval()
    processor = Processor.from_pretrained(str(out / "final"))
    sample = processor.encode(read_jsonl(data)[2][1].messages, add_generation_prompt=False)
    inputs = dict(pixel_values=sample.pixel_values, image_grid_thw=sample.image_grid_thw)
    with torch.no_grad():
        trained = adapted(sample.input_ids[None], **inputs)
        merged = ours(sample.input_ids[None], **inputs)
        reference = hf(input_ids=sample.input_ids[None], **inputs).logits
    base = Qwen2VL.from_config(ours.config, seed=0)  # the adapters moved the weights away from the start
    assert not torch.allclose(ours.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    torch.testing.assert_close(merged, trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference, merged, rtol=1e-5, atol=1e-5)
