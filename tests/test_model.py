"""Model invariants that need no oracle: positions, patch order, attention grouping, errors, padding."""

import pytest
import torch
import torch.nn.functional as F
from oracle import left_pad, pixels, prompt, tiny_config

from qwen2vl import Qwen2VL, Qwen2VLConfig, rope_index
from qwen2vl.model import vision as vision_module
from qwen2vl.model.rope import vision_rotary_ids
from qwen2vl.model.vision import FrameGroups, grouped_attention


@pytest.fixture(scope="module")
def model():
    return Qwen2VL.from_config(Qwen2VLConfig.from_dict(tiny_config()), seed=0)


def test_spec_position_example(model):
    # spec 9.2: 15 tokens (0-14) then an image of grid (1, 4, 6) -> 2 x 3 merged tokens
    ids = torch.tensor([prompt(14, ("image", 1, 4, 6), 3)])
    pos, delta = rope_index(model.config, ids, image_grid_thw=torch.tensor([[1, 4, 6]]))
    vision = pos[:, 0, 15:21]
    assert vision.tolist() == [[15] * 6, [15, 15, 15, 16, 16, 16], [15, 16, 17, 15, 16, 17]]
    assert pos[:, 0, 21].tolist() == [18, 18, 18]  # vision_end
    assert delta.item() == (18 + 3) + 1 - ids.shape[1]


def test_text_positions_with_left_padding(model):
    ids, mask = left_pad([prompt(3), prompt(5, seed=1)])
    pos, delta = rope_index(model.config, ids, attention_mask=mask)
    assert pos[0, 0].tolist() == [1, 1, 0, 1, 2] and pos[0, 1].tolist() == [0, 1, 2, 3, 4]
    assert delta.tolist() == [-2, 0]


def test_patch_order_matches_spec_example():
    ids = vision_rotary_ids([(1, 4, 4)], merge=2)
    assert [tuple(r) for r in ids.tolist()] == [
        (0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3),
        (2, 0), (2, 1), (3, 0), (3, 1), (2, 2), (2, 3), (3, 2), (3, 3)]
    assert vision_rotary_ids([(3, 2, 2)], merge=2).shape == (12, 2)  # every frame group repeats


def test_grouped_attention_equals_attention_per_group():
    grids = [(1, 4, 6), (2, 4, 4), (1, 2, 2), (1, 4, 4)]
    lengths = [h * w for t, h, w in grids for _ in range(t)]
    n = sum(lengths)
    q, k, v = (torch.randn(n, 3, 8) for _ in range(3))
    got = grouped_attention(q, k, v, FrameGroups.from_grids(grids))
    parts, start = [], 0
    for length in lengths:
        sl = slice(start, start + length)
        o = F.scaled_dot_product_attention(q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1))
        parts.append(o.transpose(0, 1))
        start += length
    torch.testing.assert_close(got, torch.cat(parts), rtol=1e-5, atol=1e-6)


def test_equal_length_groups_use_one_attention_call_without_a_mask(model, monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((tuple(q.shape), kwargs.get("attn_mask")))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(vision_module.F, "scaled_dot_product_attention", spy)
    pv, grid = pixels([(4, 4, 6)])  # a video of 4 frame groups of 24 patches
    with torch.no_grad():
        model.visual(pv, grid)
    depth = model.config.vision.depth
    assert len(calls) == depth
    assert all(shape == (4, 4, 24, 8) and mask is None for shape, mask in calls)


def test_placeholder_count_mismatch_names_both_counts(model):
    ids = torch.tensor([prompt(3, ("image", 1, 4, 4), 2)])
    pv, grid = pixels([(1, 4, 6)])
    with pytest.raises(ValueError, match="4 <|image_pad|> tokens in input_ids, 6 image feature rows"):
        model(ids, pixel_values=pv, image_grid_thw=grid)
    with pytest.raises(ValueError, match="4 <|image_pad|> tokens in input_ids, 0 image feature rows"):
        model(ids)


def test_bad_grid_is_named(model):
    pv, _ = pixels([(1, 4, 4)])
    with pytest.raises(ValueError, match=r"grid_thw\[0\] = \(1, 3, 4\) is invalid"):
        model.visual(pv[:12], torch.tensor([[1, 3, 4]]))
    with pytest.raises(ValueError, match="16 patch rows but grid_thw"):
        model.visual(pv, torch.tensor([[1, 4, 6]]))


def test_batched_left_padded_equals_one_at_a_time(model):
    rows = [prompt(3, ("image", 1, 4, 4), 2, seed=1), prompt(11, seed=2), prompt(2, ("video", 2, 2, 4), 1, seed=3)]
    pv, grid = pixels([(1, 4, 4)])
    pvv, vgrid = pixels([(2, 2, 4)], seed=1)
    ids, mask = left_pad(rows)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid,
                        pixel_values_videos=pvv, video_grid_thw=vgrid)
        singles = [model(torch.tensor([rows[0]]), pixel_values=pv, image_grid_thw=grid),
                   model(torch.tensor([rows[1]])),
                   model(torch.tensor([rows[2]]), pixel_values_videos=pvv, video_grid_thw=vgrid)]
    for i, single in enumerate(singles):
        n = len(rows[i])
        torch.testing.assert_close(batched[i, -n:], single[0], rtol=1e-4, atol=1e-5)


def test_packed_segments_equal_separate_sequences(model):
    a, b = prompt(3, ("image", 1, 4, 4), 2, seed=1), prompt(6, seed=2)
    pv, grid = pixels([(1, 4, 4)])
    pos_a, _ = rope_index(model.config, torch.tensor([a]), image_grid_thw=grid)
    pos_b, _ = rope_index(model.config, torch.tensor([b]))
    packed = torch.tensor([a + b])
    segments = torch.tensor([[1] * len(a) + [2] * len(b)])
    with torch.no_grad():
        out = model(packed, pixel_values=pv, image_grid_thw=grid, position_ids=torch.cat([pos_a, pos_b], dim=2),
                    segment_ids=segments)
        ref_a = model(torch.tensor([a]), pixel_values=pv, image_grid_thw=grid)
        ref_b = model(torch.tensor([b]))
    torch.testing.assert_close(out[0, : len(a)], ref_a[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[0, len(a):], ref_b[0], rtol=1e-4, atol=1e-5)


def test_from_config_is_seeded():
    config = Qwen2VLConfig.from_dict(tiny_config(tied=True))
    a, b = Qwen2VL.from_config(config, seed=7), Qwen2VL.from_config(config, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert a.lm_head.weight is a.model.embed_tokens.weight


def test_fused_projections_give_the_same_logits_and_save_unfused(tmp_path):
    config = Qwen2VLConfig.from_dict(tiny_config())
    model = Qwen2VL.from_config(config, seed=3)
    ids = torch.tensor([prompt(3, ("image", 1, 4, 4), 5)])
    pv, grid = pixels([(1, 4, 4)])
    with torch.no_grad():
        before = model(ids, pixel_values=pv, image_grid_thw=grid)
        model.fuse_projections()
        after = model(ids, pixel_values=pv, image_grid_thw=grid)
    assert not hasattr(model.model.layers[0].self_attn, "q_proj")
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        reloaded = Qwen2VL.from_pretrained(tmp_path)(ids, pixel_values=pv, image_grid_thw=grid)
    torch.testing.assert_close(reloaded, before, rtol=1e-5, atol=1e-6)


def test_segments_attend_like_the_full_row_mask():
    """Run-by-run attention == one masked attention over the row (values and gradients), with left
    and right padding, runs of one token and grouped-query heads."""
    from qwen2vl.model.text import Segments
    ids = torch.tensor([[0, 0, 1, 1, 1, 2, 3, 3, 3, 3, 0], [1, 1, 1, 1, 1, 1, 2, 2, 2, 0, 0]])
    t = ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)) & (ids > 0).unsqueeze(1)
    dense = ((causal & same) | torch.eye(t, dtype=torch.bool)).unsqueeze(1)  # padding attends to itself
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, t, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
    out = Segments.from_ids(ids).attend(q, k, v)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, 8)).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * torch.linspace(-1, 1, 8)).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    assert Segments.from_ids(ids).runs == (((2, 5), (5, 6), (6, 10)), ((0, 6), (6, 9)))
