"""Export writes the processor settings training used: the pixel bounds, in both spellings."""

import json

import pytest
from train_helpers import make_color_data, train_args

from qwen2vl.processing.image import MAX_PIXELS, MIN_PIXELS
from qwen2vl.processing.processor import Processor
from qwen2vl.train.cli import main
from qwen2vl.train.export import preprocessor_settings


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    data = make_color_data(tmp / "colors")
    default, capped = tmp / "default", tmp / "capped"
    assert main(train_args(tmp, data, default, max_steps=1)) == 0
    assert main(train_args(tmp, data, capped, max_steps=1, min_pixels=1568, max_pixels=3136)) == 0
    return default, capped


def test_export_writes_the_training_processor_default(runs):
    """No source preprocessor and no pixel options: the export holds the processor's defaults, not the hub's 12845056."""
    default, _ = runs
    config = json.loads((default / "final" / "preprocessor_config.json").read_text())
    assert (config["min_pixels"], config["max_pixels"]) == (MIN_PIXELS, MAX_PIXELS)
    assert config["size"] == {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    processor = Processor.from_pretrained(str(default / "final"))
    assert (processor.min_pixels, processor.max_pixels) == (MIN_PIXELS, MAX_PIXELS)


def test_export_writes_the_pixel_options_and_a_later_stage_keeps_them(runs, tmp_path):
    _, capped = runs
    config = json.loads((capped / "final" / "preprocessor_config.json").read_text())
    assert (config["min_pixels"], config["max_pixels"]) == (1568, 3136)
    # a stage started from that export trains with its bounds and exports them again
    data = make_color_data(tmp_path / "colors")
    args = ["--model", str(capped / "final"), "--data", str(data), "--output_dir", str(tmp_path / "next"),
            "--max_steps", "1", "--seq_len", "128", "--batch_size", "2", "--progress", "false"]
    assert main(args) == 0
    again = json.loads((tmp_path / "next" / "final" / "preprocessor_config.json").read_text())
    assert (again["min_pixels"], again["max_pixels"]) == (1568, 3136)


@pytest.mark.hf
def test_transformers_reads_the_exported_bounds(runs):
    from transformers import Qwen2VLImageProcessor

    _, capped = runs
    processor = Qwen2VLImageProcessor.from_pretrained(str(capped / "final"))
    assert (processor.min_pixels, processor.max_pixels) == (1568, 3136)


def test_preprocessor_settings_replaces_both_spellings_and_checks_bounds():
    base = {"min_pixels": 1, "max_pixels": 12845056, "size": {"shortest_edge": 1, "longest_edge": 12845056},
            "patch_size": 14}
    out = preprocessor_settings(base, 3136, 262144)
    assert out == {"min_pixels": 3136, "max_pixels": 262144, "patch_size": 14,
                   "size": {"shortest_edge": 3136, "longest_edge": 262144}}
    assert base["max_pixels"] == 12845056  # the base is not changed
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        preprocessor_settings(base, 5000, 4000)
