"""Grounding utilities: parsing, exact coordinate conversions and round trips, IoU, drawing."""

import random

import numpy as np
import pytest
from PIL import Image

from qwen2vl.agent.grounding import (
    PALETTE,
    Region,
    denormalize,
    denormalize_coords,
    draw_regions,
    format_box,
    iou,
    normalize,
    normalize_coords,
    parse_regions,
    rescale,
)

REF, REF_END = "<|object_ref_start|>", "<|object_ref_end|>"
BOX, BOX_END = "<|box_start|>", "<|box_end|>"
QUAD, QUAD_END = "<|quad_start|>", "<|quad_end|>"


# --------------------------------------------------------------------------------------------- parsing

def test_parse_label_and_box_with_spaces():
    text = f"Here: {REF}  red   circle {REF_END} {BOX}( 12 ,34 ) ,  (56, 78 ){BOX_END}."
    assert parse_regions(text) == [Region("red circle", box=(12, 34, 56, 78))]


def test_parse_several_boxes_share_the_latest_reference():
    text = (f"{REF}cars{REF_END}{BOX}(1,2),(3,4){BOX_END}{BOX}(5,6),(7,8){BOX_END}\n"
            f"{BOX}(9,9),(10,10){BOX_END} and {REF}dog{REF_END}{BOX}(100,200),(300,400){BOX_END}")
    assert [(r.label, r.box) for r in parse_regions(text)] == [
        ("cars", (1, 2, 3, 4)), ("cars", (5, 6, 7, 8)), ("cars", (9, 9, 10, 10)), ("dog", (100, 200, 300, 400))]


def test_parse_box_before_any_reference_is_unlabelled_and_quads():
    text = f"{BOX}(0,0),(999,999){BOX_END}{REF}sign{REF_END}{QUAD}(10,10),(90,12),(88,50),(12,48){QUAD_END}"
    box, quad = parse_regions(text)
    assert box == Region(None, box=(0, 0, 999, 999))
    assert quad.label == "sign" and quad.quad == (10, 10, 90, 12, 88, 50, 12, 48) and quad.box is None
    assert quad.bounds == (10, 10, 90, 50)


@pytest.mark.parametrize("body", ["(1,2)", "(1,2),(3,4),(5,6)", "(1,2),(x,4)", "(1,2) to (3,4)", ""])
def test_parse_skips_malformed_boxes(body):
    assert parse_regions(f"{REF}a{REF_END}{BOX}{body}{BOX_END}") == []


def test_parse_bare_boxes_when_special_tokens_were_skipped():
    assert parse_regions("red circle(12,34),(56,78)") == [Region(None, box=(12, 34, 56, 78))]
    assert parse_regions("(1, 2) , (3, 4) and (5,6),(7,8)") == [Region(None, box=(1, 2, 3, 4)),
                                                                 Region(None, box=(5, 6, 7, 8))]
    assert parse_regions("no boxes here, 3 of them") == []


def test_format_box_round_trips_through_parse():
    text = format_box((5, 6, 700, 800), "blue star")
    assert text == f"{REF}blue star{REF_END}{BOX}(5,6),(700,800){BOX_END}"
    assert parse_regions(text) == [Region("blue star", box=(5, 6, 700, 800))]
    assert parse_regions(format_box((1, 2, 3, 4))) == [Region(None, box=(1, 2, 3, 4))]


# ----------------------------------------------------------------------------------- coordinate spaces

def test_normalize_is_integer_floor_for_pixel_coordinates():
    rng = random.Random(0)
    for _ in range(5000):
        extent = rng.randint(1, 5000)
        x = rng.randint(0, extent)
        assert normalize(x, extent) == min(x * 1000 // extent, 999)
    assert normalize(0, 640) == 0 and normalize(640, 640) == 999 and normalize(-3, 640) == 0
    assert normalize(100, 640) == 156  # the worked example: floor(156.25)
    assert normalize(3, 10) == 300 and normalize(2.9999, 10) == 299


def test_denormalize_is_the_bin_centre_and_inverts_normalize():
    assert denormalize(156, 640) == pytest.approx(100.16)
    assert denormalize(0, 1000) == 0.5 and denormalize(999, 1000) == 999.5
    for extent in (1, 7, 28, 100, 333, 640, 1000, 1001, 1200, 4096):
        assert all(normalize(denormalize(n, extent), extent) == n for n in range(1000))
    with pytest.raises(ValueError, match="outside"):
        denormalize(1000, 640)
    with pytest.raises(ValueError, match="positive"):
        normalize(1, 0)


def test_pixel_round_trip_is_within_half_a_bin():
    rng = random.Random(1)
    for _ in range(3000):
        extent = rng.randint(1, 3000)
        x = rng.uniform(0, extent)
        assert abs(denormalize(normalize(x, extent), extent) - x) <= extent / 2000 + 1e-9


def test_original_and_resized_pixels_normalise_identically():
    rng = random.Random(2)
    for _ in range(3000):
        w, h = rng.randint(10, 3000), rng.randint(10, 3000)
        wr, hr = rng.randint(1, 120) * 28, rng.randint(1, 120) * 28
        x1, y1 = rng.randint(0, w), rng.randint(0, h)
        box = [x1, y1, rng.randint(x1, w), rng.randint(y1, h)]
        resized = rescale(box, (w, h), (wr, hr))
        assert normalize_coords(resized, (wr, hr)) == normalize_coords(box, (w, h))
        back = rescale(resized, (wr, hr), (w, h))
        assert back == pytest.approx(box, abs=1e-9)
    # exact formula: xr = x * Wr / W
    assert rescale((100, 50, 640, 480), (640, 480), (644, 476)) == (100.625, 49.583333333333336, 644.0, 476.0)


def test_normalised_box_to_original_and_resized_pixels():
    box = (156, 250, 500, 999)
    assert denormalize_coords(box, (640, 480)) == (100.16, 120.24, 320.32, 479.76)
    resized = denormalize_coords(box, (644, 476))
    assert resized == pytest.approx(rescale(denormalize_coords(box, (640, 480)), (640, 480), (644, 476)))


# ------------------------------------------------------------------------------------------------ IoU

def test_iou_values():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert iou((0, 0, 10, 10), (2, 2, 4, 4)) == pytest.approx(4 / 100)
    assert iou((10, 10, 0, 0), (0, 0, 10, 10)) == 1.0  # corner order does not matter
    assert iou((5, 5, 5, 5), (5, 5, 5, 5)) == 1.0 and iou((5, 5, 5, 5), (0, 0, 10, 10)) == 0.0
    assert iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)


# -------------------------------------------------------------------------------------------- drawing

def test_draw_regions_outlines_and_labels_with_distinct_colours():
    image = Image.new("RGB", (400, 300), (255, 255, 255))
    regions = [Region("cat", box=(100, 100, 400, 500)), Region("dog", box=(500, 500, 900, 900)),
               Region("cat", box=(600, 100, 800, 300)), Region(None, quad=(50, 700, 300, 650, 350, 950, 60, 990))]
    out = draw_regions(image, regions)
    assert out is not image and out.size == image.size and image.getpixel((0, 0)) == (255, 255, 255)
    px = np.asarray(out)
    x1, y1, x2, y2 = (round(v) for v in denormalize_coords((100, 100, 400, 500), (400, 300)))
    assert tuple(px[(y1 + y2) // 2, x1]) == PALETTE[0]  # left edge of the first box
    x1, y1, x2, y2 = (round(v) for v in denormalize_coords((500, 500, 900, 900), (400, 300)))
    assert tuple(px[(y1 + y2) // 2, x2]) == PALETTE[1]
    x1, _, x2, y2 = (round(v) for v in denormalize_coords((600, 100, 800, 300), (400, 300)))
    assert tuple(px[y2, (x1 + x2) // 2]) == PALETTE[0]  # same label, same colour
    assert (np.all(px == PALETTE[2], axis=-1)).any()  # the unlabelled quad gets the next colour
    # the "cat" tag sits above the first box and has text in a contrasting colour inside it
    tag = px[max(0, 30 - 20):30, 40:80]
    assert (np.all(tag == PALETTE[0], axis=-1)).any() and (np.all(tag == (255, 255, 255), axis=-1)).any()


def test_draw_regions_in_pixel_space():
    image = Image.new("RGB", (50, 40), (0, 0, 0))
    out = draw_regions(image, [Region(None, box=(10, 10, 30, 20))], normalized=False)
    assert tuple(np.asarray(out)[15, 10]) == PALETTE[0] and tuple(np.asarray(out)[15, 20]) == (0, 0, 0)
