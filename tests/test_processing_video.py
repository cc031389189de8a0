"""Videos: frame counts, indices and sizes equal to qwen-vl-utils 0.0.14; real files decode to the right frames."""

import itertools
import sys
import types

import av
import numpy as np
import pytest
import torch
from PIL import Image
from processing_helpers import frame_pattern, make_video, model_dir, qwen_vl_utils  # noqa: F401

from qwen2vl.processing import (
    MediaError,
    Processor,
    frame_indices,
    frame_range,
    smart_nframes,
    video_frame_size,
)
from qwen2vl.processing.video import decode_frames, probe_video

TOTALS = [1, 2, 3, 4, 5, 17, 60, 61, 300, 901, 2000]
RATES = [1.0, 2.5, 23.976, 25.0, 30.0, 60.0]
SAMPLING = [{}, {"fps": 1.0}, {"fps": 0.5}, {"fps": 4.0}, {"nframes": 7}, {"nframes": 16}, {"nframes": 1},
            {"min_frames": 10}, {"max_frames": 9}, {"fps": 3.0, "min_frames": 3, "max_frames": 41}]
RANGES = [{}, {"video_start": 1.0}, {"video_start": 0.5, "video_end": 2.25}, {"video_end": 3.0},
          {"video_start": 5.0, "video_end": 1.0}]
BUDGETS = [{}, {"max_pixels": 50000}, {"min_pixels": 200000}, {"total_pixels": 2_000_000},
           {"min_pixels": 3136, "max_pixels": 12845056}, {"resized_height": 300, "resized_width": 500}]
SIZES = [(90, 160), (480, 640), (1080, 1920), (20, 2000), (3000, 20)]


def _ours(total, rate, ele):
    start, end = frame_range(total, rate, ele.get("video_start"), ele.get("video_end"))
    n = smart_nframes(end - start + 1, rate, ele.get("fps"), ele.get("nframes"), ele.get("min_frames"),
                      ele.get("max_frames"))
    return n, frame_indices(start, end, n)


def _theirs(vp, total, rate, ele):
    start, end, count = vp.calculate_video_frame_range(ele, total, rate)
    n = vp.smart_nframes(ele, total_frames=count, video_fps=rate)
    return n, torch.linspace(start, end, n).round().long().tolist()


def _outcome(fn, *args):
    try:
        return fn(*args)
    except ValueError:
        return "ValueError"


def test_frame_counts_and_indices_match_qwen_vl_utils():
    vp = qwen_vl_utils()
    checked = 0
    for total, rate, sampling, span in itertools.product(TOTALS, RATES, SAMPLING, RANGES):
        ele = {**sampling, **span}
        assert _outcome(_ours, total, rate, ele) == _outcome(_theirs, vp, total, rate, ele), (total, rate, ele)
        checked += 1
    assert checked > 3000
    with pytest.raises(ValueError, match="either fps or nframes"):
        smart_nframes(100, 30.0, fps=1.0, nframes=4)


class _FakeReader:
    """decord.VideoReader over a blank video described by its path: 'fake:total:fps:height:width'."""

    def __init__(self, path):
        _, total, rate, self.height, self.width = path.split(":")
        self.total, self.rate = int(total), float(rate)
        self.height, self.width = int(self.height), int(self.width)

    def __len__(self):
        return self.total

    def get_avg_fps(self):
        return self.rate

    def get_batch(self, idx):
        frames = np.zeros((len(idx), self.height, self.width, 3), np.uint8)
        return types.SimpleNamespace(asnumpy=lambda: frames)


def test_frame_sizes_match_qwen_vl_utils(monkeypatch):
    vp = qwen_vl_utils()
    monkeypatch.setitem(sys.modules, "decord", types.SimpleNamespace(VideoReader=_FakeReader))
    monkeypatch.setattr(vp, "FORCE_QWENVL_VIDEO_READER", "decord")
    vp.get_video_reader_backend.cache_clear()
    recorded = []

    def record_resize(video, size, **_):
        recorded.append(tuple(size))
        return video[:0]

    monkeypatch.setattr(vp.transforms.functional, "resize", record_resize)
    cases = 0
    for (h, w), budget, (total, rate, sampling) in itertools.product(
            SIZES, BUDGETS, [(61, 24.0, {}), (300, 30.0, {"fps": 1.0}), (2000, 25.0, {"nframes": 40}),
                             (901, 30.0, {"fps": 0.1}), (2000, 60.0, {"max_frames": 768, "fps": 30.0})]):
        ele = {"video": f"fake:{total}:{rate}:{h}:{w}", **sampling, **budget}
        n, _ = _ours(total, rate, ele)
        if n * h * w > 30_000_000:
            continue
        try:
            _, meta = vp.fetch_video(dict(ele), return_video_metadata=True)
            theirs = recorded.pop()
        except (ValueError, AssertionError):
            theirs = "error"
        try:
            ours = video_frame_size(h, w, n, 28, *(ele.get(k) for k in ("min_pixels", "max_pixels", "total_pixels",
                                                                         "resized_height", "resized_width")))
        except ValueError:
            ours = "error"
        assert ours == theirs, (h, w, ele)
        if theirs != "error":
            assert list(meta["frames_indices"]) == _ours(total, rate, ele)[1]
        cases += 1
    assert cases >= 100


FORMATS = [("mp4", "libx264"), ("mp4", "mpeg4"), ("webm", "libvpx"), ("avi", "mpeg4"), ("mkv", "libx264")]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    made = {}
    for ext, codec in FORMATS:
        if codec not in av.codecs_available:
            continue
        made[(ext, codec)] = make_video(str(root / f"clip_{codec}.{ext}"), codec, 61, fps=24, width=150, height=90)
    return made


def _all_frames(path):
    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f[0]}-{f[1]}")
def test_real_files_decode_the_sampled_frames(videos, fmt):
    if fmt not in videos:
        pytest.skip(f"codec {fmt[1]} not available")
    path = videos[fmt]
    probe = probe_video(path)
    assert (probe.total_frames, probe.fps, probe.height, probe.width) == (61, 24.0, 90, 150)
    everything = _all_frames(path)
    assert len(everything) == 61
    for indices in ([0, 1, 2, 3], [0, 12, 30, 45, 60], list(range(0, 61, 2))):
        frames = decode_frames(path, probe, indices)
        assert np.array_equal(frames, everything[indices])
        # and these are the frames that were encoded (lossy codecs: close, and closer than any neighbour)
        for got, i in zip(frames, indices):
            errors = [np.abs(got.astype(int) - frame_pattern(j, 90, 150)).mean() for j in range(61)]
            assert int(np.argmin(errors)) == i and errors[i] < 8


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f[0]}-{f[1]}")
@pytest.mark.parametrize("options", [{}, {"nframes": 6}, {"fps": 4.0, "min_pixels": 20000, "max_pixels": 40000},
                                     {"min_pixels": 3136}])
def test_processor_video_equals_qwen_vl_utils_pipeline(videos, fmt, options, model_dir):  # noqa: F811
    """Frames from qwen-vl-utils (torchvision reader, full decode) through transformers' slow processor."""
    from transformers import Qwen2VLImageProcessor

    if fmt not in videos:
        pytest.skip(f"codec {fmt[1]} not available")
    vp = qwen_vl_utils()
    ele = {"type": "video", "video": videos[fmt], **options}
    reference_frames = vp.fetch_video(dict(ele))
    reference = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056)(
        images=None, videos=[reference_frames], return_tensors="pt")
    sample = Processor.from_pretrained(model_dir).encode([{"role": "user", "content": [ele]}])
    assert torch.equal(sample.video_grid_thw, reference["video_grid_thw"])
    assert (sample.pixel_values_videos - reference["pixel_values_videos"]).abs().max().item() <= 1e-5
    grid = sample.video_grid_thw[0].tolist()
    assert sample.media[0].tokens == grid[0] * grid[1] * grid[2] // 4
    assert int((sample.input_ids == Processor.from_pretrained(model_dir).tokenizer.video_pad_id).sum()) == \
        sample.media[0].tokens


@pytest.mark.parametrize("ext,codec", [("mp4", "libx264"), ("webm", "libvpx"), ("mkv", "libx264")])
def test_seeking_decode_matches_full_decode(tmp_path, ext, codec):
    path = str(tmp_path / f"long.{ext}")
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.gop_size = 10
        for i in range(400):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame_pattern(i, 48, 64), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    probe = probe_video(path)
    assert probe.total_frames == 400 and len(probe.keyframes) >= 30
    everything = _all_frames(path)
    for indices in ([0, 133, 266, 399], [5, 6, 150, 151, 152, 398], frame_indices(0, 399, 12)):
        assert np.array_equal(decode_frames(path, probe, indices), everything[indices])


def test_video_range_selects_frames(videos, model_dir):  # noqa: F811
    path = videos[("mp4", "libx264")]
    ele = {"type": "video", "video": path, "video_start": 0.5, "video_end": 2.0, "nframes": 4}
    start, end = frame_range(61, 24.0, 0.5, 2.0)
    assert (start, end) == (12, 48)
    indices = frame_indices(start, end, 4)
    sample = Processor.from_pretrained(model_dir).encode([{"role": "user", "content": [ele]}])
    assert sample.video_grid_thw.tolist() == [[2, 18, 30]]  # 90x150 raised to the 100,352-pixel floor
    everything = _all_frames(path)
    assert np.array_equal(decode_frames(path, probe_video(path), indices), everything[indices])


@pytest.mark.parametrize("count", [3, 4])
def test_frame_list_video_equals_qwen_vl_utils(tmp_path, model_dir, count):  # noqa: F811
    from transformers import Qwen2VLImageProcessor

    vp = qwen_vl_utils()
    frames = []
    for i in range(count):
        path = tmp_path / f"f{i}.png"
        Image.fromarray(frame_pattern(i, 83, 131)).save(path)
        frames.append(str(path))
    ele = {"type": "video", "video": frames}
    reference_frames = vp.fetch_video(dict(ele))
    assert reference_frames.shape[0] == 4  # an odd count is padded with the last frame
    reference = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056)(
        images=None, videos=[reference_frames], return_tensors="pt")
    sample = Processor.from_pretrained(model_dir).encode([{"role": "user", "content": [ele]}])
    assert torch.equal(sample.video_grid_thw, reference["video_grid_thw"])
    assert (sample.pixel_values_videos - reference["pixel_values_videos"]).abs().max().item() <= 1e-5


def test_bad_videos_are_named(tmp_path, videos, model_dir):  # noqa: F811
    processor = Processor.from_pretrained(model_dir)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x01 this is not a video" * 50)
    one_frame = make_video(str(tmp_path / "one.mp4"), "libx264", 1)
    image_file = tmp_path / "still.png"
    Image.new("RGB", (32, 32)).save(image_file)
    audio_only = str(tmp_path / "tone.wav")
    with av.open(audio_only, "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
    cases = [
        (str(garbage), r"cannot open video 'garbage.mp4'|cannot open video .*garbage\.mp4"),
        (str(tmp_path / "missing.mp4"), r"file not found: .*missing\.mp4"),
        (one_frame, r"one\.mp4.*sampled frames must be in \[2, 1\]"),
        (audio_only, r"tone\.wav.* has no video stream"),
        (str(image_file), r"still\.png"),
        ([], r"the video has no frames"),
        ([str(image_file), str(tmp_path / "gone.png")], r"frame 1: file not found: .*gone\.png"),
    ]
    for source, pattern in cases:
        conversation = [{"role": "user", "content": [{"type": "text", "text": "see"},
                                                     {"type": "video", "video": source}]}]
        with pytest.raises(MediaError, match=r"video 1 \(message 0, part 1\).*" + pattern):
            processor.encode(conversation)
    with pytest.raises(MediaError, match=r"video 1 \(message 0, part 0\).*either fps or nframes"):
        processor.encode([{"role": "user", "content": [{"type": "video", "video": videos[("mp4", "libx264")],
                                                        "fps": 1, "nframes": 4}]}])


def test_fallback_to_counting_frames_after_a_bad_seek(videos, monkeypatch):
    """If timestamps prove unreliable mid-way, decoding restarts in order and skips what was already given."""
    from qwen2vl.processing import video as video_module

    path = videos[("mp4", "libx264")]
    probe = probe_video(path)
    real = video_module._iter_seeking

    def overshoots(*args):
        frames = real(*args)
        yield next(frames)
        yield next(frames)
        raise video_module._InOrder

    monkeypatch.setattr(video_module, "_iter_seeking", overshoots)
    indices = [3, 10, 20, 33, 60]
    assert np.array_equal(decode_frames(path, probe, indices), _all_frames(path)[indices])
    no_index = video_module.VideoProbe(probe.total_frames, probe.fps, probe.height, probe.width, None, [])
    assert np.array_equal(decode_frames(path, no_index, indices), _all_frames(path)[indices])
