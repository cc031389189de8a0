"""Synthetic data: determinism by seed, answers consistent with the pixels, phrasing variety, sizes."""

import hashlib
import json
import os

import numpy as np
import pytest

from qwen2vl.agent.grounding import denormalize_coords, iou, parse_regions
from qwen2vl.data import make_dataset
from qwen2vl.data.synthetic import (
    SIZE_POLICIES,
    TASKS,
    charts,
    generate_sample,
    read_dataset,
    reading,
    shapes,
    video,
    write_dataset,
)
from qwen2vl.data.synthetic import style as styles
from qwen2vl.data.synthetic.common import COLOURS

N = 80  # samples per task in the consistency checks
STYLES = ["plain", "varied"]


def samples(task, n=N, seed=3, policy="varied", style="plain", split="train"):
    tasks = [task] if isinstance(task, str) else task
    return [generate_sample(i, seed, split, tasks, policy, style) for i in range(n)]


def colour_mask(image, name):
    return np.all(np.asarray(image) == COLOURS[name], axis=-1)


def tight_box(mask):
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def shape_mask_px(image, name, outline=0):
    """Pixels of the named colour (and, with an ``outline``, of its darker edge)."""
    mask = colour_mask(image, name)
    if outline:
        mask |= np.all(np.asarray(image) == styles.mix(COLOURS[name], (0, 0, 0), 0.45), axis=-1)
    return mask


def check_objects_match_pixels(image, objects, outline=0):
    """Every object's box is the exact bbox of its colour there (with its outline, if drawn), and no
    colour pixel lies outside boxes."""
    for name in {o["colour"] for o in objects}:
        mask, full = colour_mask(image, name), shape_mask_px(image, name, outline)
        covered = np.zeros_like(mask)
        for o in objects:
            x1, y1, x2, y2 = o["box"]
            covered[y1:y2, x1:x2] = True
            if o["colour"] == name:
                assert full[y1:y2, x1:x2].mean() > 0.3, o  # a filled shape, not a sliver
                assert mask[y1:y2, x1:x2].any(), o
                assert tight_box(full[y1:y2, x1:x2]) == [0, 0, x2 - x1, y2 - y1], o
        assert not (full & ~covered).any(), f"{name} pixels outside every box"


def outline_of(sample):
    return sample.meta.get("style", {}).get("outline", 0)


# ------------------------------------------------------------------------------------------ determinism

def test_same_seed_same_sample_and_namespaces_differ():
    for task in ("reading", "counting", "grounding", "chart", "video"):
        a, b = generate_sample(7, 11, "train", [task]), generate_sample(7, 11, "train", [task])
        assert (a.question, a.answer, a.meta) == (b.question, b.answer, b.meta)
        pa = a.image.tobytes() if a.image else b"".join(f.tobytes() for f in a.frames)
        pb = b.image.tobytes() if b.image else b"".join(f.tobytes() for f in b.frames)
        assert pa == pb
    train = [generate_sample(i, 0, "train") for i in range(20)]
    other_seed = [generate_sample(i, 1, "train") for i in range(20)]
    held_out = [generate_sample(i, 0, "eval") for i in range(20)]
    key = [(s.task, s.question, s.answer, json.dumps(s.meta, sort_keys=True)) for s in train]
    assert key != [(s.task, s.question, s.answer, json.dumps(s.meta, sort_keys=True)) for s in other_seed]
    assert not set(key) & {(s.task, s.question, s.answer, json.dumps(s.meta, sort_keys=True)) for s in held_out}


def _tree_digest(root):
    digest = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            digest.update(name.encode())
            with open(os.path.join(dirpath, name), "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def test_write_dataset_is_deterministic_for_any_worker_count(tmp_path):
    one = write_dataset(tmp_path / "a", 24, 5, progress=False)
    two = write_dataset(tmp_path / "b", 24, 5, progress=False, workers=2)
    assert _tree_digest(one.parent) == _tree_digest(two.parent)
    records = read_dataset(one)
    assert len(records) == 24 and len({r["id"] for r in records}) == 24
    for r in records:
        user, assistant = r["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant" and assistant["content"]
        item, text = user["content"]
        assert text["type"] == "text" and text["text"]
        paths = item["video"] if item["type"] == "video" else [item["image"]]
        assert all((one.parent / p).is_file() for p in paths)  # relative to the JSONL
        assert not any(os.path.isabs(p) for p in paths)
    manifest = json.loads((one.parent / "manifest.json").read_text())
    assert sum(manifest["task_counts"].values()) == 24


def test_force_size_marks_every_media_item_and_keeps_native_files(tmp_path):
    path = write_dataset(tmp_path, 12, 2, progress=False, force_size=(224, 224), tasks=["reading", "video"])
    from PIL import Image

    for r in read_dataset(path):
        item = r["messages"][0]["content"][0]
        assert item["resized_height"] == 224 and item["resized_width"] == 224
        first = item["video"][0] if item["type"] == "video" else item["image"]
        assert list(Image.open(path.parent / first).size) == r["meta"]["size"]


def test_mp4_video_decodes_to_the_frames(tmp_path):
    av = pytest.importorskip("av")
    path = write_dataset(tmp_path, 3, 0, progress=False, tasks=["video"], video_format="mp4")
    for r in read_dataset(path):
        item = r["messages"][0]["content"][0]
        assert item["video"].endswith(".mp4")
        with av.open(str(path.parent / item["video"])) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == r["meta"]["n_frames"]
        assert [frames[0].shape[1], frames[0].shape[0]] == r["meta"]["size"]


def test_make_dataset_cli(tmp_path, capsys):
    assert make_dataset.main(["--out", str(tmp_path), "--n", "5", "--seed", "1", "--split", "eval",
                              "--tasks", "counting=2,chart", "--force-size", "224", "--quiet"]) == 0
    records = read_dataset(tmp_path)
    assert {r["task"] for r in records} <= {"counting", "chart"} and records[0]["id"].startswith("eval-1-")
    assert make_dataset.main(["--out", str(tmp_path / "v"), "--n", "2", "--seed", "1", "--tasks", "video",
                              "--video-pixels", "3136,50176", "--quiet"]) == 0
    for r in read_dataset(tmp_path / "v"):
        item = r["messages"][0]["content"][0]
        assert (item["min_pixels"], item["max_pixels"]) == (3136, 50176)
    from qwen2vl.cli import UserError

    with pytest.raises(UserError, match="unknown task 'ocr'"):
        make_dataset.main(["--out", str(tmp_path), "--n", "1", "--seed", "0", "--tasks", "ocr"])
    with pytest.raises(UserError, match="video-pixels"):
        make_dataset.main(["--out", str(tmp_path), "--n", "1", "--seed", "0", "--video-pixels", "9,3"])
    with pytest.raises(UserError, match="force-size"):
        make_dataset.main(["--out", str(tmp_path), "--n", "1", "--seed", "0", "--force-size", "big"])


# ------------------------------------------------------------------------------- answers match pixels

@pytest.mark.parametrize("style", STYLES)
def test_counting_answer_equals_the_drawn_shapes(style):
    seen_zero = False
    for s in samples("counting", style=style):
        objects, target = s.meta["objects"], s.meta["target"]
        check_objects_match_pixels(s.image, objects, outline_of(s))
        count = sum((target["colour"] in (None, o["colour"])) and (target["shape"] in (None, o["shape"]))
                    for o in objects)
        assert s.answer == str(count) == str(s.meta["count"])
        seen_zero |= count == 0
    assert seen_zero


@pytest.mark.parametrize("style", STYLES)
def test_grounding_box_encloses_the_drawn_shape(style):
    for s in samples("grounding", style=style):
        w, h = s.image.size
        [region] = parse_regions(s.answer)
        assert region.label == s.meta["label"] and list(region.box) == s.meta["box"]
        assert all(0 <= v < 1000 for v in region.box)
        colour = s.meta["label"].split()[0]
        target = [o for o in s.meta["objects"] if f'{o["colour"]} {o["shape"]}' == s.meta["label"]]
        assert len(target) == 1  # the reference is unambiguous
        check_objects_match_pixels(s.image, s.meta["objects"], outline_of(s))
        x1, y1, x2, y2 = s.meta["box_px"]
        assert colour_mask(s.image, colour)[y1:y2, x1:x2].any()
        back = denormalize_coords(region.box, (w, h))
        for got, want, extent in zip(back, s.meta["box_px"], (w, h, w, h)):
            assert abs(got - want) <= extent / 2000 + 1e-9  # within half a bin of the exact pixel box
        assert iou(back, s.meta["box_px"]) > 0.8


@pytest.mark.parametrize("style", STYLES)
def test_chart_bars_have_the_answered_values(style):
    kinds = set()
    for s in samples("chart", style=style):
        m = s.meta
        kinds.add(m["kind"])
        values = list(m["values"].values())
        if m["kind"] == "value":
            assert s.answer == str(m["values"][m["category"]])
        else:
            assert s.answer == m["category"] and values.count(m["values"][s.answer]) == 1
            assert m["values"][s.answer] == (max(values) if m["kind"] == "max" else min(values))
        left, top, right, base = m["plot"]
        pixels = np.asarray(s.image)
        for (x0, y0, x1, _), value in zip(m["bars"], values):
            assert base - y0 == max(1, round((base - top) * value / m["axis_max"]))
            cx = (x0 + x1) // 2
            bar = pixels[base - 1, cx]
            assert tuple(pixels[y0, cx]) == tuple(bar) and tuple(pixels[y0 - 1, cx]) != tuple(bar)
        if not m["labelled"]:
            assert all(v % (m["axis_max"] // 10) == 0 for v in values)
    assert kinds == {"value", "max", "min"}


@pytest.mark.parametrize("style", STYLES)
def test_video_answers_follow_the_frames(style):
    kinds = set()
    for s in samples("video", n=60, style=style):
        m = s.meta
        kinds.add(m["kind"])
        assert len(s.frames) == m["n_frames"] in (4, 6, 8)
        assert all(f.size == tuple(m["size"]) for f in s.frames) and all(v % 2 == 0 for v in m["size"])
        if m["kind"] == "direction":
            colour = m["label"].split()[0]
            for frame, (x1, y1, x2, y2) in zip(s.frames, m["boxes"]):
                sub = shape_mask_px(frame, colour, outline_of(s))[y1:y2, x1:x2]
                assert tight_box(sub) == [0, 0, x2 - x1, y2 - y1]
            (ax, ay), (bx, by) = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in (m["boxes"][0], m["boxes"][-1])]
            moved = {"left": ax - bx, "right": bx - ax, "up": ay - by, "down": by - ay}
            assert max(moved, key=moved.get) == s.answer and moved[s.answer] > 0
        else:
            for label, (x1, y1, x2, y2) in m["boxes"].items():
                colour = label.split()[0]
                visible = [colour_mask(f, colour)[y1:y2, x1:x2].any() for f in s.frames]
                assert visible == [t >= m["appear"][label] for t in range(len(s.frames))]
            order = sorted(m["appear"], key=m["appear"].get)
            assert s.answer == (order[0] if m["kind"] == "first" else order[-1])
            assert len(set(m["appear"].values())) == len(order)
        assert s.answer in m["choices"]
    assert kinds == {"direction", "first", "last"}


@pytest.mark.parametrize("style", STYLES)
def test_reading_small_text_tags_and_ink(style):
    tags = {True: 0, False: 0}
    for s in samples("reading", n=200, style=style):
        m = s.meta
        w, h = s.image.size
        assert m["text_px_224"] == pytest.approx(m["font_px"] * 224 / max(w, h), abs=0.01)
        assert m["small_text"] == (m["font_px"] * 224 / max(w, h) < reading.SMALL_TEXT_PX)
        assert m["font_px"] >= reading.NATIVE_MIN_PX or not m["small_text"]
        tags[m["small_text"]] += 1
        x1, y1, x2, y2 = m["text_box"]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        region = np.asarray(s.image.convert("L"))[y1:y2, x1:x2]
        assert region.max() - region.min() > 60  # ink on paper where the answer was drawn
        assert s.answer.strip() == s.answer and s.answer
    assert tags[True] > 30 and tags[False] > 80
    kinds = {generate_sample(i, 3, "train", ["reading"]).meta["kind"] for i in range(60)}
    assert kinds == {"document", "receipt", "sign"}


@pytest.mark.parametrize("style", STYLES)
def test_words_are_short_texts_filling_a_sign(style):
    """``words``, the reading curriculum's start: reading samples of kind sign, text as big as fits."""
    for s in samples("words", n=40, policy="per-task", style=style):
        w, h = s.image.size
        assert s.task == "reading" and s.meta["kind"] == "sign" and not s.meta["small_text"]
        assert max(w, h) <= 320 and len(s.answer.split()) <= 3
        x1, y1, x2, y2 = s.meta["text_box"]
        assert (x2 - x1) >= 0.5 * w or (y2 - y1) >= 0.35 * h  # the text fills the sign one way or the other
        region = np.asarray(s.image.convert("L"))[y1:y2, x1:x2]
        assert region.max() - region.min() > 60


def test_a_style_mix_draws_one_style_per_sample_on_its_own_stream():
    """A mix leaves each sample as its drawn style makes it, so a plain-only mix is the plain stream."""
    mix = {"plain": 0.5, "varied": 0.5}
    drawn = [styles.pick_style(mix, "train", 4, i) for i in range(40)]
    assert set(drawn) == {"plain", "varied"} and drawn == [styles.pick_style(mix, "train", 4, i) for i in range(40)]
    for i in range(6):
        for task in ("counting", "reading"):
            got = digest(generate_sample(i, 4, "train", [task], "per-task", mix))
            assert got == digest(generate_sample(i, 4, "train", [task], "per-task", drawn[i]))
            assert digest(generate_sample(i, 4, "train", [task], "per-task", {"plain": 1})) == \
                digest(generate_sample(i, 4, "train", [task], "per-task"))
    for bad, message in [({"noisy": 1}, "unknown or no styles"), ({"plain": -1}, "non-negative"),
                         ({"plain": 0}, "positive sum"), ({}, "unknown or no styles")]:
        with pytest.raises(ValueError, match=message):
            styles.pick_style(bad, "train", 0, 0)


# ----------------------------------------------------------------------------------- phrasing and sizes

TEMPLATES = [reading.TITLE_Q, reading.FIELD_Q, reading.TOTAL_Q, reading.PRICE_Q, reading.STORE_Q, reading.SIGN_Q,
             shapes.COUNT_Q, shapes.GROUND_Q, charts.VALUE_Q, charts.MAX_Q, charts.MIN_Q, video.DIRECTION_Q,
             video.FIRST_Q, video.LAST_Q]


def test_every_question_kind_has_ten_phrasings_in_use():
    assert all(len(set(t)) >= 10 for t in TEMPLATES)
    for task in ("reading", "counting", "grounding", "chart", "video"):
        batch = samples(task, n=150, seed=9)
        assert len({s.question for s in batch}) >= 30
        per_kind = {}
        for s in batch:
            per_kind.setdefault(s.meta["phrasing"].rsplit("/", 1)[0], set()).add(s.meta["phrasing"])
        assert max(len(ids) for ids in per_kind.values()) >= 10, per_kind


@pytest.mark.parametrize("policy", ["varied", "compact"])
def test_image_sizes_span_the_policy(policy):
    limits = SIZE_POLICIES[policy]
    sizes = [s.image.size for task in ("reading", "counting", "grounding", "chart")
             for s in samples(task, n=60, seed=4, policy=policy)]
    sides = [v for size in sizes for v in size]
    assert min(sides) >= limits.min_side and max(sides) <= limits.max_side
    assert min(sides) < 1.6 * limits.min_side and max(sides) > 0.8 * limits.max_side
    ratios = [w / h for w, h in sizes]
    assert min(ratios) < 0.6 and max(ratios) > 1.8


# ------------------------------------------------------------------------------------------ gui screens

@pytest.mark.parametrize("style", STYLES)
def test_gui_screens_answers_click_inside_the_drawn_target(style):
    from qwen2vl.data.metrics import predicted_actions
    from qwen2vl.data.synthetic import gui

    batch = samples("gui", n=120, seed=5, style=style)
    assert generate_sample(3, 5, "train", ["gui"], style=style).answer == batch[3].answer  # deterministic
    kinds = {(s.meta["kind"], s.meta["element"]) for s in batch}
    assert {"button", "link", "tab", "field", "checkbox", "menu", "dialog"} <= {e for _, e in kinds}
    assert ("multi", "field") in kinds
    assert {s.meta["size_class"] for s in batch} == {"small", "medium", "large"}
    ratios = [s.image.size[0] / s.image.size[1] for s in batch]
    assert min(ratios) < 0.65 and max(ratios) > 1.3  # phones and desktops
    assert {s.meta["theme"] for s in batch} == set(gui.THEMES)
    for s in batch:
        labels = [e["label"] for e in s.meta["elements"]]
        assert len(labels) == len(set(labels)), labels  # one element per label: the instruction is unambiguous
        assert s.meta["label"] in s.question
        actions = predicted_actions(s.answer)
        assert len(actions) == len(s.meta["steps"]) == (3 if s.meta["kind"] == "multi" else 1)
        pixels = np.asarray(s.image)
        for action, step in zip(actions, s.meta["steps"]):
            if step["action"] == "type":
                assert action.kind == "type" and action.text in s.question
                continue
            x1, y1, x2, y2 = step["box_px"]
            x, y = action.pixels(s.image.size)
            assert x1 <= x < x2 and y1 <= y < y2
            region = pixels[y1:y2, x1:x2].reshape(-1, 3)
            assert len(np.unique(region, axis=0)) > 1  # something is drawn in the target box


# ------------------------------------------------------------------------------ per-task sizes, basics

def test_per_task_policy_caps_each_task_and_leaves_the_others():
    policy = SIZE_POLICIES["per-task"]
    caps = dict(policy.task_max_side)
    for task in ("counting", "grounding", "chart", "reading"):
        sides = [v for s in samples(task, n=60, seed=6, policy="per-task") for v in s.image.size]
        limit = caps.get(task, policy.max_side)
        assert min(sides) >= policy.min_side and max(sides) <= limit and max(sides) > 0.8 * limit, task
    assert policy.for_task("reading") is policy
    # the cap changes only the sizes drawn: the same scene is asked about under both policies
    assert generate_sample(7, 6, "train", ["counting"], "per-task").meta["kind"] == generate_sample(
        7, 6, "train", ["counting"], "compact").meta["kind"]
    with pytest.raises(ValueError, match="max side 600 of task 'chart' is outside"):
        type(policy)(100, 512, (("chart", 600),))


@pytest.mark.parametrize("style", STYLES)
def test_basics_answers_match_the_big_drawn_shapes(style):
    batch = samples("basics", n=90, seed=8, policy="per-task", style=style)
    assert {s.meta["kind"] for s in batch} == {"colour", "shape", "count"}
    for s in batch:
        objects = s.meta["objects"]
        pixels = np.asarray(s.image)
        for o in objects:
            x1, y1, x2, y2 = o["box"]
            assert min(x2 - x1, y2 - y1) >= min(s.image.size) // 5  # big (a quarter of the short side, less when crowded)
            assert (pixels[y1:y2, x1:x2] == COLOURS[o["colour"]]).all(axis=-1).any()
        expected = {"colour": objects[0]["colour"], "shape": objects[0]["shape"], "count": str(len(objects))}
        assert s.answer == expected[s.meta["kind"]]


@pytest.mark.parametrize("style", STYLES)
def test_scenes_are_few_big_shapes_with_true_answers(style):
    """``scenes``: counting or grounding on 1 to 7 shapes, each side an eighth of the short side or more."""
    batch = samples("scenes", n=60, seed=4, policy="per-task", style=style)
    assert {s.task for s in batch} == {"counting", "grounding"}
    for s in batch:
        objects = s.meta["objects"]
        assert 1 <= len(objects) <= 7 and max(s.image.size) <= 320
        check_objects_match_pixels(s.image, objects, outline_of(s))
        for o in objects:
            x1, y1, x2, y2 = o["box"]
            assert max(x2 - x1, y2 - y1) >= max(12, min(s.image.size) // 8) - 1  # the mask's box of a side-s shape
        if s.task == "counting":
            target = s.meta["target"]
            assert s.answer == str(sum((target["colour"] in (None, o["colour"])) and (target["shape"] in (None, o["shape"]))
                                       for o in objects))
        else:
            assert [f"{o['colour']} {o['shape']}" for o in objects].count(s.meta["label"]) == 1


# ------------------------------------------------------------------------------------------ styles

PLAIN_HASHES = {  # computed from the generator before styles existed (Pillow 13.0.0)
    "train/reading/varied": ["91fdcb7170af18ec", "a76c046466f96c0e", "12c0e9757acb9001"],
    "train/reading/per-task": ["7757fb34189d20c3", "0560f598750732f0", "112567321cd7e181"],
    "train/counting/varied": ["e253b9bb4d9a85d9", "c16eaba4a2bcc876", "3e29e4a87bed3f88"],
    "train/counting/per-task": ["e253b9bb4d9a85d9", "630464dbbcb2d2b2", "629165e725c44256"],
    "train/grounding/varied": ["5c0b67c0c86d9a23", "23b4ec9f453389e9", "6380b751445ba0df"],
    "train/grounding/per-task": ["814f12e4643e0225", "f2a304c84c51f6f7", "c28534adb2b54082"],
    "train/chart/varied": ["ad974929ea71d95d", "e8ed7a920d129b09", "dd796fd47c7fef39"],
    "train/chart/per-task": ["d18b9a332456235e", "b6edabe24ffe6683", "9c76e7610dc2b1f7"],
    "train/video/varied": ["b7488d923fa3d72d", "c9fd5cc94df57229", "aac20f930abcdc0a"],
    "train/video/per-task": ["b7488d923fa3d72d", "c9fd5cc94df57229", "aac20f930abcdc0a"],
    "train/gui/varied": ["4b9c993330f2ab8f", "0617db66b6eda8ba", "9df42995297d4d34"],
    "train/gui/per-task": ["faa9e7d13d9ab960", "14ac7f78563ac6c9", "c919e41bdea8c999"],
    "train/basics/varied": ["e3db53ebd238461f", "1344a59c4a781838", "2b2f271aefb33d24"],
    "train/basics/per-task": ["ff2119cfece933a6", "3c2e287ce1dc9515", "818f9e3aaa392481"],
    "eval/reading/varied": ["3d5c5c9e91acaeb8", "a27f3ff1f29675d3", "69113e86798d3ace"],
    "eval/reading/per-task": ["f77dd89697b29805", "1cf07937df99985f", "027ec8746b7e0ab2"],
    "eval/counting/varied": ["19aea9dad6744836", "eecc17da6f9d6eff", "6f61e3e00c3827f2"],
    "eval/counting/per-task": ["295fef1e5c98be15", "7409ec76ea74dd0f", "59af6146f372d06a"],
    "eval/grounding/varied": ["53da5e2847b2122f", "859907f9d1164060", "543c38f7c1069545"],
    "eval/grounding/per-task": ["0dac4d13b0eafbce", "06a408b12f2e57da", "a8e4b0abeb393e29"],
    "eval/chart/varied": ["edf509424126f5e9", "fbd67fd98c3c76d6", "ff68103bad93672c"],
    "eval/chart/per-task": ["3dccf0526a81d3ae", "d4422d60e4566571", "e89cb075a108a6cc"],
    "eval/video/varied": ["04af44520ec31236", "053243f8e0eccecf", "c11151373c31dfb3"],
    "eval/video/per-task": ["04af44520ec31236", "053243f8e0eccecf", "c11151373c31dfb3"],
    "eval/gui/varied": ["0f86b1d0f1aa2b99", "b527d72f7e72b19e", "2763648cbf8f5050"],
    "eval/gui/per-task": ["0ca43c620ef4a5fc", "d986e74b5a1e3dda", "5c934e3ad23a65ae"],
    "eval/basics/varied": ["f8e9e6cbba8a4fa5", "bd14f2881f1b335c", "95678254caff8fbb"],
    "eval/basics/per-task": ["490b29b052eb154e", "75e4f7e57d59bd5b", "3e560adab16def83"],
    "train/mix/per-task": ["0336e29220bee844", "2429d316d602f685", "570f5300ed0ff0da", "4c09edc9cc41a16a", "f8482898f5ce4fe5", "1b2b5439e48d00ab"],
}


def digest(s):
    h = hashlib.sha256()
    h.update(json.dumps([s.task, s.question, s.answer, s.meta], sort_keys=True).encode())
    for im in ([s.image] if s.image is not None else s.frames):
        h.update(repr((im.mode, im.size)).encode())
        h.update(im.tobytes())
    return h.hexdigest()[:16]


def test_plain_style_is_the_original_generator_byte_for_byte():
    """A run under way trains on these rows and resumes from them: plain samples must never change."""
    got = {}
    for key in PLAIN_HASHES:
        split, task, policy = key.split("/")
        if task == "mix":
            mix = {"reading": 1, "counting": 1, "gui": 1, "basics": 1}
            got[key] = [digest(generate_sample(i, 0, split, mix, policy)) for i in range(6)]
        else:
            got[key] = [digest(generate_sample(i, 7, split, [task], policy, **({"style": "plain"} if i % 2 else {})))
                        for i in range(3)]  # the default style is plain
    assert got == PLAIN_HASHES


def test_varied_style_is_deterministic_and_differs_from_plain():
    for task in sorted(TASKS):
        a = generate_sample(5, 2, "train", [task], "compact", "varied")
        b = generate_sample(5, 2, "train", [task], "compact", "varied")
        assert digest(a) == digest(b) and "style" in a.meta
        assert digest(a) != digest(generate_sample(5, 2, "train", [task], "compact"))
    with pytest.raises(ValueError, match="style 'fancy' is not one of"):
        generate_sample(0, 0, style="fancy")


def test_reserved_fonts_stay_out_of_the_train_split_only():
    text_tasks = ["reading", "chart", "gui"]
    train = [s.meta["style"]["font"] for s in samples(text_tasks, n=300, seed=1, policy="compact", style="varied")]
    held_out = [s.meta["style"]["font"] for s in
                samples(text_tasks, n=300, seed=1, policy="compact", style="varied", split="eval")]
    assert not set(train) & set(styles.RESERVED_FONTS) and len(set(train)) >= 12
    assert set(styles.RESERVED_FONTS) <= set(held_out)
    assert sum(f in styles.RESERVED_FONTS for f in held_out) > 15
    assert {f.name for f in styles.FACES} == set(held_out)


def test_varied_shape_backgrounds_keep_away_from_the_named_colours():
    named = np.array(list(COLOURS.values()), np.float32)
    kinds, dark = set(), 0
    for task in ("counting", "grounding", "basics", "video"):
        for s in samples(task, n=25, seed=4, policy="per-task", style="varied"):
            if task == "video" and s.meta["kind"] == "direction":
                continue  # its static shapes are not in the meta
            pixels = np.asarray(s.image if s.image is not None else s.frames[-1], np.float32)
            free = np.ones(pixels.shape[:2], bool)
            boxes = [o["box"] for o in s.meta["objects"]] if task != "video" else list(s.meta["boxes"].values())
            for x1, y1, x2, y2 in boxes:
                free[max(0, y1 - 1):y2 + 1, max(0, x1 - 1):x2 + 1] = False
            back = pixels[free][::7]
            nearest = np.sqrt(((back[:, None, :] - named[None]) ** 2).sum(-1)).min()
            assert nearest >= shapes.MIN_COLOUR_DIST - 12, (task, s.meta["style"])
            kinds.add(s.meta["style"]["background"])
            dark += styles.luminance(s.meta["style"]["background_colour"]) < 0.3
    assert kinds == {"solid", "gradient", "texture"} and dark >= 5


def test_varied_text_has_contrast_with_its_background():
    for task in ("reading", "chart", "gui"):
        seen_dark = False
        for s in samples(task, n=40, seed=2, policy="compact", style="varied"):
            facts = s.meta["style"]
            if facts["background"] in ("solid", "sign"):
                ink, paper = (styles.luminance(facts[k]) for k in ("ink", "background_colour"))
                assert styles.contrast(ink, paper) >= 4.5, facts
            seen_dark |= styles.luminance(facts["background_colour"]) < 0.2
        assert seen_dark, task


def test_fonts_render_ascii_and_varied_needs_matplotlib(monkeypatch):
    for face in styles.FACES:
        fnt = styles.load_font(face.file, 20)
        safe = [c for c in "AZaz09:$.@-" if c not in face.unsafe]
        assert all(fnt.getbbox(c)[2] > fnt.getbbox(c)[0] for c in safe), face.name
    assert styles.Style("varied", styles.FACES[-3]).face_for("carol_w") is styles.FALLBACK
    styles.font_dir.cache_clear()
    monkeypatch.setattr(styles.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="install the train extra"):
        generate_sample(0, 0, style="varied")
    styles.font_dir.cache_clear()


def test_make_dataset_style_option(tmp_path):
    assert make_dataset.main(["--out", str(tmp_path), "--n", "4", "--seed", "1", "--tasks", "reading",
                              "--style", "varied", "--quiet"]) == 0
    records = read_dataset(tmp_path)
    assert all(r["meta"]["style"]["font"] for r in records)
    assert json.loads((tmp_path / "manifest.json").read_text())["style"] == "varied"
    with pytest.raises(SystemExit):
        make_dataset.main(["--out", str(tmp_path), "--n", "1", "--seed", "0", "--style", "fancy"])


def test_eval_generates_a_varied_held_out_set(tmp_path):
    from qwen2vl.data import evaluate as ev

    out = tmp_path / "eval.json"
    args = ev.build_parser().parse_args(["--model", "m", "--n", "3", "--out", str(out), "--quiet",
                                         "--tasks", "reading", "--style", "varied"])
    result = ev.run(args, lambda convs: ["x"] * len(convs))
    assert "varied style" in result["data"] and len(result["samples"]) == 3


@pytest.mark.parametrize("style", STYLES)
def test_letters_are_one_to_four_random_characters_filling_a_sign(style):
    """``letters``, before ``words``: spelt character by character, capitals and digits or lower case."""
    import string
    seen = set()
    for s in samples("letters", n=40, policy="per-task", style=style):
        w, h = s.image.size
        assert s.task == "reading" and s.meta["kind"] == "sign" and not s.meta["small_text"]
        assert max(w, h) <= 224 and 1 <= len(s.answer) <= 4
        assert set(s.answer) <= set(string.ascii_uppercase + string.digits) or set(s.answer) <= set(string.ascii_lowercase)
        x1, y1, x2, y2 = s.meta["text_box"]
        region = np.asarray(s.image.convert("L"))[y1:y2, x1:x2]
        assert region.max() - region.min() > 60
        seen.add(s.answer.islower())
    assert seen == {True, False}
