"""Processor: ids and pixels equal to transformers' Qwen2VLProcessor; batches, labels, budgets and errors."""

import base64
import http.server
import io
import json
import os
import shutil
import struct
import threading
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from processing_helpers import build_model_dir, frame_pattern, make_video, model_dir, qwen_vl_utils  # noqa: F401

from qwen2vl.processing import Batch, MediaError, Processor


@pytest.fixture(scope="module")
def processor(model_dir):  # noqa: F811
    return Processor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf_processor(model_dir):  # noqa: F811
    """transformers 4.57.1 Qwen2VLProcessor with the slow image processor; its video processor (which needs
    torchvision) is replaced by the slow image processor's own video path, which does the same math."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

    image_processor = Qwen2VLImageProcessor()

    class VideoProcessor:
        merge_size = 2

        def __call__(self, videos, **_):
            return Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056)(images=None, videos=videos)

    class OracleProcessor(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return type(arg) if name == "video_processor" else super().check_argument_for_proper_class(name, arg)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return OracleProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=VideoProcessor())


def _picture(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_ids_and_pixels_equal_transformers_processor(processor, hf_processor, tmp_path):
    a, b, c = _picture(97, 131, 1), _picture(333, 181, 2), _picture(60, 400, 3)
    b.save(tmp_path / "b.png")
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "Describe."}]}],
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": [{"type": "text", "text": "Compare "},
                                      {"type": "image_url", "image_url": {"url": str(tmp_path / "b.png")}},
                                      {"type": "text", "text": " and "}, {"type": "image", "image": c}]},
         {"role": "assistant", "content": "The first is taller."},
         {"role": "user", "content": "Why? 为什么"}],
    ]
    images = [[a], [b, c]]
    for add_vision_id in (False, True):
        for conversation, imgs in zip(conversations, images):
            text = hf_processor.tokenizer.apply_chat_template(conversation, tokenize=False,
                                                              add_generation_prompt=True, add_vision_id=add_vision_id)
            expected = hf_processor(text=[text], images=imgs, return_tensors="pt")
            sample = processor.encode(conversation, add_vision_id=add_vision_id)
            assert torch.equal(sample.input_ids, expected["input_ids"][0])
            assert torch.equal(sample.image_grid_thw, expected["image_grid_thw"])
            assert (sample.pixel_values - expected["pixel_values"]).abs().max().item() <= 1e-5
            assert sample.pixel_values_videos is None and sample.video_grid_thw is None


def test_video_and_image_ids_equal_transformers_processor(processor, hf_processor, tmp_path):
    vp = qwen_vl_utils()
    clip = make_video(str(tmp_path / "clip.mp4"), "libx264", 40, fps=20, width=120, height=72)
    picture = _picture(50, 70)
    conversation = [{"role": "user", "content": [
        {"type": "video", "video": clip, "nframes": 4}, {"type": "image", "image": picture},
        {"type": "text", "text": "What moves?"}]}]
    frames = vp.fetch_video({"video": clip, "nframes": 4})
    text = hf_processor.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    expected = hf_processor(text=[text], images=[picture], videos=[frames], return_tensors="pt")
    sample = processor.encode(conversation)
    assert torch.equal(sample.input_ids, expected["input_ids"][0])
    assert torch.equal(sample.video_grid_thw, expected["video_grid_thw"])
    assert (sample.pixel_values_videos - expected["pixel_values_videos"]).abs().max().item() <= 1e-5
    assert [(m.kind, m.tokens) for m in sample.media] == [
        ("video", int(expected["video_grid_thw"].prod()) // 4), ("image", int(expected["image_grid_thw"].prod()) // 4)]


def test_collate_left_pads_and_concatenates_media_in_order(processor):
    a, b = _picture(64, 64, 1), _picture(90, 60, 2)
    short = [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "Hi"}]}]
    long = [{"role": "user", "content": [{"type": "text", "text": "Please describe this in detail: "},
                                         {"type": "image", "image": b}, {"type": "image", "image": a}]}]
    one, two = processor.encode(short), processor.encode(long)
    batch = processor([short, long])
    assert isinstance(batch, Batch) and set(batch) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"}
    length = max(len(one.input_ids), len(two.input_ids))
    pad = length - len(one.input_ids)
    assert batch["input_ids"].shape == (2, length) and pad > 0
    assert torch.equal(batch["input_ids"][0, pad:], one.input_ids)
    assert (batch["input_ids"][0, :pad] == processor.tokenizer.pad_id).all()
    assert batch["attention_mask"][0].tolist() == [0] * pad + [1] * len(one.input_ids)
    assert torch.equal(batch["input_ids"][1], two.input_ids) and batch["attention_mask"][1].all()
    assert torch.equal(batch["pixel_values"], torch.cat([one.pixel_values, two.pixel_values]))
    assert batch["image_grid_thw"].tolist() == one.image_grid_thw.tolist() + two.image_grid_thw.tolist()
    single = processor(short)  # one conversation is a batch of one
    assert torch.equal(single["input_ids"][0], one.input_ids)
    assert processor.collate([one], pad_id=7)["input_ids"].shape == (1, len(one.input_ids))
    text_only = processor([[{"role": "user", "content": "plain"}]])
    assert set(text_only) == {"input_ids", "attention_mask"}


def test_labels_mark_assistant_content_and_im_end(processor):
    tok = processor.tokenizer
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": _picture(56, 56)}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A red 猫."},
        {"role": "user", "content": "More."},
        {"role": "assistant", "content": [{"type": "text", "text": "Noise 🐱"}]},
    ]
    sample = processor.encode(conversation, add_generation_prompt=False, return_labels=True)
    trained = sample.labels[sample.labels != -100]
    assert tok.decode(trained.tolist()) == "A red 猫.<|im_end|>Noise 🐱<|im_end|>"
    assert torch.equal(sample.labels != -100, sample.labels == sample.input_ids)
    other = processor.encode([{"role": "user", "content": "x"}], return_labels=True)
    batch = processor.collate([sample, other])
    assert batch["labels"].shape == batch["input_ids"].shape
    assert (batch["labels"][1, : len(sample.input_ids) - len(other.input_ids)] == -100).all()
    assert "labels" not in processor.collate([sample, processor.encode([{"role": "user", "content": "x"}])])


def test_token_budget_names_the_item_before_decoding_pixels(processor, tmp_path):
    broken = tmp_path / "broken.png"
    buffer = io.BytesIO()
    _picture(560, 560).save(buffer, "PNG")
    broken.write_bytes(buffer.getvalue()[:2000])  # the header is intact, the pixels are not
    conversation = [{"role": "user", "content": [{"type": "image", "image": _picture(56, 56)},
                                                 {"type": "image", "image": str(broken)},
                                                 {"type": "text", "text": "?"}]}]
    with pytest.raises(MediaError, match=r"image 2 \(message 0, part 1\) '.*broken\.png' takes 400 tokens, .* "
                                         r"over the budget of 100"):
        processor.encode(conversation, max_tokens=100)
    with pytest.raises(MediaError, match=r"image 2 .*cannot decode image .*broken\.png.*truncated"):  # decoded
        processor.encode(conversation, max_tokens=1000)
    with pytest.raises(ValueError, match="prompt text alone takes"):
        processor.encode([{"role": "user", "content": "word " * 50}], max_tokens=10)
    fits = processor.encode([{"role": "user", "content": [{"type": "image", "image": _picture(56, 56)}]}])
    assert len(processor.encode([{"role": "user", "content": [{"type": "image", "image": _picture(56, 56)}]}],
                                max_tokens=len(fits.input_ids)).input_ids) == len(fits.input_ids)


def test_per_item_image_options(processor):
    picture = _picture(300, 500)
    def grid(**options):
        content = [{"type": "image", "image": picture, **options}]
        return processor.encode([{"role": "user", "content": content}]).image_grid_thw[0].tolist()
    assert grid() == [1, 22, 36]
    assert grid(max_pixels=28 * 28 * 16) == [1, 6, 10]
    assert grid(min_pixels=28 * 28 * 1000, max_pixels=28 * 28 * 2000) == [1, 50, 82]  # ceil: 700x1148
    assert grid(resized_height=112, resized_width=56) == [1, 8, 4]
    with pytest.raises(MediaError, match=r"image 1 \(message 0, part 0\).*min_pixels 9000 is above max_pixels 10"):
        grid(min_pixels=9000, max_pixels=10)


def test_from_pretrained_reads_preprocessor_config(model_dir, tmp_path):  # noqa: F811
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(model_dir, name), tmp_path / name)
    default = Processor.from_pretrained(str(tmp_path))
    assert (default.min_pixels, default.max_pixels, default.patch_size, default.merge_size) == (3136, 1003520, 14, 2)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    hub = Processor.from_pretrained(str(tmp_path), allow_remote_media=True)
    assert (hub.min_pixels, hub.max_pixels, hub.image_mean, hub.access.allow_remote) == \
        (3136, 12845056, (0.5, 0.5, 0.5), True)
    sample = hub.encode([{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (56, 56))}]}])
    assert torch.allclose(sample.pixel_values, torch.full_like(sample.pixel_values, -1.0))


def _bomb_png(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def test_bad_images_are_named(processor, tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    truncated = tmp_path / "truncated.jpg"
    buffer = io.BytesIO()
    _picture(200, 300).save(buffer, "JPEG")
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    thin = tmp_path / "thin.png"
    Image.new("RGB", (2010, 10)).save(thin)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_bomb_png(30000, 30000))
    inside = tmp_path / "jail"
    inside.mkdir()
    Image.new("RGB", (30, 30)).save(inside / "ok.png")
    jailed = Processor(processor.tokenizer, allowed_media_dir=str(inside))
    data_url = "data:image/png;base64," + base64.b64encode(garbage.read_bytes() * 20).decode()
    cases = [
        (processor, str(tmp_path / "missing.png"), r"file not found: '.*missing\.png'"),
        (processor, str(garbage), r"cannot decode image '.*garbage\.png'"),
        (processor, str(truncated), r"cannot decode image '.*truncated\.jpg'.*truncated"),
        (processor, Image.new("RGB", (0, 5)), r"has zero size"),
        (processor, np.zeros((0, 4, 3), np.uint8), r"has zero size"),
        (processor, str(thin), r"thin\.png'.*aspect ratio 201\.0 is over the limit of 200"),
        (processor, str(bomb), r"bomb\.png'.*(too large to decode safely|over the limit)"),
        (processor, data_url, r"cannot decode image 'data:image/png;base64,bm90IGFuIGlt\.\.\.' \(\d+ chars\)"),
        (processor, "data:image/png;base64,@@@", r"invalid base64"),
        (processor, "http://127.0.0.1:9/cat.png", r"remote media is disabled"),
        (jailed, str(tmp_path / "thin.png"), r"outside the allowed media directory"),
        (jailed, "../thin.png", r"outside the allowed media directory"),
    ]
    for proc, source, pattern in cases:
        conversation = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"},
                                                     {"type": "image_url", "image_url": {"url": source}}]}]
        with pytest.raises(MediaError, match=r"image 1 \(message 0, part 2\).*" + pattern):
            proc.encode(conversation)
    assert jailed.encode([{"role": "user", "content": [{"type": "image", "image": "ok.png"}]}]).image_grid_thw.tolist()
    small = Processor(processor.tokenizer, max_image_pixels=500)
    with pytest.raises(MediaError, match=r"has 30x30 pixels, over the limit of 500"):
        small.encode([{"role": "user", "content": [{"type": "image", "image": str(inside / "ok.png")}]}])


def test_placeholder_count_mismatch_is_refused(processor, monkeypatch, tmp_path):
    picture = tmp_path / "p.png"
    _picture(56, 56).save(picture)
    conversation = [{"role": "user", "content": [{"type": "image", "image": picture}]}]  # a pathlib.Path
    assert processor.encode(conversation).image_grid_thw.tolist() == [[1, 4, 4]]
    tok = processor.tokenizer
    real = tok.encode_with_offsets

    def splits_the_pad(text):  # as a tokenizer without <|image_pad|> as one special token would
        ids, offsets = real(text)
        keep = [i for i, t in enumerate(ids) if t != tok.image_pad_id]
        return [ids[i] for i in keep], [offsets[i] for i in keep]

    monkeypatch.setattr(tok, "encode_with_offsets", splits_the_pad)
    with pytest.raises(MediaError, match="the prompt has 0 image placeholders but the conversation has 1 images"):
        processor.encode(conversation)
    monkeypatch.undo()
    with pytest.raises(MediaError, match=r"message 0, part 1: text contains '<\|image_pad\|>'"):
        processor.encode([{"role": "user", "content": [{"type": "image", "image": _picture(56, 56)},
                                                       {"type": "text", "text": "and <|image_pad|>"}]}])


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict = {}

    def do_GET(self):  # noqa: N802
        body = self.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args):
        pass


@pytest.fixture()
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_remote_media_only_when_enabled(processor, http_server, tmp_path):
    buffer = io.BytesIO()
    _picture(64, 96).save(buffer, "PNG")
    _Handler.files = {"/cat.png": buffer.getvalue(),
                      "/clip.mp4": open(make_video(str(tmp_path / "c.mp4"), "libx264", 8), "rb").read()}
    image = [{"role": "user", "content": [{"type": "image", "image": f"{http_server}/cat.png"}]}]
    video = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"{http_server}/clip.mp4"}}]}]
    with pytest.raises(MediaError, match="remote media is disabled"):
        processor.encode(image)
    local = processor.encode([{"role": "user", "content": [{"type": "image", "image": _picture(64, 96)}]}])
    fetched = processor.encode(image, allow_remote_media=True)
    assert torch.equal(fetched.pixel_values, local.pixel_values)
    assert processor.encode(video, allow_remote_media=True).video_grid_thw.tolist() == [[2, 20, 28]]
    remote = Processor(processor.tokenizer, allow_remote_media=True, max_remote_bytes=100)
    with pytest.raises(MediaError, match=r"image 1 \(message 0, part 0\).*over the 100-byte limit"):
        remote.encode(image)
    with pytest.raises(MediaError, match=r"cannot download .*missing\.png.*404"):
        Processor(processor.tokenizer, allow_remote_media=True).encode(
            [{"role": "user", "content": [{"type": "image", "image": f"{http_server}/missing.png"}]}])


def test_frames_as_video_and_pattern_helper_agree(processor):
    frames = [Image.fromarray(frame_pattern(i, 56, 56)) for i in range(5)]
    sample = processor.encode([{"role": "user", "content": [{"type": "video", "video": frames}]}])
    assert sample.video_grid_thw.tolist()[0][0] == 3  # five frames padded to six, two per temporal patch


def test_build_model_dir_is_loadable(tmp_path):
    directory = build_model_dir(str(tmp_path / "m"), preprocessor={"max_pixels": 28 * 28 * 4})
    assert Processor.from_pretrained(directory).max_pixels == 28 * 28 * 4
