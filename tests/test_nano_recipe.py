"""recipes/nano/train.py: its presets parse into training streams, and bad arguments fail before any work."""

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from qwen2vl.train.stream import SyntheticStream

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "nano"


@pytest.fixture(scope="module")
def recipe():
    return load("train")


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_each_preset_stage_is_a_valid_stream(recipe, name, tmp_path):
    preset = yaml.safe_load((RECIPE / f"{name}.yaml").read_text())
    for stage in recipe.STAGES:
        path = tmp_path / f"stage{stage}.yaml"
        path.write_text(yaml.safe_dump({"synthetic": recipe.stream_spec(preset, stage, "224")}))
        stream = SyntheticStream(path, encode=None, seq_len=preset["train"]["seq_len"])
        assert stream.seed == preset["stream"]["seed"] + stage
        assert stream.settings.force_size == (224, 224)
        ends = [end for end, _ in stream.phases]
        assert ends == sorted(ends)
        last = ends[-1] if ends else 0
        assert stream.settings_at(last) == stream.settings  # after the phases: the common mix
        if ends:
            assert stream.settings_at(last - 1) != stream.settings


def test_procs_must_split_the_rows_of_a_step(recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(SystemExit):
        recipe.main(["cpu", "--out", str(tmp_path / "run"), "--procs", "3"])
    assert "8 rows per step must split evenly" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def load(name):
    spec = importlib.util.spec_from_file_location(f"nano_{name}", RECIPE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_glyph_probe_pools_every_stage_and_its_classifier_learns():
    import torch
    from oracle import tiny_config

    from qwen2vl import Qwen2VL
    from qwen2vl.config import Qwen2VLConfig

    glyph = load("glyph_probe")
    images, labels = glyph.glyphs(5, seed=0)
    assert len(images) == 5 and labels.max() < len(glyph.ALPHABET)
    assert [im.size for im in images] == [im.size for im in glyph.glyphs(5, seed=0)[0]]  # deterministic
    model = Qwen2VL.from_config(Qwen2VLConfig.from_dict(tiny_config()), seed=0)
    features = glyph.stage_features(model, images, max_pixels=224 * 224)
    depth = model.config.vision.depth
    assert list(features) == ["embed"] + [f"block{i}" for i in range(depth)] + ["merger"]
    assert features["embed"].shape == (5, 2 * model.config.vision.embed_dim)
    assert features["merger"].shape == (5, 2 * model.config.text.hidden_size)
    # separable features: the classifier finds them; shuffled labels on fresh items: near chance
    torch.manual_seed(0)
    y = torch.arange(len(glyph.ALPHABET)).repeat(4)
    centres = torch.randn(len(glyph.ALPHABET), 16) * 3
    x = centres[y] + torch.randn(len(y), 16)
    assert glyph.probe_accuracy(x[:186], y[:186], x[186:], y[186:]) > 0.9
    assert glyph.probe_accuracy(x[:186], y[:186][torch.randperm(186)], x[186:], y[186:]) < 0.3
