"""Synthetic training and evaluation data for qwen2vl-nano, deterministic by (split, seed, index).

Task families: ``reading`` (documents, receipts, signs; some with text too small for 224x224),
``counting`` and ``grounding`` (scenes of coloured shapes), ``chart`` (bar charts) and ``video``
(short clips of moving or appearing shapes) and ``gui``
(screens of buttons, links, tabs, fields, checkboxes, menus and dialogs; answers are computer_use calls;
not in DEFAULT_MIX) and ``basics`` (one to four big shapes: their colour, kind or number; the start of a
curriculum) and ``scenes`` (counting and grounding on two to seven big shapes: the step after it) and
``words`` (one big sign of one to three words: the start of a reading curriculum; its samples are
``reading`` samples) and ``letters`` (one big sign of one to four random characters: the step before
``words``). :func:`write_dataset` writes ``data.jsonl`` + media. A ``style`` ("plain" or
"varied", or a per-sample mix of the two, see :mod:`.style`) sets the look: fonts, colours,
backgrounds, layouts.
"""

from .common import SIZE_POLICIES, SPLITS, Sample, SizePolicy, sample_rng
from .style import RESERVED_FONTS, STYLES
from .writer import (
    DEFAULT_MIX,
    TASKS,
    force_media_size,
    generate_sample,
    read_dataset,
    set_video_pixels,
    write_dataset,
)

__all__ = ["DEFAULT_MIX", "RESERVED_FONTS", "SIZE_POLICIES", "SPLITS", "STYLES", "TASKS", "Sample", "SizePolicy", "force_media_size",
           "generate_sample", "read_dataset", "sample_rng", "set_video_pixels", "write_dataset"]
