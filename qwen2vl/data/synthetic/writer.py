"""Samples -> conversations in Qwen's message format, written as ``data.jsonl`` plus media files.

One line of ``data.jsonl``::

    {"id": "train-0-000123", "task": "counting", "meta": {...},
     "messages": [{"role": "user", "content": [{"type": "image", "image": "images/000123.png"},
                                               {"type": "text", "text": "How many stars are there?"}]},
                  {"role": "assistant", "content": "3"}]}

Media paths are relative to the JSONL file. A video is a list of frame paths
(``{"type": "video", "video": ["frames/000123_0.png", ...]}``) or one mp4 path. With
``force_size=(224, 224)`` every media item also carries ``resized_width``/``resized_height``
(spec §4.2), so the processor squashes it to that size while the file itself stays native.
``video_pixels=(min_pixels, max_pixels)`` puts a per-frame pixel budget on every video item: Qwen's
video defaults (at least 128 merged tokens per two frames) are costly for these small clips.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path

from tqdm import tqdm

from . import charts, gui, reading, shapes, video
from .common import Sample, SizePolicy, sample_rng, size_policy
from .followups import followup_rng, followups
from .style import make_style, pick_style

TASKS = {
    "reading": reading.generate,
    "counting": shapes.counting,
    "grounding": shapes.grounding,
    "chart": charts.generate,
    "video": video.generate,
    "gui": gui.generate,
    "basics": shapes.basics,
    "scenes": shapes.scenes,
    "words": reading.words,
    "letters": reading.letters,
}
DEFAULT_MIX = {"reading": 0.3, "counting": 0.2, "grounding": 0.2, "chart": 0.15, "video": 0.15}


def task_mix(tasks: Sequence[str] | Mapping[str, float] | None) -> dict[str, float]:
    """Task weights: None -> DEFAULT_MIX; a list -> equal weights; a mapping -> as given."""
    if tasks is None:
        return dict(DEFAULT_MIX)
    mix = dict(tasks) if isinstance(tasks, Mapping) else {t: 1.0 for t in tasks}
    unknown = sorted(set(mix) - set(TASKS))
    if unknown or not mix:
        raise ValueError(f"unknown or no tasks {unknown}; expected some of {sorted(TASKS)}")
    if any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"task weights must be non-negative with a positive sum, got {mix}")
    return mix


def generate_sample(index: int, seed: int, split: str = "train", tasks=None,
                    image_size_policy: str | SizePolicy = "varied", style: str | Mapping[str, float] = "plain",
                    questions: int = 1) -> Sample:
    """Sample ``index`` of ``(split, seed)``: a pure function of its arguments.

    ``style``: "plain" (the original look, byte for byte) or "varied" (fonts, colours, backgrounds,
    layouts drawn from the same rng; its facts are in ``meta["style"]``), see :mod:`.style`; or a
    mix such as ``{"plain": 0.8, "varied": 0.2}``, drawn per sample (:func:`.style.pick_style`).
    ``questions``: up to this many questions about the media (``questions - 1`` follow-ups, where the
    task has them, see :mod:`.followups`); the first question, the media and the meta do not change.
    """
    mix = task_mix(tasks)
    rng = sample_rng(split, seed, index)
    names = sorted(mix)
    task = rng.choices(names, weights=[mix[t] for t in names])[0]
    look = make_style(pick_style(style, split, seed, index), rng, split)
    if look.plain:
        sample = TASKS[task](rng, size_policy(image_size_policy).for_task(task))
    else:
        sample = TASKS[task](rng, size_policy(image_size_policy).for_task(task), look)
        sample.meta["style"] = dict(look.facts)
    if questions > 1:
        sample.followups = followups(sample, followup_rng(split, seed, index), questions - 1)
    return sample


def to_record(sample: Sample, sample_id: str, media: str | list[str]) -> dict:
    """The JSONL record of ``sample`` whose media were written at ``media`` (relative paths)."""
    item = {"type": "video", "video": media} if sample.frames is not None else {"type": "image", "image": media}
    messages = [{"role": "user", "content": [item, {"type": "text", "text": sample.question}]},
                {"role": "assistant", "content": sample.answer}]
    for question, answer in sample.followups:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"id": sample_id, "task": sample.task, "meta": sample.meta, "messages": messages}


def force_media_size(record: dict, size: tuple[int, int], copy: bool = True) -> dict:
    """A copy of ``record`` (or, with ``copy=False``, the record itself) whose image and video items
    ask the processor for ``size`` = (width, height)."""
    width, height = (int(v) for v in size)
    if width <= 0 or height <= 0:
        raise ValueError(f"forced size must be positive (width, height), got {size}")
    out = json.loads(json.dumps(record)) if copy else record
    for message in out["messages"]:
        if isinstance(message["content"], list):
            for item in message["content"]:
                if item.get("type") in ("image", "video") or "image" in item or "video" in item:
                    item["resized_height"], item["resized_width"] = height, width
    return out


def set_video_pixels(record: dict, pixels: tuple[int, int]) -> dict:
    """``record`` with ``min_pixels``/``max_pixels`` set on its video items (in place; returned)."""
    low, high = (int(v) for v in pixels)
    if not 0 < low <= high:
        raise ValueError(f"video pixel budget must be 0 < min_pixels <= max_pixels, got {pixels}")
    for message in record["messages"]:
        if isinstance(message["content"], list):
            for item in message["content"]:
                if item.get("type") == "video" or "video" in item:
                    item["min_pixels"], item["max_pixels"] = low, high
    return record


def write_mp4(frames, path: str | os.PathLike, fps: float = video.FPS) -> None:
    """Encode equal-sized RGB frames (even sides) as H.264 in an mp4 with PyAV."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_one(job: tuple) -> dict:
    index, seed, split, mix, policy, out_dir, width, video_format, force_size, video_pixels, style = job
    sample = generate_sample(index, seed, split, mix, policy, style)
    stem = f"{index:0{width}d}"
    if sample.frames is None:
        media = f"images/{stem}.png"
        sample.image.save(os.path.join(out_dir, media), compress_level=1)
    elif video_format == "mp4":
        media = f"videos/{stem}.mp4"
        write_mp4(sample.frames, os.path.join(out_dir, media))
    else:
        media = [f"frames/{stem}_{t}.png" for t in range(len(sample.frames))]
        for path, frame in zip(media, sample.frames):
            frame.save(os.path.join(out_dir, path), compress_level=1)
    record = to_record(sample, f"{split}-{seed}-{stem}", media)
    if video_pixels:
        set_video_pixels(record, video_pixels)
    return force_media_size(record, force_size) if force_size else record


def write_dataset(out_dir: str | os.PathLike, n: int, seed: int, *, split: str = "train", tasks=None,
                  image_size_policy: str | SizePolicy = "varied", force_size: tuple[int, int] | None = None,
                  video_format: str = "frames", video_pixels: tuple[int, int] | None = None, workers: int = 1,
                  progress: bool = True, style: str = "plain") -> Path:
    """Write samples 0..n-1 of ``(split, seed)`` to ``out_dir/data.jsonl`` and media files; return its path.

    ``tasks``: names or {name: weight} (default DEFAULT_MIX). ``image_size_policy``: "varied"
    (sides 100-1200), "compact" (100-512) or a SizePolicy. ``force_size``: (width, height) for
    the resolution ablation. ``video_format``: "frames" (PNG list) or "mp4". ``video_pixels``:
    (min_pixels, max_pixels) per video frame. ``style``: "plain" or "varied" (see
    :func:`generate_sample`). ``workers``: processes; the output is identical for any number of workers.
    """
    if n < 0:
        raise ValueError(f"number of samples must be >= 0, got {n}")
    if video_format not in ("frames", "mp4"):
        raise ValueError(f"video_format must be 'frames' or 'mp4', got {video_format!r}")
    mix, policy = task_mix(tasks), size_policy(image_size_policy)
    sample_rng(split, seed, 0)  # validates the split and style before any work
    make_style(style, sample_rng(split, seed, 0), split)
    out = Path(out_dir)
    for sub in ("images", "frames", "videos"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(max(n - 1, 0))))
    if video_pixels:
        set_video_pixels({"messages": []}, video_pixels)  # validates before any work
    jobs = [(i, seed, split, mix, policy, str(out), width, video_format, force_size, video_pixels, style)
            for i in range(n)]
    counts: dict[str, int] = {}
    tmp = out / "data.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f, tqdm(total=n, desc=f"synthetic {split}", disable=not progress,
                                                      unit="sample") as bar:
        if workers > 1:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                records = pool.imap(_write_one, jobs, chunksize=16)
                _drain(records, f, bar, counts)
        else:
            _drain(map(_write_one, jobs), f, bar, counts)
    os.replace(tmp, out / "data.jsonl")
    manifest = {"n": n, "seed": seed, "split": split, "tasks": mix, "image_size_policy": vars(policy),
                "force_size": list(force_size) if force_size else None, "video_format": video_format,
                "video_pixels": list(video_pixels) if video_pixels else None,
                "task_counts": counts}
    if style != "plain":  # plain manifests stay as they were
        manifest["style"] = style
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out / "data.jsonl"


def _drain(records, f, bar, counts: dict[str, int]) -> None:
    for record in records:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        counts[record["task"]] = counts.get(record["task"], 0) + 1
        bar.update(1)


def read_dataset(path: str | os.PathLike) -> list[dict]:
    """Records of a ``data.jsonl`` (or of the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "data.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
