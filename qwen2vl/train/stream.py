"""Training data generated on the fly: packed rows of synthetic samples, a pure function of the row index.

A stream is given as a YAML file in place of the JSONL data (``data: mix.yaml``)::

    synthetic:
      split: train
      seed: 0
      tasks: {reading: 0.3, counting: 0.2, grounding: 0.2, chart: 0.1, video: 0.1, gui: 0.1}
      size_policy: per-task          # a name of qwen2vl.data.synthetic.SIZE_POLICIES
      style: varied                  # generator look: plain (default, the original) or varied (STYLES),
                                     # or a per-sample mix such as {plain: 0.8, varied: 0.2}
      video_pixels: [3136, 50176]    # per-frame pixel budget of videos (optional)
      force_size: [224, 224]         # every image and frame squashed to this size (optional, ablation)
      packing: fill                  # first (default): a row ends at the first sample that does not fit;
                                     # fill: such samples are passed over and later ones tried (fewer pads)
      questions: 4                   # up to 4 questions per image (follow-up turns; default 1)
      phases:                        # optional curriculum: the first 2000 rows use other settings
        - {rows: 2000, tasks: {basics: 1}, style: plain}

Row ``g`` holds samples ``g * ROW_STRIDE + j`` (j = 0, 1, ...) of ``(split, seed)``, taken while they fit
in ``seq_len`` tokens: with ``packing: first`` the first that does not fit ends the row and is never
used; with ``packing: fill`` it is passed over and the next ones are tried, until ``FILL_MISSES`` have
not fitted (the rows carry fewer pads; the row's tail leans to short samples: measure the mix). So a row depends on
nothing but ``g``: a resumed run reads exactly the rows an uninterrupted one would, on any number of
processes, and no data set is written or measured up front. Phases are chosen by ``g`` as well.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.synthetic import SIZE_POLICIES, force_media_size, generate_sample, set_video_pixels
from ..data.synthetic.style import style_mix
from ..data.synthetic.writer import task_mix, to_record
from ..processing.sources import MediaError
from .dataset import DataError

ROW_STRIDE = 256  # sample indices reserved per row (a row never holds that many)
SETTINGS = ("tasks", "size_policy", "video_pixels", "force_size", "style", "packing", "questions")
PACKINGS = ("first", "fill")
FILL_MISSES = 6  # packing "fill": samples passed over in a row before it ends


@dataclass(frozen=True)
class Settings:
    """What one phase of the stream generates."""

    tasks: dict[str, float]
    size_policy: str
    video_pixels: tuple[int, int] | None
    force_size: tuple[int, int] | None
    style: str | dict[str, float] = "plain"  # a name, or a per-sample mix {name: weight}
    packing: str = "first"
    questions: int = 1


def is_stream_spec(path: str | Path) -> bool:
    return str(path).endswith((".yaml", ".yml"))


def _settings(raw: dict, base: Settings | None, where: str) -> Settings:
    unknown = sorted(set(raw) - set(SETTINGS) - {"rows"})
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}; expected some of {list(SETTINGS)}")
    values = {k: raw.get(k, getattr(base, k) if base else None) for k in SETTINGS}
    try:
        values["tasks"] = task_mix(values["tasks"])
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    values["size_policy"] = values["size_policy"] or "varied"
    if values["size_policy"] not in SIZE_POLICIES:
        raise DataError(f"{where}: size_policy {values['size_policy']!r} is not one of {sorted(SIZE_POLICIES)}")
    try:
        values["style"] = style_mix(values["style"] or "plain")
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    values["questions"] = 1 if values["questions"] is None else values["questions"]
    if not isinstance(values["questions"], int) or isinstance(values["questions"], bool) or values["questions"] < 1:
        raise DataError(f"{where}: questions must be an integer >= 1, got {values['questions']!r}")
    values["packing"] = values["packing"] or "first"
    if values["packing"] not in PACKINGS:
        raise DataError(f"{where}: packing {values['packing']!r} is not one of {list(PACKINGS)}")
    for key in ("video_pixels", "force_size"):
        value = values[key]
        if value is not None:
            if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value)):
                raise DataError(f"{where}: {key} must be two integers, got {value!r}")
            values[key] = (int(value[0]), int(value[1]))
    return Settings(**values)


class SyntheticStream:
    """Rows of encoded samples generated on demand: ``row(g)`` is a pure function of ``g``."""

    def __init__(self, path: str | Path, encode: Callable[[list[dict[str, Any]]], Any], seq_len: int):
        import yaml

        path = Path(path)
        if not path.is_file():
            raise DataError(f"data stream file not found: {path}")
        spec = (yaml.safe_load(path.read_text()) or {}).get("synthetic")
        if not isinstance(spec, dict):
            raise DataError(f"{path}: a data stream file needs a 'synthetic:' mapping")
        self.name, self.encode, self.seq_len = path.name, encode, seq_len
        self.split, self.seed = str(spec.pop("split", "train")), int(spec.pop("seed", 0))
        phases = spec.pop("phases", None) or []
        self.settings = _settings(spec, None, path.name)
        self.phases: list[tuple[int, Settings]] = []  # (first row after the phase, settings)
        end = 0
        for k, phase in enumerate(phases):
            rows = phase.get("rows") if isinstance(phase, dict) else None
            if not isinstance(rows, int) or rows < 1:
                raise DataError(f"{path.name}: phase {k + 1} needs rows >= 1, got {phase!r}")
            end += rows
            self.phases.append((end, _settings(phase, self.settings, f"{path.name} phase {k + 1}")))

    def settings_at(self, row: int) -> Settings:
        for end, settings in self.phases:
            if row < end:
                return settings
        return self.settings

    def record(self, index: int, settings: Settings) -> dict:
        """The message record of sample ``index`` (media as in-memory images)."""
        sample = generate_sample(index, self.seed, self.split, settings.tasks, settings.size_policy, settings.style,
                                 settings.questions)
        media = sample.frames if sample.frames is not None else sample.image
        record = to_record(sample, f"{self.split}-{self.seed}-{index}", media)
        if settings.video_pixels:
            set_video_pixels(record, settings.video_pixels)
        if settings.force_size:
            record = force_media_size(record, settings.force_size, copy=False)
        return record

    def row(self, g: int) -> list:
        """The encoded samples of row ``g``: ``g * ROW_STRIDE + j`` while they fit in ``seq_len`` tokens.

        A sample longer than ``seq_len`` by itself (a big image under a small ``seq_len``) is passed
        over, as a pure function of its index like everything else; a row that ends up empty is an error.
        """
        settings, samples, used, misses = self.settings_at(g), [], 0, 0
        for j in range(ROW_STRIDE):
            index = g * ROW_STRIDE + j
            try:
                sample = self.encode_fitting(self.record(index, settings)["messages"])
            except MediaError as e:
                if e.kind != "over_budget":
                    raise
                continue
            n = int(sample.input_ids.numel())
            if n > self.seq_len:
                continue
            if used + n > self.seq_len:
                misses += 1
                if settings.packing == "first" or misses == FILL_MISSES:
                    break
                continue
            samples.append(sample)
            used += n
        if not samples:
            raise DataError(f"{self.name}: no sample of row {g} fits in seq_len {self.seq_len}; "
                            f"raise seq_len or use a smaller size_policy")
        return samples

    def encode_fitting(self, messages: list[dict]):
        """The encoded conversation, its last follow-up turns dropped while it is over ``seq_len`` (by the
        encoder's over-budget error or by its length); the first question and answer always stay."""
        while True:
            try:
                sample = self.encode(messages)
            except MediaError as e:
                if e.kind != "over_budget" or len(messages) <= 2:
                    raise
            else:
                if sample.input_ids.numel() <= self.seq_len or len(messages) <= 2:
                    return sample
            messages = messages[:-2]

    def summary(self) -> str:
        def describe(s: Settings) -> str:
            return (f"{s.tasks}, size policy {s.size_policy}, {s.style} style, {s.packing} packing, "
                    f"up to {s.questions} question(s) per image")

        phases = "".join(f"; rows < {end}: {describe(s)}" for end, s in self.phases)
        return f"generated on the fly ({self.split} split, seed {self.seed}): {describe(self.settings)}{phases}"
