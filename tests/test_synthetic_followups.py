"""Follow-up questions: the single-question sample unchanged, every follow-up answer true of the drawn image."""

import re
from collections import Counter

import pytest
from test_synthetic import digest

from qwen2vl.agent.grounding import denormalize_coords, parse_regions
from qwen2vl.data.metrics import predicted_actions
from qwen2vl.data.synthetic import generate_sample
from qwen2vl.data.synthetic.charts import MAX_Q, MIN_Q, VALUE_Q
from qwen2vl.data.synthetic.shapes import COUNT_Q, SHAPES
from qwen2vl.data.synthetic.writer import to_record

ASKED = ["counting", "grounding", "basics", "chart", "gui"]


def field_in(question: str, templates: list[str], field: str) -> str | None:
    """The ``{field}`` of the template that ``question`` fills (the shortest reading), or None."""
    found = []
    for t in templates:
        if "{title}" not in t:
            m = re.fullmatch(re.escape(t).replace(re.escape("{" + field + "}"), "(.+)"), question)
            found += [m.group(1)] if m else []
    return min(found, key=len) if found else None


def count_of(things: str, objects: list[dict]) -> int:
    """Recount ``things`` ("shapes", "red shapes", "stars", "red stars") in the scene's objects."""
    words = things.split()
    if things in ("shapes", "objects"):
        return len(objects)
    if len(words) == 2 and words[1] == "shapes":
        return sum(o["colour"] == words[0] for o in objects)
    shape = next(s for s in SHAPES if words[-1] in (s + "s", s + "es"))
    return sum(o["shape"] == shape and (len(words) == 1 or o["colour"] == words[0]) for o in objects)


@pytest.mark.parametrize("task", ASKED + ["reading", "video"])
def test_followups_leave_the_sample_as_it_was(task):
    asked = 0
    for index in range(4):
        one = generate_sample(index, 3, "train", [task], "per-task")
        more = generate_sample(index, 3, "train", [task], "per-task", questions=4)
        assert (more.question, more.answer, more.meta, digest(more)) == (one.question, one.answer, one.meta, digest(one))
        assert one.followups == [] and len(more.followups) <= 3
        asked += len(more.followups)
    assert (asked > 0) == (task in ASKED)  # (a GUI screen of one element has nothing more to ask)


def test_shape_followups_are_true_of_the_scene():
    counts = grounds = 0
    for index in range(30):
        s = generate_sample(index, 1, "train", ["counting", "grounding"], "per-task", questions=4)
        objects, size = s.meta["objects"], tuple(s.meta["size"])
        labels = Counter(f"{o['colour']} {o['shape']}" for o in objects)
        for question, answer in s.followups:
            if answer.startswith("<|object_ref_start|>"):
                [region] = parse_regions(answer)
                assert labels[region.label] == 1 and region.label in question  # unambiguous
                [o] = [o for o in objects if f"{o['colour']} {o['shape']}" == region.label]
                back = denormalize_coords(region.box, size)
                assert all(abs(g - w) <= e / 2000 + 1e-9 for g, w, e in zip(back, o["box"], size * 2))
                grounds += 1
            else:
                things = field_in(question, COUNT_Q, "things")
                assert things, question
                assert answer == str(count_of(things, objects)), (question, answer)
                counts += 1
        asked = [q for q, _ in s.followups] + [s.question]
        assert len(set(asked)) == len(asked)
    assert counts > 20 and grounds > 20


def test_chart_and_gui_followups_are_true_of_the_image():
    for index in range(12):
        s = generate_sample(index, 2, "train", ["chart"], "per-task", questions=4)
        values = s.meta["values"]
        for question, answer in s.followups:
            if cat := field_in(question, VALUE_Q, "cat"):
                assert answer == str(values[cat])
            else:
                highest = question in MAX_Q
                assert highest or question in MIN_Q
                assert answer == (max if highest else min)(values, key=values.get)
        g = generate_sample(index, 2, "train", ["gui"], "per-task", questions=4)
        elements = {e["label"]: e for e in g.meta["elements"]}
        for question, answer in g.followups:
            [label] = [x for x in elements if re.search(rf'\b{re.escape(x)}\b', question)] or [None]
            assert label is not None, question
            [action] = predicted_actions(answer)
            x, y = action.pixels(g.image.size)
            x1, y1, x2, y2 = elements[label]["box"]
            assert x1 <= x < x2 and y1 <= y < y2


def test_followups_are_later_turns_of_the_record():
    s = generate_sample(5, 0, "train", ["counting"], "per-task", questions=3)
    messages = to_record(s, "x", "images/x.png")["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * (1 + len(s.followups))
    assert messages[0]["content"][0] == {"type": "image", "image": "images/x.png"}
    assert [(m["content"], n["content"]) for m, n in zip(messages[2::2], messages[3::2])] == s.followups
