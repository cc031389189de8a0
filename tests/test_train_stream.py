"""Training data generated on the fly: rows are pure functions of their index, phases, errors, exact resume."""

import json

import pytest
from test_train_resume import run_until_checkpoint
from train_helpers import make_tokenizer_dir, train_args

from qwen2vl.cli import main as qwen2vl_main
from qwen2vl.processing.processor import Processor
from qwen2vl.train.cli import main
from qwen2vl.train.dataset import DataError
from qwen2vl.train.metrics import read_metrics
from qwen2vl.train.stream import ROW_STRIDE, SyntheticStream

SEQ_LEN = 512
SPEC = {"split": "train", "seed": 3, "tasks": {"counting": 1, "grounding": 1, "chart": 1, "video": 1},
        "size_policy": "per-task", "video_pixels": [6272, 12544], "phases": [{"rows": 2, "tasks": {"basics": 1}}]}


def write_spec(path, **changes):
    path.write_text(json.dumps({"synthetic": {**SPEC, **changes}}))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def encode(tmp_path_factory):
    tok = make_tokenizer_dir(tmp_path_factory.mktemp("tok"))
    processor = Processor.from_pretrained(str(tok), max_pixels=56 * 56 * 4)

    def encode(messages):
        return processor.encode(messages, add_generation_prompt=False, return_labels=True)

    return encode


def test_rows_are_a_pure_function_of_their_index(tmp_path, encode):
    spec = write_spec(tmp_path / "mix.yaml")
    first, second = SyntheticStream(spec, encode, SEQ_LEN), SyntheticStream(spec, encode, SEQ_LEN)
    rows = [first.row(g) for g in range(4)]
    alone = second.row(3)  # without rows 0..2 before it
    assert [s.input_ids.tolist() for s in alone] == [s.input_ids.tolist() for s in rows[3]]
    for g, row in enumerate(rows):
        used = sum(int(s.input_ids.numel()) for s in row)
        assert row and used <= SEQ_LEN
        # the row ended because its next sample does not fit
        record = first.record(g * ROW_STRIDE + len(row), first.settings_at(g))
        assert used + int(encode(record["messages"]).input_ids.numel()) > SEQ_LEN
    assert rows[2][0].input_ids.tolist() != rows[3][0].input_ids.tolist()


def test_phases_choose_the_settings_by_row(tmp_path, encode):
    stream = SyntheticStream(write_spec(tmp_path / "mix.yaml"), encode, SEQ_LEN)
    tasks = [stream.record(g * ROW_STRIDE, stream.settings_at(g))["task"] for g in range(6)]
    assert tasks[:2] == ["basics", "basics"] and "basics" not in tasks[2:]
    assert stream.settings_at(1).video_pixels == (6272, 12544)  # inherited from the top level


def test_force_size_and_video_pixels_reach_the_records(tmp_path, encode):
    stream = SyntheticStream(write_spec(tmp_path / "mix.yaml", force_size=[224, 224], phases=[],
                                        tasks={"video": 1}), encode, SEQ_LEN)
    item = stream.record(0, stream.settings_at(0))["messages"][0]["content"][0]
    assert (item["resized_width"], item["resized_height"], item["min_pixels"], item["max_pixels"]) == (
        224, 224, 6272, 12544)


def test_style_is_set_globally_and_per_phase(tmp_path, encode):
    stream = SyntheticStream(write_spec(tmp_path / "mix.yaml", style="varied",
                                        phases=[{"rows": 1, "tasks": {"basics": 1}, "style": "plain"},
                                                {"rows": 1, "tasks": {"basics": 1}}]), encode, SEQ_LEN)
    assert [stream.settings_at(g).style for g in range(3)] == ["plain", "varied", "varied"]
    plain, varied = (stream.record(g * ROW_STRIDE, stream.settings_at(g)) for g in (0, 2))
    assert "style" not in plain["meta"] and "style" in varied["meta"]
    assert "varied style" in stream.summary()
    mixed = SyntheticStream(write_spec(tmp_path / "mixed.yaml", style={"plain": 0.5, "varied": 0.5}), encode, SEQ_LEN)
    looks = {"style" in mixed.record(i, mixed.settings_at(0))["meta"] for i in range(12)}
    assert looks == {True, False} and "{'plain': 0.5, 'varied': 0.5} style" in mixed.summary()
    default = SyntheticStream(write_spec(tmp_path / "plain.yaml"), encode, SEQ_LEN)
    assert {default.settings_at(g).style for g in range(3)} == {"plain"}  # unchanged for specs without it


@pytest.mark.parametrize("changes, message", [
    ({"size_policy": "huge"}, "size_policy 'huge' is not one of"),
    ({"style": "fancy"}, "style 'fancy' is not one of ['plain', 'varied']"),
    ({"packing": "tight"}, "packing 'tight' is not one of ['first', 'fill']"),
    ({"questions": 0}, "questions must be an integer >= 1, got 0"),
    ({"phases": [{"rows": 1, "style": "noisy"}]}, "phase 1: style 'noisy' is not one of"),
    ({"style": {"plain": 1, "glossy": 1}}, "unknown or no styles ['glossy'] in a style mix"),
    ({"colours": 3}, "unknown key(s) ['colours']"),
    ({"tasks": {"juggling": 1}}, "unknown or no tasks ['juggling']"),
    ({"phases": [{"tasks": {"basics": 1}}]}, "phase 1 needs rows >= 1"),
    ({"force_size": [224]}, "force_size must be two integers"),
])
def test_bad_specs_are_named(tmp_path, encode, changes, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        SyntheticStream(write_spec(tmp_path / "bad.yaml", **changes), encode, SEQ_LEN)


@pytest.mark.parametrize("budgeted", [False, True])
def test_samples_over_seq_len_are_passed_over(tmp_path, encode, budgeted):
    """A sample too long by itself is skipped (the encoder's over-budget error, or its length), the
    same way every time; a row where nothing fits names the fix."""
    spec = write_spec(tmp_path / "mix.yaml", phases=[])
    probe = SyntheticStream(spec, encode, SEQ_LEN)
    encoded = [encode(probe.record(2 * ROW_STRIDE + j, probe.settings)["messages"]) for j in range(8)]
    lengths = [int(s.input_ids.numel()) for s in encoded]
    seq_len = lengths[0] - 1  # the row's first sample does not fit by itself
    first_fit = next(j for j, n in enumerate(lengths) if n <= seq_len)
    processor = Processor.from_pretrained(str(make_tokenizer_dir(tmp_path / "tok")), max_pixels=56 * 56 * 4)

    def limited(messages):
        budget = {"max_tokens": seq_len} if budgeted else {}
        return processor.encode(messages, add_generation_prompt=False, return_labels=True, **budget)

    row = SyntheticStream(spec, limited, seq_len).row(2)
    assert row[0].input_ids.tolist() == encoded[first_fit].input_ids.tolist()
    assert sum(int(s.input_ids.numel()) for s in row) <= seq_len
    again = SyntheticStream(spec, limited, seq_len).row(2)
    assert [s.input_ids.tolist() for s in again] == [s.input_ids.tolist() for s in row]
    with pytest.raises(DataError, match=r"mix.yaml: no sample of row 0 fits in seq_len 5; raise seq_len"):
        SyntheticStream(spec, limited, 5).row(0)


def test_fill_packing_passes_over_what_does_not_fit(tmp_path, encode):
    """``packing: fill`` rows: a prefix equal to the ``first`` row, then only later samples that fit,
    the same every time; the first ``first`` row's unfilled room is never larger."""
    first = SyntheticStream(write_spec(tmp_path / "a.yaml", phases=[]), encode, SEQ_LEN)
    fill = SyntheticStream(write_spec(tmp_path / "b.yaml", phases=[], packing="fill"), encode, SEQ_LEN)
    assert fill.settings.packing == "fill" and "fill packing" in fill.summary()
    longer = 0
    for g in range(6):
        a, b = first.row(g), fill.row(g)
        ids = lambda row: [s.input_ids.tolist() for s in row]  # noqa: E731
        assert ids(b)[:len(a)] == ids(a) and ids(fill.row(g)) == ids(b)
        used = [sum(int(s.input_ids.numel()) for s in row) for row in (a, b)]
        assert used[0] <= used[1] <= SEQ_LEN
        longer += len(b) > len(a)
    assert longer > 0


def test_questions_add_follow_up_turns_and_drop_those_that_do_not_fit(tmp_path, encode):
    spec = write_spec(tmp_path / "q.yaml", phases=[], questions=4, tasks={"counting": 1})
    stream = SyntheticStream(spec, encode, SEQ_LEN)
    assert stream.settings.questions == 4 and "up to 4 question(s)" in stream.summary()
    messages = stream.record(0, stream.settings)["messages"]
    assert len(messages) == 8  # four questions, four answers
    full = encode(messages)
    one = encode(messages[:2])
    supervised = lambda s: int((s.labels != -100).sum())  # noqa: E731
    assert supervised(full) > supervised(one)
    short = SyntheticStream(spec, encode, int(one.input_ids.numel()) + 5)  # room for the first answer only
    assert short.encode_fitting(messages).input_ids.tolist() == one.input_ids.tolist()
    assert stream.encode_fitting(messages).input_ids.tolist() == full.input_ids.tolist()
    assert sum(int(s.input_ids.numel()) for s in short.row(0)) <= short.seq_len


def test_training_on_a_stream_resumes_exactly(tmp_path):
    """SIGKILL after the step-2 checkpoint, resume: steps 3..5 have the uninterrupted run's losses."""
    spec = write_spec(tmp_path / "mix.yaml")
    common = dict(max_steps=5, seq_len=SEQ_LEN, batch_size=2, max_pixels=56 * 56 * 4, lr=3e-3, warmup_steps=1,
                  export=False, save_every=2)
    assert main(train_args(tmp_path, spec, tmp_path / "full", **common)) == 0
    reference = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert all(r["samples"] >= 2 and 0 <= r["padding"] < 1 for r in reference)
    assert len({r["loss"] for r in reference}) == 5
    out = tmp_path / "killed"
    args = train_args(tmp_path, spec, out, **common)
    run_until_checkpoint(args, out, 2)
    assert main(args + ["--resume"]) == 0
    resumed = {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")}
    assert {s: resumed[s] for s in (3, 4, 5)} == {r["step"]: r["loss"] for r in reference[2:]}


def test_a_stream_must_be_the_only_data(tmp_path, capsys):
    spec = write_spec(tmp_path / "mix.yaml")
    args = train_args(tmp_path, spec, tmp_path / "x", max_steps=1, seq_len=SEQ_LEN)
    args[args.index("--data") + 1] = f"[{spec}, {tmp_path / 'other.jsonl'}]"
    assert qwen2vl_main(["train", *args]) == 2
    assert "must be the only `data` entry" in capsys.readouterr().err
