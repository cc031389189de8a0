"""Training options and data: YAML + overrides, both JSONL forms, media paths, bad records by line."""

import json

import pytest
import torch
from train_helpers import make_color_data, make_tokenizer_dir, save_image

from qwen2vl.processing.processor import Processor
from qwen2vl.train.dataset import DataError, Dataset
from qwen2vl.train.distributed import Dist
from qwen2vl.train.options import OptionError, load_options, parse_argv
from qwen2vl.train.records import read_jsonl, to_messages


# ------------------------------------------------------------------ options
def test_yaml_then_command_line_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: ckpt\ndata: a.jsonl\nlr: 1e-5\nstage: 3\nlora:\n  r: 8\n  vision: false\n")
    config_file, overrides, resume = parse_argv(["--config", str(path), "--lr", "2e-4", "--lora.r", "16",
                                                 "--freeze-merger=true", "--data", "[a.jsonl, b.jsonl]", "--resume"])
    opts = load_options(config_file, overrides)
    assert resume and opts.lr == 2e-4 and isinstance(opts.lr, float)
    assert opts.stage == 3 and opts.freeze_merger is True and opts.data == ["a.jsonl", "b.jsonl"]
    assert opts.lora.r == 16 and opts.lora.vision is False and opts.lora.enabled
    opts.validate()


@pytest.mark.parametrize("overrides, message", [
    ({"learning_rate": "1"}, "unknown option 'learning_rate'"),
    ({"lora.alpah": "4"}, "unknown option 'lora.alpah' \\(did you mean lora.alpha\\?\\)"),
    ({"max_steps": "ten"}, "max_steps must be int, got 'ten'"),
    ({"stage": "1.5"}, "stage must be int"),
    ({"shuffle": "maybe"}, "shuffle must be bool"),
])
def test_bad_options_are_named(overrides, message):
    with pytest.raises(OptionError, match=message):
        load_options(None, {"model": "m", "data": "d.jsonl", **overrides})


def test_validate_names_each_problem():
    opts = load_options(None, {"data": "d.jsonl", "stage": "4", "batch_size": "3", "grad_accum": "2"})
    with pytest.raises(OptionError) as err:
        opts.validate(world_size=1)
    text = str(err.value)
    assert "either `model`" in text and "stage must be 1, 2 or 3" in text and "batch_size 3 must be a multiple" in text


# ------------------------------------------------------------------ records
def test_both_record_forms_give_the_same_messages(tmp_path):
    (tmp_path / "imgs").mkdir()
    save_image(tmp_path / "imgs" / "a.png", (200, 10, 10))
    qwen = {"messages": [{"role": "user", "content": [{"type": "image", "image": "imgs/a.png"},
                                                      {"type": "text", "text": "What is it?"}]},
                         {"role": "assistant", "content": "A red square."}]}
    share = {"images": ["imgs/a.png"], "conversations": [{"from": "human", "value": "<image>What is it?"},
                                                         {"from": "gpt", "value": "A red square."}]}
    untagged = {"image": "imgs/a.png", "conversations": [{"from": "human", "value": "What is it?"},
                                                         {"from": "gpt", "value": "A red square."}]}
    openai = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "imgs/a.png"}},
                                                        {"type": "text", "text": "What is it?"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]}]}
    expected = to_messages(qwen, tmp_path)
    assert expected[0]["content"][0]["image"] == str(tmp_path / "imgs" / "a.png")  # relative to the JSONL file
    assert to_messages(share, tmp_path) == expected
    assert to_messages(untagged, tmp_path) == expected
    got = to_messages(openai, tmp_path)
    assert got[0] == expected[0] and got[1]["content"][0]["text"] == "A red square."


def test_urls_stay_urls_in_any_case(tmp_path):
    for url in ("HTTP://example.com/a.png", "Https://example.com/a.png", "data:image/png;base64,AAAA"):
        record = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]},
                               {"role": "assistant", "content": "x"}]}
        assert to_messages(record, tmp_path)[0]["content"][0]["image"] == url  # not read as a local path


def test_sharegpt_tags_take_items_in_order(tmp_path):
    for name in ("a.png", "b.png"):
        save_image(tmp_path / name, (0, 0, 0))
    record = {"images": ["a.png", "b.png"], "system": "Be brief.",
              "conversations": [{"from": "human", "value": "<image>first"}, {"from": "gpt", "value": "1"},
                                {"from": "human", "value": "then <image> second"}, {"from": "gpt", "value": "2"}]}
    messages = to_messages(record, tmp_path)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[3]["content"] == [{"type": "text", "text": "then "},
                                      {"type": "image", "image": str(tmp_path / "b.png")},
                                      {"type": "text", "text": " second"}]


def test_bad_records_are_reported_with_their_line(tmp_path):
    save_image(tmp_path / "a.png", (0, 0, 0))
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "image": "missing.png"}]},
                                 {"role": "assistant", "content": "x"}]}),
        "",
        json.dumps({"images": ["a.png"], "conversations": [{"from": "human", "value": "<image><image>"},
                                                           {"from": "gpt", "value": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
        json.dumps({"text": "no conversation"}),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    results = dict(read_jsonl(path))
    assert not isinstance(results["mixed.jsonl:1"], Exception)
    reasons = {src: str(item) for src, item in results.items() if isinstance(item, Exception)}
    assert "not valid JSON" in reasons["mixed.jsonl:2"]
    assert "'missing.png' not found" in reasons["mixed.jsonl:3"]
    assert "more <image> tags than images" in reasons["mixed.jsonl:5"]
    assert "no assistant message" in reasons["mixed.jsonl:6"]
    assert "unknown role 'robot'" in reasons["mixed.jsonl:7"]
    assert "needs 'messages' or 'conversations'" in reasons["mixed.jsonl:8"]
    assert "mixed.jsonl:4" not in results  # blank lines are not records


# ------------------------------------------------------------------ dataset (with the real processor)
@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return Processor.from_pretrained(str(make_tokenizer_dir(tmp_path_factory.mktemp("tok"))))


def encoder(processor, seq_len):
    return lambda messages: processor.encode(messages, add_generation_prompt=False, return_labels=True,
                                             max_tokens=seq_len)


def test_dataset_labels_only_the_assistant_reply(tmp_path, processor):
    data = Dataset([make_color_data(tmp_path)], encoder(processor, 256), 256, Dist())
    assert len(data) == 6 and not data.bad
    sample = data.sample(0)
    supervised = sample.labels[sample.labels != -100]
    assert processor.tokenizer.decode(supervised.tolist()) == "red<|im_end|>"
    assert data.supervised[0] == supervised.numel() and data.lengths[0] == sample.input_ids.numel()
    assert (sample.input_ids == processor.tokenizer.image_pad_id).sum() == 4  # 56x56 image: 2x2 merged tokens


def test_over_length_and_broken_records_skip_or_fail(tmp_path, processor):
    path = make_color_data(tmp_path)
    records = path.read_text().splitlines()
    long_text = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    bad_image = {"messages": [{"role": "user", "content": [{"type": "image", "image": "broken.png"}]},
                              {"role": "assistant", "content": "x"}]}
    path.write_text("\n".join(records[:2] + [json.dumps(long_text), json.dumps(bad_image)] + records[2:]) + "\n")
    data = Dataset([path], encoder(processor, 120), 120, Dist(), on_bad_record="skip")
    assert len(data) == 6
    assert [b.source for b in data.bad] == ["data.jsonl:3", "data.jsonl:4"]
    assert "over the budget of 120" in data.bad[0].reason
    assert "broken.png" in data.bad[1].reason
    with pytest.raises(DataError, match="2 bad record\\(s\\) in .*data.jsonl:3: .*data.jsonl:4"):
        Dataset([path], encoder(processor, 120), 120, Dist(), on_bad_record="fail")


def test_vision_spans_are_never_cut(tmp_path, processor):
    """A budget that ends inside an image drops the sample whole, naming the image; nothing is truncated."""
    path = make_color_data(tmp_path)
    full = Dataset([path], encoder(processor, 256), 256, Dist())
    budget = full.lengths[0] - 1  # the text fits; the image brings the sample one token over
    with pytest.raises(DataError, match="data.jsonl:1: image 1 .* over the budget"):
        Dataset([path], encoder(processor, budget), budget, Dist(), on_bad_record="fail")


def test_no_usable_record_is_an_error(tmp_path, processor):
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(DataError, match="no usable record .*empty.jsonl:1: no assistant message"):
        Dataset([path], encoder(processor, 64), 64, Dist())


def test_sample_encoding_is_deterministic(tmp_path, processor):
    data = Dataset([make_color_data(tmp_path)], encoder(processor, 256), 256, Dist())
    a, b = data.sample(3), data.sample(3)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)


@pytest.mark.parametrize("name", ["stage1", "stage2", "stage3", "lora-2b"])
def test_example_configs_are_valid(name):
    from pathlib import Path

    opts = load_options(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml", {})
    for world in (1, 2, 4, 8):
        opts.validate(world_size=world)
    assert opts.stage == (1 if name == "stage1" else 2 if name == "stage2" else 3)
    assert opts.lora.enabled == (name == "lora-2b")
