"""Metrics edge cases, per-task dispatch, the summary table and the eval runner with an injected predictor."""

import json
import os

import pytest

from qwen2vl.data import evaluate as ev
from qwen2vl.data.metrics import (
    anls,
    box_iou,
    choice_match,
    exact_match,
    format_table,
    levenshtein,
    normalize_answer,
    parse_count,
    parse_number,
    relaxed_match,
    score,
    summarise,
)
from qwen2vl.data.synthetic import read_dataset, write_dataset


def test_normalize_and_exact_match():
    assert normalize_answer('  "Hello   World!" ') == "hello world"
    assert normalize_answer("K7-39QX.") == "k7-39qx"
    assert normalize_answer("'yes'.") == "yes"
    assert normalize_answer("left<|im_end|>") == "left"
    assert exact_match("CITY  CENTRE", "city centre") and exact_match("3.20", "3.20.")
    assert not exact_match("3.2", "3.20") and not exact_match("", "a")


def test_levenshtein_and_anls():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("same", "same") == 0
    assert anls("INV-48213", "inv-48213") == 1.0
    assert anls("kitchen", "kitchn") == pytest.approx(1 - 1 / 7)
    assert anls("abc", "xyz") == 0.0  # below the 0.5 threshold
    assert anls("abcd", "abxy") == 0.5 and anls("", "") == 1.0 and anls("", "word") == 0.0


@pytest.mark.parametrize("text,count", [("3", 3), ("There are 3 circles.", 3), ("three", 3), ("Three.", 3),
                                        ("I count twelve stars", 12), ("none", 0), ("There are no stars.", 0),
                                        ("0", 0), ("10 or 11", 10), ("two, not 5", 2), ("3.5", None),
                                        ("many", None), ("", None)])
def test_parse_count(text, count):
    assert parse_count(text) == count


def test_numbers_and_relaxed_accuracy():
    assert parse_number("about 1,250.5 units") == 1250.5 and parse_number("-3") == -3.0
    assert parse_number("value .5") == 0.5 and parse_number("none") is None
    assert relaxed_match("95", "100") and relaxed_match("105", "100") and not relaxed_match("94", "100")
    assert relaxed_match("0", "0") and not relaxed_match("1", "0") and not relaxed_match("n/a", "5")
    assert relaxed_match("It is 42.", "42")


def test_box_iou_and_choices():
    gold = [100, 100, 300, 300]
    assert box_iou("<|box_start|>(100,100),(300,300)<|box_end|>", gold) == 1.0
    assert box_iou("red circle (100, 100), (300, 200)", gold) == pytest.approx(0.5)
    assert box_iou("I cannot see it", gold) == 0.0
    assert choice_match("It moves to the left.", "left", ["left", "right", "up", "down"])
    assert not choice_match("left or right", "left", ["left", "right", "up", "down"])
    assert not choice_match("leftwards", "left", ["left", "right", "up", "down"])
    assert choice_match("The pink square.", "pink square", ["pink square", "red star"])
    assert not choice_match("red star", "pink square", ["pink square", "red star"])


def _records(tmp_path, n=60, **kw):
    path = write_dataset(tmp_path, n, 0, split="eval", progress=False, **kw)
    return read_dataset(path), path.parent


def test_gold_answers_score_perfectly_and_wrong_answers_do_not(tmp_path):
    records, _ = _records(tmp_path)
    assert {r["task"] for r in records} == {"reading", "counting", "grounding", "chart", "video"}
    for r in records:
        gold = r["messages"][-1]["content"]
        good = score(r, gold)
        assert good["correct"] is True, good
        assert score(r, "qqqq zzzz")["correct"] is False
    # near misses by task
    count = next(r for r in records if r["task"] == "counting")
    assert score(count, f"There are {count['meta']['count'] + 1}.")["correct"] is False
    ground = next(r for r in records if r["task"] == "grounding")
    x1, y1, x2, y2 = ground["meta"]["box"]
    w = x2 - x1
    assert score(ground, f"<|box_start|>({x1 + w // 10},{y1}),({x2 + w // 10},{y2})<|box_end|>")["correct"] is True
    assert score(ground, f"<|box_start|>({x2},{y1}),({x2 + w},{y2})<|box_end|>")["iou"] == 0.0


def test_summarise_separates_small_text_and_formats(tmp_path):
    records, _ = _records(tmp_path, n=80, tasks=["reading", "counting", "grounding"])
    scored = [score(r, r["messages"][-1]["content"] if i % 2 else "wrong") for i, r in enumerate(records)]
    rows = summarise(scored)
    groups = [row["group"] for row in rows]
    assert groups[-1] == "all" and {"reading (small text)", "reading (normal text)", "counting"} <= set(groups)
    by = {row["group"]: row for row in rows}
    for group, row in by.items():
        members = [s for s in scored if group in ("all", s["group"])]
        assert row["n"] == len(members)
        assert row["score"] == pytest.approx(sum(s["correct"] for s in members) / len(members))
    assert "anls" in by["reading (small text)"] and "mean_iou" in by["grounding"]
    small = [r for r in records if r["meta"].get("small_text")]
    assert by["reading (small text)"]["n"] == len(small) > 0
    table = format_table(rows)
    assert "reading (small text)" in table and "Acc@0.5" in table and "%" in table
    assert summarise([]) == []


def test_eval_runner_with_injected_predictor(tmp_path, capsys):
    records, root = _records(tmp_path / "data", n=20)
    seen = []

    def oracle(conversations):
        seen.extend(conversations)
        answers = {json.dumps(ev.conversation(r, root)): r["messages"][-1]["content"] for r in records}
        return [answers[json.dumps(c)] for c in conversations]

    scored, rows = ev.evaluate(records, root, oracle, batch_size=6, progress=False)
    assert rows[-1]["score"] == 1.0 and len(scored) == 20
    for conv in seen:
        item = conv[0]["content"][0]
        paths = item["video"] if item["type"] == "video" else [item["image"]]
        assert all(os.path.isabs(p) and os.path.isfile(p) for p in paths)
        assert conv[-1]["role"] == "user"

    forced = ev.conversation(records[0], root, force_size=(224, 224))
    assert forced[0]["content"][0]["resized_height"] == 224 == forced[0]["content"][0]["resized_width"]

    out = tmp_path / "eval.json"
    args = ev.build_parser().parse_args(["--model", "m", "--n", "10", "--seed", "3", "--out", str(out), "--quiet",
                                         "--tasks", "counting,video", "--video-pixels", "3136,6272"])
    prompts = []
    result = ev.run(args, lambda convs: prompts.extend(convs) or ["2"] * len(convs))
    videos = [c[0]["content"][0] for c in prompts if c[0]["content"][0]["type"] == "video"]
    assert videos and all((v["min_pixels"], v["max_pixels"]) == (3136, 6272) for v in videos)
    printed = capsys.readouterr().out
    assert "counting" in printed and str(out) in printed
    saved = json.loads(out.read_text())
    assert saved["rows"] == result["rows"] and len(saved["samples"]) == 10
    assert all(s["id"].startswith("eval-3-") for s in saved["samples"])

    with pytest.raises(RuntimeError, match="2 answers for 6"):
        ev.evaluate(records, root, lambda convs: ["x", "y"], batch_size=6, progress=False)
