"""Images: smart_resize and pixel_values against transformers 4.57.1 (PIL path), loading rules, patch order."""

import base64
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from processing_helpers import qwen_vl_utils

from qwen2vl.processing import (
    MediaError,
    frames_to_patches,
    image_to_patches,
    load_image,
    open_image,
    qwen_vl_utils_resize,
    smart_resize,
)

BUDGETS = [(56 * 56, 28 * 28 * 1280), (3136, 12845056), (4 * 784, 256 * 784), (100352, 602112), (784, 784 * 16)]


def _size_grid(seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = [(h, w) for h in (1, 2, 13, 14, 27, 28, 29, 41, 42, 55, 56, 70, 98, 111) for w in (1, 5, 28, 70, 200)]
    sizes += [(rng.randint(1, 64), rng.randint(1, 64)) for _ in range(600)]  # tiny
    sizes += [(rng.randint(1, 30), rng.randint(100, 6000)) for _ in range(600)]  # thin, some over ratio 200
    sizes += [(rng.randint(64, 4096), rng.randint(64, 4096)) for _ in range(800)]
    sizes += [(rng.randint(4096, 60000), rng.randint(4096, 60000)) for _ in range(300)]  # huge
    return sizes


def _outcome(fn, *args):
    try:
        return fn(*args)
    except ValueError:
        return "ValueError"


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

    sizes = _size_grid()
    checked = 0
    for lo, hi in BUDGETS:
        for h, w in sizes:
            assert _outcome(smart_resize, h, w, 28, lo, hi) == _outcome(hf_smart_resize, h, w, 28, lo, hi), (h, w, lo, hi)
            checked += 1
    assert checked >= 10_000
    assert smart_resize(561, 278) == (560, 280)
    assert smart_resize(10, 1000) == (28, 560)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010)


def test_qwen_vl_utils_variant_matches_qwen_vl_utils():
    vp = qwen_vl_utils()
    for lo, hi in BUDGETS:
        for h, w in _size_grid(1)[::4]:
            ours, theirs = _outcome(qwen_vl_utils_resize, h, w, 28, lo, hi), _outcome(vp.smart_resize, h, w, 28, lo, hi)
            if isinstance(theirs, tuple) and min(theirs) == 0:
                theirs = "ValueError"  # qwen-vl-utils returns a zero side (and fails later); we refuse at once
            assert ours == theirs, (h, w, lo, hi)
    assert qwen_vl_utils_resize(10, 1000, 28, 3136, 1003520) == (28, 1008)


def _image(mode: str, h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    rgb[: h // 2] = np.linspace(0, 255, w, dtype=np.uint8)[None, :, None]  # smooth half, noisy half
    base = Image.fromarray(rgb)
    if mode == "RGBA":
        return Image.fromarray(np.dstack([rgb, np.full((h, w), 255, np.uint8)]))
    if mode == "LA":
        return base.convert("L").convert("LA")
    if mode == "P-transparency":
        image = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=200)
        image.info["transparency"] = 250  # an index no pixel uses: fully opaque
        return image
    return base.convert(mode)


def _sources(image: Image.Image, tmp_path, fmt: str):
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    data = buffer.getvalue()
    path = tmp_path / f"img.{fmt.lower()}"
    path.write_bytes(data)
    mime = "png" if fmt == "PNG" else fmt.lower()
    return [str(path), f"file://{path}", f"data:image/{mime};base64,{base64.b64encode(data).decode()}", data]


def _open_plainly(source) -> Image.Image:
    """The image as transformers gets it: PIL-opened, no EXIF or alpha handling of ours."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, bytes):
        return Image.open(io.BytesIO(source))
    if source.startswith("data:"):
        return Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
    return Image.open(source.removeprefix("file://"))


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")
@pytest.mark.parametrize("mode,fmt", [("RGB", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"), ("P-transparency", "PNG"),
                                      ("L", "PNG"), ("CMYK", "TIFF"), ("1", "PNG"), ("RGB", "JPEG")])
def test_pixel_values_match_transformers(mode, fmt, tmp_path):
    from transformers import Qwen2VLImageProcessor

    for (h, w), (lo, hi) in [((97, 131), (3136, 12845056)), ((333, 181), (56 * 56, 28 * 28 * 64))]:
        original = _image(mode, h, w)
        hf_proc = Qwen2VLImageProcessor(min_pixels=lo, max_pixels=hi)
        for source in [original, *_sources(original, tmp_path, fmt)]:
            reference = hf_proc(images=[_open_plainly(source)], return_tensors="pt")
            pixels, grid = image_to_patches(load_image(source), min_pixels=lo, max_pixels=hi)
            assert list(grid) == reference["image_grid_thw"][0].tolist()
            assert pixels.dtype == torch.float32 and pixels.shape == reference["pixel_values"].shape
            assert (pixels - reference["pixel_values"]).abs().max().item() <= 1e-5, mode


def test_numpy_sources_match_their_pil_equivalents():
    rgb = np.random.default_rng(1).integers(0, 256, (45, 77, 3), dtype=np.uint8)
    expected = np.asarray(load_image(Image.fromarray(rgb)))
    assert np.array_equal(np.asarray(load_image(rgb)), expected)
    assert np.array_equal(np.asarray(load_image(rgb.transpose(2, 0, 1).copy())), expected)  # CHW
    assert np.array_equal(np.asarray(load_image(rgb.astype(np.uint16) << 8)), expected)  # 16-bit
    assert np.array_equal(np.asarray(load_image(rgb / 255.0)), expected)  # float in [0, 1]
    grey = rgb[..., 0]
    assert np.array_equal(np.asarray(load_image(grey)), np.repeat(grey[..., None], 3, axis=2))
    with pytest.raises(MediaError, match="float image array"):
        load_image(rgb * 2.0)


def test_sixteen_bit_grey_keeps_high_byte(tmp_path):
    values = np.arange(0, 65536, 64, dtype=np.uint16).reshape(32, 32)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I;16")
    rgb = np.asarray(load_image(str(path)))
    assert np.array_equal(rgb[..., 1], (values >> 8).astype(np.uint8))


def test_transparency_is_composited_over_white_like_qwen_vl_utils():
    vp = qwen_vl_utils()
    rng = np.random.default_rng(2)
    rgba = Image.fromarray(rng.integers(0, 256, (37, 53, 4), dtype=np.uint8))
    assert np.array_equal(np.asarray(load_image(rgba)), np.asarray(vp.to_rgb(rgba)))
    clear = Image.new("RGBA", (9, 7), (10, 20, 30, 0))
    assert np.asarray(load_image(clear)).min() == 255
    la = Image.new("LA", (9, 7), (0, 0))
    assert np.asarray(load_image(la)).min() == 255


def test_exif_orientation_is_applied(tmp_path):
    image = _image("RGB", 40, 90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    opened, size = open_image(str(path))
    assert opened.size == (90, 40) and size == (90, 40)  # (height, width) of the upright image
    upright = load_image(str(path))
    assert upright.size == (40, 90)
    stored = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(np.asarray(upright), np.rot90(stored, k=-1))


def test_patch_order_matches_spec():
    """Spec 4.4: rows go merge window by merge window; columns are channel, time, y, x."""
    h, w = 4 * 14, 4 * 14
    frame = np.zeros((h, w, 3), np.uint8)
    for r in range(4):
        for c in range(4):
            frame[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14] = [r * 4 + c, 100 + r * 4 + c, 200]
    pixels, grid = frames_to_patches(frame[None], mean=(0, 0, 0), std=(1, 1, 1))
    assert grid == (1, 4, 4) and pixels.shape == (16, 1176)
    order = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3),
             (2, 0), (2, 1), (3, 0), (3, 1), (2, 2), (2, 3), (3, 2), (3, 3)]
    levels = torch.round(pixels * 255).long()
    for row, (r, c) in enumerate(order):
        assert levels[row, 0].item() == r * 4 + c  # channel 0 block: 2 * 14 * 14 columns
        assert levels[row, 392].item() == 100 + r * 4 + c and levels[row, 784].item() == 200
    assert torch.equal(pixels[:, :196], pixels[:, 196:392])  # an image is two identical frames


def test_large_image_shape():
    image = Image.fromarray(np.zeros((1024, 1024, 3), np.uint8))
    pixels, grid = image_to_patches(image, max_pixels=28 * 28 * 1280)
    assert pixels.shape == (4900, 1176) and grid == (1, 70, 70)
