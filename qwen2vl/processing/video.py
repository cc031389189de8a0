"""Videos: how many frames, which ones, at what size (qwen-vl-utils 0.0.14 rules, spec 5.1).

Pipeline for a file: probe it with PyAV (frame count from the packet index, average fps),
pick ``smart_nframes`` frames at ``round(linspace(start, end, n))``, decode only those (seeking
past keyframes that are not needed), resize them all to one size inside the per-frame pixel
budget with torch's antialiased bicubic on uint8 values (what torchvision's ``resize`` does),
then normalise and patchify two frames per temporal patch.

A list of frame images goes, as in qwen-vl-utils 0.0.14, through the image loader first, each
frame resized with factor ``2 * 28 = 56`` (a quirk of that version), then the stack is padded
to an even length with its last frame and resized with the video budget.
"""

from __future__ import annotations

import io
import itertools
import math
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .sources import MediaError, describe, safe_reason

FPS = 2.0
FRAME_FACTOR = 2
MIN_FRAMES = 4
MAX_FRAMES = 768
VIDEO_MIN_TOKENS = 128  # per-frame pixel floor = tokens * factor^2 (100,352 for factor 28)
VIDEO_MAX_TOKENS = 768  # per-frame pixel ceiling (602,112 for factor 28)
MODEL_SEQ_LEN = 128000  # total pixel budget = MODEL_SEQ_LEN * factor^2 * 0.9 (90,316,800)
IMAGE_MIN_TOKENS = 4  # qwen-vl-utils' own image bounds, used for listed frames and resized_* sizes
IMAGE_MAX_TOKENS = 16384
MAX_RATIO = 200
MAX_VIDEO_FRAME_PIXELS = 4096 * 4096  # decoded pixels per source frame (4K video fits; 8192x8192 does not)
MAX_VIDEO_PIXELS = 768 * 1920 * 1080  # decoded pixels of all sampled frames of one video (768 full-HD frames)
MAX_CONTAINER_FRAMES = 1 << 20  # frames a container may index (9.7 h at 30 fps; bounds the probe's time and memory)
_SEEK_MIN_FRAMES = 16  # seek only when it skips at least this many frames
_RESIZE_CHUNK = 8  # frames resized per interpolate call (bounds float32 memory)


def round_by_factor(number: float, factor: int) -> int:
    return round(number / factor) * factor


def ceil_by_factor(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def floor_by_factor(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def smart_nframes(total_frames: int, video_fps: float, fps: float | None = None, nframes: int | None = None,
                  min_frames: int | None = None, max_frames: int | None = None) -> int:
    """Number of frames to sample (qwen-vl-utils 0.0.14 ``smart_nframes``).

    ``nframes`` rounds to even (half to even); otherwise ``total/video_fps*fps`` (fps default 2)
    is clamped to ``[min_frames, max_frames]`` (defaults 4 and ``min(768, total)``, rounded to
    even inwards) and to ``total``, then floored to even. The result must lie in ``[2, total]``.

    >>> smart_nframes(300, 30.0)      # 10 s at 30 fps, 2 fps -> 20 frames
    20
    >>> smart_nframes(30, 30.0)       # 1 s -> 2 frames, raised to the minimum of 4
    4
    """
    if fps is not None and nframes is not None:
        raise ValueError("give either fps or nframes, not both")
    if nframes is not None:
        n = round_by_factor(nframes, FRAME_FACTOR)
    else:
        fps = FPS if fps is None else fps
        lo = ceil_by_factor(MIN_FRAMES if min_frames is None else min_frames, FRAME_FACTOR)
        hi = floor_by_factor(min(MAX_FRAMES, total_frames) if max_frames is None else max_frames, FRAME_FACTOR)
        n = floor_by_factor(min(max(total_frames / video_fps * fps, lo), hi, total_frames), FRAME_FACTOR)
    if not FRAME_FACTOR <= n <= total_frames:
        raise ValueError(f"the number of sampled frames must be in [{FRAME_FACTOR}, {total_frames}], got {n}")
    return int(n)


def frame_range(total_frames: int, video_fps: float, video_start: float | None = None,
                video_end: float | None = None) -> tuple[int, int]:
    """First and last frame index for ``[video_start, video_end]`` seconds (both clamped to the video).

    The start rounds up to a frame, the end down: at 30 fps, 1.01 s .. 2.0 s gives frames 31..60.
    """
    if video_start is None and video_end is None:
        return 0, total_frames - 1
    duration = total_frames / video_fps
    start = math.ceil(max(0.0, min(video_start, duration)) * video_fps) if video_start is not None else 0
    end = total_frames - 1
    if video_end is not None:
        end = min(math.floor(max(0.0, min(video_end, duration)) * video_fps), total_frames - 1)
    if start >= end:
        raise ValueError(f"video_start/video_end select frames {start}..{end} of a {duration:.2f} s, "
                         f"{total_frames}-frame video: the range is empty")
    return start, end


def frame_indices(start: int, end: int, n: int) -> list[int]:
    """``round(linspace(start, end, n))`` in torch float32 with half-to-even rounding, as the reference."""
    return torch.linspace(start, end, n).round().long().tolist()


def qwen_vl_utils_resize(height: int, width: int, factor: int, min_pixels: float,
                         max_pixels: float) -> tuple[int, int]:
    """qwen-vl-utils' ``smart_resize`` variant (spec 4.2), used for video frame sizes.

    Unlike transformers', the first rounding never goes below ``factor`` and the shrink branch
    has no such floor: ``qwen_vl_utils_resize(10, 1000, 28, 3136, 1003520) == (28, 1008)``.
    """
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels {max_pixels} is below min_pixels {min_pixels}")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} is over the limit of "
                         f"{MAX_RATIO} (size {height}x{width})")
    h_bar = max(factor, round_by_factor(height, factor))
    w_bar = max(factor, round_by_factor(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar, w_bar = floor_by_factor(height / beta, factor), floor_by_factor(width / beta, factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = ceil_by_factor(height * beta, factor), ceil_by_factor(width * beta, factor)
    if h_bar <= 0 or w_bar <= 0:
        raise ValueError(f"size {height}x{width} shrinks to nothing under max_pixels={max_pixels}")
    return h_bar, w_bar


def video_frame_size(height: int, width: int, nframes: int, factor: int = 28, min_pixels: float | None = None,
                     max_pixels: float | None = None, total_pixels: float | None = None,
                     resized_height: int | None = None, resized_width: int | None = None) -> tuple[int, int]:
    """Per-frame target size for ``nframes`` sampled frames of ``height x width`` (qwen-vl-utils budget).

    ``max = max(min(768*f^2, total_pixels/nframes*2), int(min_pixels*1.05))``, further capped by a
    given ``max_pixels``; defaults: ``min_pixels = 128*f^2``, ``total_pixels = 128000*f^2*0.9``.
    ``resized_height``/``resized_width`` (both) replace the frame size and use the image bounds.
    """
    if resized_height is not None and resized_width is not None:
        return qwen_vl_utils_resize(resized_height, resized_width, factor, IMAGE_MIN_TOKENS * factor ** 2,
                                    IMAGE_MAX_TOKENS * factor ** 2)
    min_pixels = VIDEO_MIN_TOKENS * factor ** 2 if min_pixels is None else min_pixels
    total_pixels = MODEL_SEQ_LEN * factor ** 2 * 0.9 if total_pixels is None else total_pixels
    budget = max(min(VIDEO_MAX_TOKENS * factor ** 2, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    if max_pixels is not None:
        budget = min(max_pixels, budget)
    return qwen_vl_utils_resize(height, width, factor, min_pixels, budget)


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize uint8 ``(F, H, W, C)`` frames as torchvision's tensor ``resize`` (bicubic, antialias) does.

    Unchanged when the size already matches; otherwise float32 ``F.interpolate`` (bicubic,
    ``align_corners=False``, ``antialias=True``), clamp to [0, 255], round half to even, uint8.
    """
    if frames.shape[1:3] == (height, width):
        return frames
    out = np.empty((frames.shape[0], height, width, frames.shape[3]), dtype=np.uint8)
    for i in range(0, frames.shape[0], _RESIZE_CHUNK):
        chunk = torch.from_numpy(frames[i:i + _RESIZE_CHUNK]).permute(0, 3, 1, 2).float()  # (B, C, H, W)
        resized = F.interpolate(chunk, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        resized = resized.clamp_(0, 255).round_().to(torch.uint8)
        out[i:i + _RESIZE_CHUNK] = resized.permute(0, 2, 3, 1).numpy()
    return out


# --------------------------------------------------------------------------- PyAV reading

@dataclass
class VideoProbe:
    """What the container says before decoding: frame count, rate, size and the packet index."""

    total_frames: int
    fps: float
    height: int
    width: int
    timestamps: list[int] | None  # sorted presentation timestamps, one per frame (None: not given)
    keyframes: list[int]  # sorted timestamps of keyframes


def _open_container(data: str | bytes, source):
    import av

    try:
        container = av.open(io.BytesIO(data) if isinstance(data, bytes) else data, mode="r")
    except (av.FFmpegError, OSError, ValueError) as err:
        reason = safe_reason(err, data if isinstance(data, str) else None)
        raise MediaError(f"cannot open video {describe(source)}: {reason}") from None
    if not container.streams.video:
        container.close()
        raise MediaError(f"{describe(source)} has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream


def probe_video(data: str | bytes, source=None) -> VideoProbe:
    """Read the packet index of a video file (path or bytes) without decoding any frame.

    The frame count is the number of video packets, as decord counts it; ``source`` only names
    the video in errors.
    """
    import av

    container, stream = _open_container(data, source)
    try:
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        count, timestamps, keyframes = 0, [], []
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            count += 1
            if count > MAX_CONTAINER_FRAMES:
                raise MediaError(f"video {describe(source)} has more than {MAX_CONTAINER_FRAMES} frames, over the "
                                 f"limit", "too_large")
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is not None:
                timestamps.append(ts)
                if packet.is_keyframe:
                    keyframes.append(ts)
        height, width = stream.codec_context.height, stream.codec_context.width
    except av.FFmpegError as err:
        raise MediaError(f"cannot read video {describe(source)}: {safe_reason(err, _path(data))}") from None
    finally:
        container.close()
    if count == 0 or not rate or width <= 0 or height <= 0:
        raise MediaError(f"video {describe(source)} has no decodable frames "
                         f"({count} packets, {float(rate or 0):g} fps, {width}x{height})")
    known = len(timestamps) == count and len(set(timestamps)) == count
    return VideoProbe(count, float(rate), height, width, sorted(timestamps) if known else None,
                      sorted(keyframes) if known else [])


def _path(data: str | bytes) -> str | None:
    return data if isinstance(data, str) else None


def decode_frames(data: str | bytes, probe: VideoProbe, indices: list[int], source=None) -> np.ndarray:
    """Decode the frames at sorted ``indices`` (presentation order) as uint8 RGB ``(n, H, W, 3)``."""
    return np.stack(list(_checked(iter_frames(data, probe, indices, source), source, _path(data))))


def read_frames(data: str | bytes, probe: VideoProbe, indices: list[int], height: int, width: int,
                source=None) -> np.ndarray:
    """``resize_frames(decode_frames(...))``, with each chunk resized on a worker thread while the
    next frames decode (both release the GIL)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending, chunk = [], []
        for frame in _checked(iter_frames(data, probe, indices, source), source, _path(data)):
            chunk.append(frame)
            if len(chunk) == _RESIZE_CHUNK:
                pending.append(pool.submit(resize_frames, np.stack(chunk), height, width))
                chunk = []
        if chunk:
            pending.append(pool.submit(resize_frames, np.stack(chunk), height, width))
        return np.concatenate([job.result() for job in pending])


def iter_frames(data: str | bytes, probe: VideoProbe, indices: list[int], source=None) -> Iterator[np.ndarray]:
    """Yield the RGB frames at sorted ``indices`` in order.

    With a timestamp index, frames are matched by timestamp and the decoder seeks over runs of
    at least 16 unneeded frames to the keyframe before the next wanted one; otherwise (or if a
    seek lands past its target) frames are counted in decode order from the start.
    """
    done = 0
    if probe.timestamps is not None:
        try:
            for frame in _iter_seeking(data, probe, indices, source):
                done += 1
                yield frame
            return
        except _InOrder:
            pass
    yield from itertools.islice(_iter_in_order(data, probe, indices, source), done, None)


def _checked(frames: Iterator[np.ndarray], source, path: str | None) -> Iterator[np.ndarray]:
    import av

    try:
        yield from frames
    except av.FFmpegError as err:
        raise MediaError(f"cannot decode video {describe(source)}: {safe_reason(err, path)}") from None


class _InOrder(Exception):
    """Timestamps proved unreliable (a seek overshot, or frames lack pts): count frames instead."""


def _rgb(frame, probe: VideoProbe, source) -> np.ndarray:
    rgb = frame.to_ndarray(format="rgb24")
    if rgb.shape[:2] != (probe.height, probe.width):
        raise MediaError(f"video {describe(source)} changes frame size mid-stream "
                         f"({probe.width}x{probe.height} -> {rgb.shape[1]}x{rgb.shape[0]})")
    return rgb


def _iter_seeking(data, probe: VideoProbe, indices: list[int], source) -> Iterator[np.ndarray]:
    ts, keys = probe.timestamps, probe.keyframes
    targets = [ts[i] for i in indices]

    def keyframe_index(target: int) -> int:  # frame index of the last keyframe at or before target
        k = bisect_right(keys, target) - 1
        return bisect_left(ts, keys[k]) if k >= 0 else 0

    container, stream = _open_container(data, source)
    try:
        position, done = -1, 0  # frame index of the last decoded frame; frames yielded
        while done < len(targets):
            jump = keyframe_index(targets[done])
            seeked = jump - position > _SEEK_MIN_FRAMES and jump > 0
            if seeked:
                container.seek(ts[jump], stream=stream, backward=True, any_frame=False)
            ended = True
            for frame in container.decode(stream):
                if frame.pts is None or (seeked and frame.pts > targets[done]):
                    raise _InOrder
                seeked = False
                position = bisect_left(ts, frame.pts)
                while done < len(targets) and frame.pts >= targets[done]:
                    yield _rgb(frame, probe, source)
                    done += 1
                if done == len(targets) or keyframe_index(targets[done]) - position > _SEEK_MIN_FRAMES:
                    ended = False
                    break
            if ended and done < len(targets):
                raise MediaError(f"video {describe(source)} ended at frame {position} of {probe.total_frames}; "
                                 f"frame {indices[done]} could not be decoded")
    finally:
        container.close()


def _iter_in_order(data, probe: VideoProbe, indices: list[int], source) -> Iterator[np.ndarray]:
    container, stream = _open_container(data, source)
    done = 0
    try:
        for i, frame in enumerate(container.decode(stream)):
            while done < len(indices) and indices[done] == i:
                yield _rgb(frame, probe, source)
                done += 1
            if done == len(indices):
                return
    finally:
        container.close()
    raise MediaError(f"video {describe(source)} ended before frame {indices[done]} of {probe.total_frames}")
