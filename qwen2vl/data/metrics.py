"""Scores for the synthetic tasks: exact match, ANLS, counting, grounding Acc@0.5, chart values, video.

Per task (``score`` dispatches on the sample's ``task``):

* reading: normalised exact match (case, runs of spaces, surrounding quotes and trailing
  ``.,!?;:`` ignored) and ANLS (1 - edit distance / longer length, 0 below 0.5 similarity);
  small-text samples (``meta.small_text``) are summarised as their own group.
* counting: the first integer in the prediction (digits, or a number word "zero".."twenty";
  "no"/"none" mean 0 when there is no number) equals the count.
* grounding: the first box (or quad's bounds) parsed from the prediction has IoU >= 0.5 with the
  answer box, computed in [0, 1000) coordinates (a per-axis scale leaves IoU unchanged).
* chart: value questions are right within 5 % of the true value (ChartQA's relaxed accuracy;
  exact for a true value of 0); highest/lowest-category questions need an exact match.
* video: exact match, or else the prediction names exactly one of the question's choices (say
  "It moves to the left.") and that choice is the answer.
* gui (ScreenSpot-style): the reply's ``computer_use`` calls (or, failing that, a grounding box, as
  a click on its centre) become actions; a click counts when its point, converted to pixels at the
  bin centre, falls inside the target's pixel box. A reply that gives no action is a miss
  (``format_error``). Multi-step samples need every step right (click in the field, the exact
  text typed, click in the button). Summaries break click accuracy down by element type and size.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..agent.actions import ActionError, action_from_call, action_from_text
from ..agent.grounding import iou, parse_regions
from ..agent.tools import parse_tool_output

_SPECIAL = re.compile(r"<\|[a-z_]+\|>")
_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_INT = re.compile(r"(?<![\d.])-?\d+(?![\d.])")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_WORD = re.compile(r"[a-z]+")


def normalize_answer(text: str) -> str:
    """Lower case, special tokens removed, spaces collapsed, quotes and trailing punctuation stripped.

    >>> normalize_answer('  "Hello   World!" ')
    'hello world'
    """
    text = " ".join(_SPECIAL.sub(" ", text).lower().split())
    previous = None
    while previous != text:
        previous = text
        text = text.strip().rstrip(".,!?;:").strip().strip("\"'`")
    return text


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions), O(len(a) * len(b))."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def anls(prediction: str, answer: str, threshold: float = 0.5) -> float:
    """Average normalised Levenshtein similarity for one pair, on normalised strings.

    >>> anls("kitchen", "kitchn")
    0.8571428571428572
    """
    p, a = normalize_answer(prediction), normalize_answer(answer)
    if not p and not a:
        return 1.0
    similarity = 1.0 - levenshtein(p, a) / max(len(p), len(a))
    return similarity if similarity >= threshold else 0.0


def parse_count(text: str) -> int | None:
    """The first whole number in ``text`` (digits or a word up to twenty); "no"/"none" -> 0."""
    text = normalize_answer(text)
    digits = _INT.search(text)
    words = [(m.start(), _NUMBER_WORDS[m.group()]) for m in _WORD.finditer(text) if m.group() in _NUMBER_WORDS]
    if digits and (not words or digits.start() < words[0][0]):
        return int(digits.group())
    if words:
        return words[0][1]
    return 0 if re.search(r"\b(no|none)\b", text) else None


def parse_number(text: str) -> float | None:
    """The first number in ``text`` ("1,250.5" -> 1250.5), or None."""
    m = _NUMBER.search(_SPECIAL.sub(" ", text))
    return float(m.group().replace(",", "")) if m else None


def relaxed_match(prediction: str, answer: str, tolerance: float = 0.05) -> bool:
    """The first number of ``prediction`` within ``tolerance`` (relative) of ``answer``'s number."""
    p, a = parse_number(prediction), parse_number(answer)
    if p is None or a is None:
        return False
    return abs(p - a) <= tolerance * abs(a)


def box_iou(prediction: str, box) -> float:
    """IoU of the first box (or quad bounds) in ``prediction`` with ``box``; 0 when none parses."""
    regions = parse_regions(prediction)
    return iou(regions[0].bounds, box) if regions else 0.0


def choice_match(prediction: str, answer: str, choices: Iterable[str]) -> bool:
    """Exact match, or ``prediction`` mentions exactly one of ``choices`` (whole words) and it is ``answer``."""
    if exact_match(prediction, answer):
        return True
    text = normalize_answer(prediction)
    named = {c for c in choices if re.search(rf"\b{re.escape(normalize_answer(c))}\b", text)}
    return named == {answer}


def _answer(sample: dict) -> str:
    content = sample["messages"][-1]["content"]
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content)
    return content


def group_of(sample: dict) -> str:
    """Summary group: the task, with small-text reading apart from normal reading, gui by kind."""
    if sample["task"] == "reading":
        return "reading (small text)" if sample["meta"].get("small_text") else "reading (normal text)"
    if sample["task"] == "gui":
        return "gui (multi-step)" if sample["meta"].get("kind") == "multi" else "gui (click)"
    return sample["task"]


def predicted_actions(prediction: str) -> list:
    """The actions of a reply: its computer_use calls, else a click on its first grounding box; [] if none."""
    calls = [c for c in parse_tool_output(prediction).calls if c["name"] == "computer_use"]
    actions = []
    for call in calls:
        try:
            actions.append(action_from_call(call["arguments"]))
        except ActionError:
            actions.append(None)  # a bad call still takes its step
    if not calls:
        try:
            actions = [action_from_text(prediction)]
        except ActionError:
            return []
    return actions


def _step_right(action, step: dict, size) -> bool:
    if action is None:
        return False
    if step["action"] == "type":
        return action.kind == "type" and action.text == step["text"]
    if action.kind not in ("click", "double_click", "long_press"):
        return False
    x, y = action.pixels(size)
    x1, y1, x2, y2 = step["box_px"]
    return x1 <= x < x2 and y1 <= y < y2


def gui_score(prediction: str, meta: dict) -> dict:
    """ScreenSpot-style: every step's point inside its target box (pixels) / its text typed exactly."""
    actions, steps = predicted_actions(prediction), meta["steps"]
    right = [i < len(actions) and _step_right(actions[i], step, meta["size"]) for i, step in enumerate(steps)]
    return {"correct": all(right), "format_error": not actions, "step_accuracy": sum(right) / len(steps),
            "element": meta["element"], "size_class": meta["size_class"]}


def score(sample: dict, prediction: str) -> dict:
    """Score one prediction for one dataset record (``{"task", "meta", "messages"}``)."""
    task, meta, answer = sample["task"], sample.get("meta", {}), _answer(sample)
    out = {"id": sample.get("id"), "task": task, "group": group_of(sample), "answer": answer,
           "prediction": prediction}
    if task == "reading":
        out.update(correct=exact_match(prediction, answer), anls=anls(prediction, answer))
    elif task == "counting":
        out.update(correct=parse_count(prediction) == int(answer))
    elif task == "grounding":
        value = box_iou(prediction, meta["box"] if "box" in meta else parse_regions(answer)[0].bounds)
        out.update(correct=value >= 0.5, iou=value)
    elif task == "chart":
        numeric = meta.get("kind", "value") == "value"
        out.update(correct=relaxed_match(prediction, answer) if numeric else exact_match(prediction, answer))
    elif task == "video":
        out.update(correct=choice_match(prediction, answer, meta.get("choices", [answer])))
    elif task == "gui":
        out.update(gui_score(prediction, meta))
    else:
        out.update(correct=exact_match(prediction, answer))
    out["correct"] = bool(out["correct"])
    return out


METRICS = {
    "reading (normal text)": ("exact match", "anls"),
    "reading (small text)": ("exact match", "anls"),
    "counting": ("accuracy", None),
    "grounding": ("Acc@0.5", "iou"),
    "chart": ("relaxed accuracy (5 %)", None),
    "video": ("accuracy", None),
    "gui (click)": ("click accuracy", "format_error"),
    "gui (multi-step)": ("task success", "step_accuracy"),
}


def summarise(records: Iterable[dict]) -> list[dict]:
    """Table rows, one per group in a fixed order, then ``all``.

    Each row: ``{"group", "n", "metric", "score"}`` plus ``"anls"`` (reading) or ``"mean_iou"``
    (grounding). Scores are fractions in [0, 1]; ``all`` is the mean of ``correct`` over records.
    """
    records = list(records)
    by_group: dict[str, list[dict]] = {}
    for r in records:
        by_group.setdefault(r["group"], []).append(r)
    order = [g for g in METRICS if g in by_group] + sorted(set(by_group) - set(METRICS))
    rows = []
    for group in order:
        rs = by_group[group]
        metric, extra = METRICS.get(group, ("exact match", None))
        row = {"group": group, "n": len(rs), "metric": metric, "score": _mean(r["correct"] for r in rs)}
        if extra:
            row["mean_iou" if extra == "iou" else extra] = _mean(r[extra] for r in rs)
        rows.append(row)
    rows += _gui_breakdown(by_group.get("gui (click)", []))
    if records:
        rows.append({"group": "all", "n": len(records), "metric": "accuracy",
                     "score": _mean(r["correct"] for r in records)})
    return rows


def _gui_breakdown(records: list[dict]) -> list[dict]:
    """Click accuracy of single-click gui samples by element type, then by target size."""
    rows = []
    for key, order in (("element", None), ("size_class", ["small", "medium", "large"])):
        groups: dict[str, list[dict]] = {}
        for r in records:
            groups.setdefault(r[key], []).append(r)
        for name in order or sorted(groups):
            if name in groups:
                rows.append({"group": f"gui click / {name}", "n": len(groups[name]), "metric": "click accuracy",
                             "score": _mean(r["correct"] for r in groups[name])})
    return rows


def _mean(values: Iterable[float]) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else 0.0


def format_table(rows: list[dict]) -> str:
    """A plain-text table of ``summarise`` rows, scores in percent."""
    lines = [f"{'group':<24} {'n':>5}  {'metric':<24} {'score':>7}  extra", "-" * 74]
    for row in rows:
        extra = "  ".join(f"{k}={100 * row[k]:.1f}" for k in ("anls", "mean_iou", "format_error", "step_accuracy")
                          if k in row)
        lines.append(f"{row['group']:<24} {row['n']:>5}  {row['metric']:<24} {100 * row['score']:>6.1f}%  {extra}")
    return "\n".join(lines)
