"""The ScreenSpot-style click metric of `qwen2vl eval` on synthetic GUI screens."""

import json

from qwen2vl.agent.grounding import format_box, normalize, normalize_coords
from qwen2vl.agent.tools import format_call
from qwen2vl.data import evaluate as ev
from qwen2vl.data.metrics import format_table, score, summarise
from qwen2vl.data.synthetic import read_dataset, write_dataset


def _click(x, y):
    return format_call("computer_use", {"action": "click", "coordinate": [x, y]})


def _gui_records(tmp_path, n=40):
    path = write_dataset(tmp_path, n, 0, split="eval", tasks=["gui"], progress=False)
    return read_dataset(path), path.parent


def test_click_inside_the_box_counts_and_edges_are_exclusive(tmp_path):
    records, _ = _gui_records(tmp_path)
    for r in records:
        assert score(r, r["messages"][-1]["content"])["correct"] is True
        assert score(r, "I cannot see it.") == {**score(r, "I cannot see it."), "correct": False, "format_error": True}
        if r["meta"]["kind"] != "click":
            continue
        w, h = r["meta"]["size"]
        x1, y1, x2, y2 = r["meta"]["steps"][0]["box_px"]
        # the first and last bins whose centres fall inside the box hit; the bins just outside miss
        inside = [n for n in range(1000) if x1 <= (n + 0.5) * w / 1000 < x2]
        cy = normalize((y1 + y2) / 2, h)
        assert score(r, _click(inside[0], cy))["correct"] and score(r, _click(inside[-1], cy))["correct"]
        for n in (inside[0] - 1, inside[-1] + 1):
            if 0 <= n < 1000:
                result = score(r, _click(n, cy))
                assert not result["correct"] and not result["format_error"]
        # a grounding box answer is a click on its centre
        assert score(r, format_box(normalize_coords([x1, y1, x2, y2], (w, h)), "it"))["correct"]


def test_multi_step_needs_every_step(tmp_path):
    records, _ = _gui_records(tmp_path, n=80)
    multi = [r for r in records if r["meta"]["kind"] == "multi"]
    assert multi
    for r in multi:
        gold = r["messages"][-1]["content"]
        calls = gold.split("\n<tool_call>")
        wrong_text = gold.replace(json.dumps(r["meta"]["steps"][1]["text"]), '"nope"')
        assert score(r, wrong_text)["correct"] is False and score(r, wrong_text)["step_accuracy"] == 2 / 3
        assert score(r, calls[0])["step_accuracy"] == 1 / 3


def test_summary_breaks_clicks_down_by_element_and_size(tmp_path):
    records, _ = _gui_records(tmp_path, n=60)
    scored = [score(r, r["messages"][-1]["content"] if i % 2 else "nothing") for i, r in enumerate(records)]
    rows = {row["group"]: row for row in summarise(scored)}
    clicks = [s for s in scored if s["group"] == "gui (click)"]
    assert rows["gui (click)"]["n"] == len(clicks) and rows["gui (click)"]["metric"] == "click accuracy"
    assert rows["gui (click)"]["format_error"] == sum(s["format_error"] for s in clicks) / len(clicks)
    for s in clicks:
        for key in ("element", "size_class"):
            members = [c for c in clicks if c[key] == s[key]]
            row = rows[f"gui click / {s[key]}"]
            assert row["n"] == len(members) and row["score"] == sum(c["correct"] for c in members) / len(members)
    assert "gui click / button" in format_table(list(rows.values()))


def test_eval_runner_generates_gui_screens(tmp_path, capsys):
    out = tmp_path / "eval.json"
    args = ev.build_parser().parse_args(["--model", "m", "--n", "8", "--out", str(out), "--quiet", "--tasks", "gui"])
    result = ev.run(args, lambda convs: [_click(500, 500)] * len(convs))
    assert {s["group"] for s in result["samples"]} <= {"gui (click)", "gui (multi-step)"}
    assert "click accuracy" in capsys.readouterr().out
