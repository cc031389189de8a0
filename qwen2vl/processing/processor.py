"""Processor: conversations with images and videos -> model inputs (ids, mask, pixels, grids, labels).

``encode`` handles one conversation: render the template (chat.py), tokenize, work out every
media item's grid from its header or container index alone, check the token budget, then decode
and resize the pixels (image.py, video.py) and expand each ``<|image_pad|>``/``<|video_pad|>`` to
``t*h*w / merge_size**2`` copies. ``collate`` left-pads samples into a ``Batch``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .chat import MediaPart, RenderedChat, render_chat
from .image import (
    CLIP_MEAN,
    CLIP_STD,
    MAX_IMAGE_PIXELS,
    MAX_PIXELS,
    MERGE_SIZE,
    MIN_PIXELS,
    PATCH_SIZE,
    TEMPORAL_PATCH_SIZE,
    decode_rgb,
    frames_to_patches,
    open_image,
    resize_image,
    smart_resize,
)
from .sources import (
    MAX_REMOTE_BYTES,
    REMOTE_TIMEOUT_S,
    MediaAccess,
    MediaError,
    describe,
    read_source,
    safe_reason,
)
from .tokenizer import Tokenizer
from .video import (
    IMAGE_MAX_TOKENS,
    IMAGE_MIN_TOKENS,
    MAX_VIDEO_FRAME_PIXELS,
    MAX_VIDEO_PIXELS,
    frame_indices,
    frame_range,
    probe_video,
    qwen_vl_utils_resize,
    read_frames,
    resize_frames,
    smart_nframes,
    video_frame_size,
)

IGNORE_INDEX = -100
_IMAGE_OPTIONS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
_VIDEO_OPTIONS = ("fps", "nframes", "min_frames", "max_frames", "min_pixels", "max_pixels", "total_pixels",
                  "video_start", "video_end", "resized_height", "resized_width")


@dataclass
class MediaInfo:
    """One media item of a sample: kind, where it was, what it was, and its grid and token count."""

    kind: str  # "image" or "video"
    source: str  # printable description of the source
    message_index: int
    part_index: int
    grid_thw: tuple[int, int, int]
    tokens: int


@dataclass
class Sample:
    """One encoded conversation, unpadded. Tensors: ids/labels (T,), pixels (N, 1176), grids (n, 3)."""

    input_ids: torch.Tensor
    labels: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    media: list[MediaInfo] = field(default_factory=list)


class Batch(dict):
    """Left-padded model inputs; a dict, so ``model(**batch)`` works. Media keys only when present."""

    def to(self, device) -> Batch:
        return Batch({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


@dataclass
class _Plan:
    """A media item whose grid is known before any pixel is decoded; ``load`` gives uint8 frames."""

    part: MediaPart
    grid: tuple[int, int, int]
    load: Callable[[], np.ndarray]  # () -> (F, H, W, 3) uint8 at the target size


class Processor:
    """Turns conversations into model inputs at native resolution (see the module docstring).

    Image sizes: ``smart_resize`` with ``min_pixels``/``max_pixels`` (defaults from
    preprocessor_config.json, else transformers' 3136 and 1003520), overridable per item; videos
    follow qwen-vl-utils 0.0.14 budgets. Remote (http/https) media is off unless
    ``allow_remote_media``; ``allowed_media_dir`` restricts local files to one directory. These
    form the default media policy (``self.access``); a caller serving others (the server) passes
    its own ``MediaAccess`` per call instead of changing the processor.
    """

    def __init__(self, tokenizer: Tokenizer, *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                 patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE,
                 temporal_patch_size: int = TEMPORAL_PATCH_SIZE, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                 allow_remote_media: bool = False, allowed_media_dir: str | None = None,
                 remote_timeout_s: float = REMOTE_TIMEOUT_S, max_remote_bytes: int = MAX_REMOTE_BYTES,
                 max_image_pixels: int = MAX_IMAGE_PIXELS):
        if min_pixels > max_pixels:
            raise ValueError(f"min_pixels {min_pixels} is above max_pixels {max_pixels}")
        self.tokenizer = tokenizer
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.patch_size, self.merge_size, self.temporal_patch_size = patch_size, merge_size, temporal_patch_size
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.access = MediaAccess(allow_remote_media, allowed_media_dir, remote_timeout_s, max_remote_bytes)
        self.max_image_pixels = max_image_pixels
        for name in ("image_pad_id", "video_pad_id", "vision_start_id", "vision_end_id"):
            if getattr(tokenizer, name) is None:
                raise ValueError(f"the tokenizer has no {name[:-3]} token")

    @classmethod
    def from_pretrained(cls, directory: str, **overrides) -> Processor:
        """Read tokenizer.json, tokenizer_config.json and preprocessor_config.json from ``directory``.

        ``overrides`` are constructor arguments (e.g. ``allow_remote_media=True``, ``max_pixels=...``).
        """
        config: dict = {}
        path = os.path.join(directory, "preprocessor_config.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        size = config.get("size") or {}
        kwargs = {
            "min_pixels": config.get("min_pixels") or size.get("shortest_edge") or MIN_PIXELS,
            "max_pixels": config.get("max_pixels") or size.get("longest_edge") or MAX_PIXELS,
            "patch_size": config.get("patch_size", PATCH_SIZE),
            "merge_size": config.get("merge_size", MERGE_SIZE),
            "temporal_patch_size": config.get("temporal_patch_size", TEMPORAL_PATCH_SIZE),
            "image_mean": config.get("image_mean", CLIP_MEAN),
            "image_std": config.get("image_std", CLIP_STD),
        }
        kwargs.update(overrides)
        return cls(Tokenizer.from_pretrained(directory), **kwargs)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    # ------------------------------------------------------------------------ text

    def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = True,
                            add_vision_id: bool = False, **tool_options) -> str:
        """The prompt text; ``tool_options`` (``tools``, ``tool_format``, ``parallel_tool_calls``) as in render_chat."""
        return render_chat(conversation, add_generation_prompt, add_vision_id, **tool_options).text

    # ---------------------------------------------------------------------- encode

    def encode(self, conversation: list[dict], add_generation_prompt: bool = True, return_labels: bool = False,
               add_vision_id: bool = False, max_tokens: int | None = None,
               allow_remote_media: bool | None = None, access: MediaAccess | None = None, *,
               tools: list | None = None, tool_format: str = "hermes", parallel_tool_calls: bool = False) -> Sample:
        """Encode one conversation (unpadded). ``max_tokens`` bounds the whole prompt; a prompt over it
        fails before any pixel is decoded, naming the item that crosses it. ``access`` replaces the
        processor's media policy for this call; ``allow_remote_media`` overrides its ``allow_remote``.
        ``tools``, ``tool_format`` and ``parallel_tool_calls`` go to :func:`render_chat` (the tool block)."""
        access = access or self.access
        if allow_remote_media is not None:
            access = dataclasses.replace(access, allow_remote=allow_remote_media)
        rendered = render_chat(conversation, add_generation_prompt, add_vision_id, tools=tools,
                               tool_format=tool_format, parallel_tool_calls=parallel_tool_calls)
        ids, offsets = self.tokenizer.encode_with_offsets(rendered.text)
        access.check_deadline("tokenizing")
        ids_np = np.asarray(ids, dtype=np.int64)
        self._check_placeholders(ids_np, rendered)
        plans = [self._plan(part, access) for part in rendered.media]
        merge = self.merge_size ** 2
        self._check_budget(len(ids), [(p.part, math.prod(p.grid) // merge) for p in plans], max_tokens)

        images, videos, media = [], [], []
        for plan in plans:
            access.check_deadline(plan.part.where)
            pixels, grid = self._pixels(plan)
            (images if plan.part.kind == "image" else videos).append((pixels, grid))
            media.append(MediaInfo(plan.part.kind, describe(plan.part.source), plan.part.message_index,
                                   plan.part.part_index, grid, math.prod(grid) // merge))
        if any(m.grid_thw != p.grid for m, p in zip(media, plans)):  # e.g. EXIF found only on decode
            self._check_budget(len(ids), [(p.part, m.tokens) for p, m in zip(plans, media)], max_tokens)

        repeats = np.ones(len(ids), dtype=np.int64)
        pad_positions = np.flatnonzero((ids_np == self.tokenizer.image_pad_id) | (ids_np == self.tokenizer.video_pad_id))
        repeats[pad_positions] = [m.tokens for m in media]
        sample = Sample(input_ids=torch.from_numpy(np.repeat(ids_np, repeats)), media=media)
        if return_labels:
            sample.labels = torch.from_numpy(np.repeat(self._labels(ids_np, offsets, rendered), repeats))
        if images:
            sample.pixel_values = torch.cat([p for p, _ in images])
            sample.image_grid_thw = torch.tensor([g for _, g in images], dtype=torch.long)
        if videos:
            sample.pixel_values_videos = torch.cat([p for p, _ in videos])
            sample.video_grid_thw = torch.tensor([g for _, g in videos], dtype=torch.long)
        return sample

    def _check_placeholders(self, ids: np.ndarray, rendered: RenderedChat) -> None:
        for kind, pad_id in (("image", self.tokenizer.image_pad_id), ("video", self.tokenizer.video_pad_id)):
            found = int((ids == pad_id).sum())
            expected = sum(part.kind == kind for part in rendered.media)
            if found != expected:
                raise MediaError(f"the prompt has {found} {kind} placeholders but the conversation has "
                                 f"{expected} {kind}s")

    def _check_budget(self, text_ids: int, items: list[tuple[MediaPart, int]], max_tokens: int | None) -> None:
        if max_tokens is None:
            return
        total = text_ids - len(items)  # each placeholder id becomes its item's tokens
        if total > max_tokens:
            raise MediaError(f"the prompt text alone takes {total} tokens, over the budget of {max_tokens}",
                             "over_budget")
        for part, tokens in items:
            total += tokens
            if total > max_tokens:
                raise MediaError(f"{part.where} {describe(part.source)} takes {tokens} tokens, which brings the "
                                 f"prompt to {total} tokens, over the budget of {max_tokens}", "over_budget")

    def _labels(self, ids: np.ndarray, offsets: list[tuple[int, int]], rendered: RenderedChat) -> np.ndarray:
        """-100 everywhere except tokens starting inside an assistant message's content or its <|im_end|>."""
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        starts = np.asarray([s for s, _ in offsets], dtype=np.int64)
        for lo, hi in rendered.train_spans:
            inside = (starts >= lo) & (starts < hi)
            labels[inside] = ids[inside]
        tok = self.tokenizer
        vision = np.isin(ids, [tok.image_pad_id, tok.video_pad_id, tok.vision_start_id, tok.vision_end_id])
        labels[vision] = IGNORE_INDEX
        return labels

    # ----------------------------------------------------------------------- media

    def _plan(self, part: MediaPart, access: MediaAccess) -> _Plan:
        access.check_deadline(part.where)
        try:
            options = self._options(part)
            if part.kind == "image":
                return self._plan_image(part, options, access)
            if isinstance(part.source, (list, tuple)):
                return self._plan_frame_list(part, options, access)
            return self._plan_video(part, options, access)
        except MediaError as err:
            raise MediaError(f"{part.where}: {err}", err.kind, part.where) from None
        except ValueError as err:
            raise MediaError(f"{part.where} {describe(part.source)}: {safe_reason(err)}", where=part.where) from None

    def _pixels(self, plan: _Plan) -> tuple[torch.Tensor, tuple[int, int, int]]:
        try:
            frames = plan.load()
        except MediaError as err:
            raise MediaError(f"{plan.part.where}: {err}", err.kind, plan.part.where) from None
        except ValueError as err:
            raise MediaError(f"{plan.part.where} {describe(plan.part.source)}: {safe_reason(err)}",
                             where=plan.part.where) from None
        return frames_to_patches(frames, self.patch_size, self.merge_size, self.temporal_patch_size,
                                 self.image_mean, self.image_std)

    @staticmethod
    def _options(part: MediaPart) -> dict:
        allowed = _IMAGE_OPTIONS if part.kind == "image" else _VIDEO_OPTIONS
        options = {k: part.options[k] for k in allowed if part.options.get(k) is not None}
        for key, value in options.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or \
                    (value == 0 and key not in ("video_start", "video_end")):
                raise ValueError(f"option {key}={value!r} must be a positive number")
        if options.get("min_pixels", 0) > options.get("max_pixels", math.inf):
            raise ValueError(f"min_pixels {options['min_pixels']} is above max_pixels {options['max_pixels']}")
        return options

    def _grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        return (-(-frames // self.temporal_patch_size), height // self.patch_size, width // self.patch_size)

    def _image_target(self, height: int, width: int, options: dict) -> tuple[int, int]:
        if "resized_height" in options and "resized_width" in options:
            height, width = int(options["resized_height"]), int(options["resized_width"])
        return smart_resize(height, width, self.factor, options.get("min_pixels", self.min_pixels),
                            options.get("max_pixels", self.max_pixels))

    def _plan_image(self, part: MediaPart, options: dict, access: MediaAccess) -> _Plan:
        image, (height, width) = open_image(part.source, access, access.max_image_pixels or self.max_image_pixels)
        target = self._image_target(height, width, options)

        def load() -> np.ndarray:
            rgb = decode_rgb(image, part.source)
            h, w = self._image_target(rgb.height, rgb.width, options)
            return resize_image(rgb, h, w)[None]

        return _Plan(part, self._grid(1, *target), load)

    def _plan_video(self, part: MediaPart, options: dict, access: MediaAccess) -> _Plan:
        if "fps" in options and "nframes" in options:
            raise ValueError("give either fps or nframes, not both")
        data = read_source(part.source, access)
        probe = probe_video(data, part.source)
        start, end = frame_range(probe.total_frames, probe.fps, options.get("video_start"), options.get("video_end"))
        n = smart_nframes(end - start + 1, probe.fps, options.get("fps"), options.get("nframes"),
                          options.get("min_frames"), options.get("max_frames"))
        _check_decoded_pixels(n, probe.height, probe.width, access)
        indices = frame_indices(start, end, n)
        height, width = video_frame_size(probe.height, probe.width, n, self.factor, options.get("min_pixels"),
                                         options.get("max_pixels"), options.get("total_pixels"),
                                         options.get("resized_height"), options.get("resized_width"))
        return _Plan(part, self._grid(n, height, width),
                     lambda: read_frames(data, probe, indices, height, width, part.source))

    def _plan_frame_list(self, part: MediaPart, options: dict, access: MediaAccess) -> _Plan:
        """Frames given as images: each resized as qwen-vl-utils 0.0.14 does (factor 2*28), then as a video."""
        if not part.source:
            raise ValueError("the video has no frames")
        factor = 2 * self.factor
        opened, sizes, decoded = [], [], 0
        for i, frame in enumerate(part.source):
            try:
                image, (h, w) = open_image(frame, access, access.max_image_pixels or self.max_image_pixels)
                decoded += h * w
                limit = access.max_video_pixels or MAX_VIDEO_PIXELS
                if decoded > limit:
                    raise MediaError(f"the frames up to this one decode to {decoded} pixels, over the limit of "
                                     f"{limit} decoded pixels per video", "image_too_large")
                if "resized_height" in options and "resized_width" in options:
                    h, w = options["resized_height"], options["resized_width"]
                    size = qwen_vl_utils_resize(h, w, factor, IMAGE_MIN_TOKENS * factor ** 2,
                                                IMAGE_MAX_TOKENS * factor ** 2)
                else:
                    size = qwen_vl_utils_resize(h, w, factor, options.get("min_pixels", IMAGE_MIN_TOKENS * factor ** 2),
                                                options.get("max_pixels", IMAGE_MAX_TOKENS * factor ** 2))
            except (MediaError, ValueError) as err:
                raise MediaError(f"frame {i}: {err}", getattr(err, "kind", "invalid")) from None
            opened.append(image)
            sizes.append(size)
        if len(set(sizes)) > 1:
            raise ValueError(f"frames resize to different sizes: {sorted(set(sizes))}")
        (h1, w1), n = sizes[0], len(opened) + len(opened) % 2
        height, width = video_frame_size(h1, w1, n, self.factor, options.get("min_pixels"), options.get("max_pixels"),
                                         options.get("total_pixels"), options.get("resized_height"),
                                         options.get("resized_width"))

        def load() -> np.ndarray:
            frames = []
            for i, (image, frame) in enumerate(zip(opened, part.source)):
                try:
                    frames.append(resize_image(decode_rgb(image, frame), h1, w1))
                except MediaError as err:
                    raise MediaError(f"frame {i}: {err}", err.kind) from None
            if len(frames) % 2:
                frames.append(frames[-1])
            return resize_frames(np.stack(frames), height, width)

        return _Plan(part, self._grid(n, height, width), load)

    # --------------------------------------------------------------------- batches

    def collate(self, samples: list[Sample], pad_id: int | None = None) -> Batch:
        """Left-pad samples into a Batch: ``input_ids``/``attention_mask`` (B, T), media concatenated
        in order, ``labels`` (padded with -100) when every sample has them."""
        if not samples:
            raise ValueError("collate needs at least one sample")
        pad_id = self.tokenizer.pad_id if pad_id is None else pad_id
        length = max(len(s.input_ids) for s in samples)
        input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        with_labels = all(s.labels is not None for s in samples)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long) if with_labels else None
        for row, s in enumerate(samples):
            n = len(s.input_ids)
            input_ids[row, length - n:] = s.input_ids
            attention_mask[row, length - n:] = 1
            if labels is not None:
                labels[row, length - n:] = s.labels
        batch = Batch(input_ids=input_ids, attention_mask=attention_mask)
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            parts = [getattr(s, key) for s in samples if getattr(s, key) is not None]
            if parts:
                batch[key] = torch.cat(parts)
        if labels is not None:
            batch["labels"] = labels
        return batch

    def __call__(self, conversations, add_generation_prompt: bool = True, return_labels: bool = False,
                 max_tokens: int | None = None, add_vision_id: bool = False,
                 allow_remote_media: bool | None = None, access: MediaAccess | None = None,
                 **tool_options) -> Batch:
        """Encode a list of conversations (or one conversation) and collate them (``tool_options`` as in encode)."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        samples = [self.encode(c, add_generation_prompt, return_labels, add_vision_id, max_tokens,
                               allow_remote_media, access, **tool_options) for c in conversations]
        return self.collate(samples)


def _check_decoded_pixels(frames: int, height: int, width: int, access: MediaAccess) -> None:
    """Refuse a video whose sampled frames would decode to more pixels than the policy allows
    (sizes from the container, before any frame is decoded)."""
    per_frame = access.max_video_frame_pixels or MAX_VIDEO_FRAME_PIXELS
    if height * width > per_frame:
        raise MediaError(f"video frames are {width}x{height} = {height * width} pixels, over the limit of "
                         f"{per_frame} decoded pixels per frame", "image_too_large")
    total = access.max_video_pixels or MAX_VIDEO_PIXELS
    if frames * height * width > total:
        raise MediaError(f"{frames} sampled frames of {width}x{height} decode to {frames * height * width} pixels, "
                         f"over the limit of {total} decoded pixels per video", "image_too_large")
