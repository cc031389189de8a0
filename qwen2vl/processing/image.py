"""Images: load any source to RGB, size them at native resolution, normalise and patchify.

Reference behaviour (spec section 4): transformers 4.57.1 ``Qwen2VLImageProcessor`` on its PIL
path. An image is resized with PIL bicubic to ``smart_resize`` of its size (sides multiples of
``patch_size * merge_size`` = 28), rescaled by 1/255 in float64, normalised with the CLIP
mean/std in float32, and cut into 14x14 patches laid out as in spec 4.4. One image is a
two-frame clip (temporal patch 2), so ``grid_thw = (1, H/14, W/14)``.

Loading differs from 4.57.1 in two documented ways, both following qwen-vl-utils >= 0.0.11 and
transformers 5: transparency is composited over white (4.57.1 drops alpha), and EXIF
orientation is applied. 16-bit grey images (``I;16``) keep their high byte (Pillow's
``convert("RGB")`` would clip every value above 255 to white).
"""

from __future__ import annotations

import io
import math
import warnings
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageOps

from .sources import MediaAccess, MediaError, describe, read_source, safe_reason

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
MIN_PIXELS = 56 * 56  # transformers' Qwen2VLImageProcessor default size["shortest_edge"]
MAX_PIXELS = 28 * 28 * 1280  # its default size["longest_edge"]; the hub config raises it to 12845056
MAX_RATIO = 200
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_IMAGE_PIXELS = 89_478_485  # decoded-size cap against decompression bombs (Pillow's warning level)

_LOOKUP_ROWS = 2048  # patch rows normalised per table lookup
_ORIENTATION = 0x0112
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Target ``(height, width)``: multiples of ``factor`` with the area in ``[min_pixels, max_pixels]``.

    Same arithmetic as transformers (spec 4.1): Python ``round`` (half to even) to the nearest
    multiple, then, if the area is out of bounds, scale both sides by one factor and floor
    (too big, but never below ``factor``) or ceil (too small). Aspect ratios over 200 are refused.

    >>> smart_resize(561, 278)
    (560, 280)
    >>> smart_resize(70, 70)        # 70/28 = 2.5 rounds to 2 -> 56
    (56, 56)
    >>> smart_resize(1080, 1920, max_pixels=12845056)
    (1092, 1932)
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} is over the limit of "
                         f"{MAX_RATIO} (size {height}x{width})")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ----------------------------------------------------------------------------- loading

def open_image(source, access: MediaAccess | None = None,
               max_image_pixels: int = MAX_IMAGE_PIXELS) -> tuple[Image.Image, tuple[int, int]]:
    """Open ``source`` without decoding its pixels; return it and its upright ``(height, width)``.

    Sources: PIL image, numpy array (HW, HWC or CHW; uint8, uint16, bool, or float in [0, 1]),
    bytes, local path, ``file://``, ``data:`` URL, or http(s) when ``access`` allows it.
    """
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = _array_to_image(source)
    else:
        data = read_source(source, access)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise MediaError(f"image {describe(source)} is too large to decode safely", "image_too_large") from None
        except (OSError, ValueError, SyntaxError) as err:
            reason = safe_reason(err, data if isinstance(data, str) else None)
            raise MediaError(f"cannot decode image {describe(source)}: {reason}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise MediaError(f"image {describe(source)} has zero size ({width}x{height})")
    if width * height > max_image_pixels:
        raise MediaError(f"image {describe(source)} has {width}x{height} pixels, over the limit of "
                         f"{max_image_pixels} (decompression bomb guard)", "image_too_large")
    if _orientation(image) in _SWAPS_SIDES:
        width, height = height, width
    return image, (height, width)


def load_image(source, access: MediaAccess | None = None,
               max_image_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode ``source`` to an upright RGB PIL image (EXIF applied, transparency over white)."""
    image, _ = open_image(source, access, max_image_pixels)
    return decode_rgb(image, source)


def decode_rgb(image: Image.Image, source=None) -> Image.Image:
    """Decode an opened image and convert it to upright RGB; ``source`` only names it in errors."""
    try:
        image.load()
        if _orientation(image) in range(2, 9):
            image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except (OSError, ValueError, SyntaxError) as err:
        reason = safe_reason(err, getattr(image, "filename", None) or None)
        raise MediaError(f"cannot decode image {describe(source if source is not None else image)}: {reason}") \
            from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of ``image``: transparency composited over white, 16-bit grey reduced to 8 bits."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT:
        grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_ORIENTATION, 1))
    except (OSError, ValueError, SyntaxError, TypeError):
        return 1


def _array_to_image(array: np.ndarray) -> Image.Image:
    a = array
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = a.transpose(1, 2, 0)  # CHW -> HWC
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise MediaError(f"image array must be HW, HWC or CHW with 1, 3 or 4 channels, got {describe(array)}")
    if a.size == 0:
        raise MediaError(f"image {describe(array)} has zero size")
    if a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not (np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0):
            raise MediaError(f"float image array must hold values in [0, 1]: {describe(array)}")
        a = np.rint(a * 255.0).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise MediaError(f"unsupported image array dtype {a.dtype}: {describe(array)}")
    return Image.fromarray(np.ascontiguousarray(a))


# ------------------------------------------------------------------ resize and patchify

def resize_image(image: Image.Image, height: int, width: int) -> np.ndarray:
    """PIL bicubic resize of an RGB image; returns uint8 ``(height, width, 3)``."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(image)


@lru_cache(maxsize=8)
def _normalize_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """``table[c, v]`` = normalised float32 value of channel c at uint8 level v.

    Computed with the reference's exact operations (``float64(v) * (1/255)`` cast to float32,
    then ``(x - mean) / std`` in float32), so a table lookup is bit-identical to it.
    """
    levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return ((levels[None, :] - mean32[:, None]) / std32[:, None]).astype(np.float32)  # (C, 256)


def frames_to_patches(frames: np.ndarray, patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE,
                      temporal_patch_size: int = TEMPORAL_PATCH_SIZE, mean=CLIP_MEAN,
                      std=CLIP_STD) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Normalise and patchify uint8 frames ``(F, H, W, C)`` (sides multiples of patch*merge).

    A frame count that is not a multiple of ``temporal_patch_size`` is padded with the last frame.
    Returns float32 ``(t*h*w, C*T*P*P)`` and ``grid_thw = (t, h, w)`` with ``h = H/P``, ``w = W/P``.
    Row ``((g*h/2 + bh)*w/2 + bw)*4 + mh*2 + mw`` holds the patch at patch row ``2*bh+mh``, column
    ``2*bw+mw`` of frames ``2g, 2g+1``; columns run channel, time, y, x (spec 4.4). E.g. a 4x4
    patch grid is listed (0,0) (0,1) (1,0) (1,1) (0,2) (0,3) (1,2) (1,3) (2,0) ...
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4:
        raise ValueError(f"frames must be uint8 (F, H, W, C), got {frames.dtype} {frames.shape}")
    f, height, width, channels = frames.shape
    p, m, tp = patch_size, merge_size, temporal_patch_size
    if height % (p * m) or width % (p * m):
        raise ValueError(f"frame size {height}x{width} is not a multiple of {p * m}")
    single = f == 1  # one image: normalise it once, then copy it into every temporal slot
    if f % tp and not single:
        frames = np.concatenate([frames, np.repeat(frames[-1:], tp - f % tp, axis=0)])
    t_in = 1 if single else tp
    gt, gh, gw = -(-frames.shape[0] // tp), height // p, width // p
    x = frames.reshape(gt, t_in, gh // m, m, p, gw // m, m, p, channels)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)  # (gt, bh, bw, mh, mw, C, T, py, px)
    x = np.ascontiguousarray(x).reshape(gt * gh * gw, channels, t_in, p * p)
    table = _normalize_table(tuple(float(v) for v in mean), tuple(float(v) for v in std))
    normalised = np.empty(x.shape, dtype=np.float32)  # (N, C, t_in, P*P)
    for i in range(0, len(x), _LOOKUP_ROWS):  # chunks keep the lookup's temporaries in cache
        for c in range(channels):
            np.take(table[c], x[i:i + _LOOKUP_ROWS, c], out=normalised[i:i + _LOOKUP_ROWS, c])
    if single and tp > 1:
        out = np.empty((gt * gh * gw, channels, tp, p * p), dtype=np.float32)
        out[:] = normalised  # broadcast over T
        normalised = out
    return torch.from_numpy(normalised.reshape(gt * gh * gw, -1)), (gt, gh, gw)


def image_to_patches(image: Image.Image | np.ndarray, height: int | None = None, width: int | None = None,
                     patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE,
                     temporal_patch_size: int = TEMPORAL_PATCH_SIZE, mean=CLIP_MEAN, std=CLIP_STD,
                     min_pixels: int = MIN_PIXELS,
                     max_pixels: int = MAX_PIXELS) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Resize an RGB image (PIL or uint8 HWC) and patchify it: ``(pixel_values [N, 1176], (1, h, w))``.

    The target size is ``(height, width)`` when given, else ``smart_resize`` of the image size
    with ``min_pixels``/``max_pixels``.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image.mode != "RGB":
        image = to_rgb(image)
    if height is None or width is None:
        height, width = smart_resize(image.height, image.width, patch_size * merge_size, min_pixels, max_pixels)
    pixels = resize_image(image, height, width)
    return frames_to_patches(pixels[None], patch_size, merge_size, temporal_patch_size, mean, std)
