"""Packing: packed loss and gradients equal the unpacked ones; the packed stream is deterministic."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from oracle import pixels, prompt, tiny_config

from qwen2vl.config import Qwen2VLConfig
from qwen2vl.model.qwen2vl import Qwen2VL
from qwen2vl.train.loss import (
    LossModel,
    answer_lengths,
    answer_weight_sum,
    supervised_loss_sum,
    token_weights,
)
from qwen2vl.train.packing import IGNORE, PackedStream, collate, pack_in_order


def make_sample(parts, answer: int, seed: int):
    """A hand-made encoded sample: prompt parts, then ``answer`` supervised tokens."""
    ids = torch.tensor(prompt(*parts, answer, seed=seed))
    labels = torch.full_like(ids, IGNORE)
    labels[-answer:] = ids[-answer:]
    images = [p[1:] for p in parts if isinstance(p, tuple) and p[0] == "image"]
    videos = [p[1:] for p in parts if isinstance(p, tuple) and p[0] == "video"]
    pv, ig = pixels(images, seed=seed) if images else (None, None)
    pvv, vg = pixels(videos, seed=seed + 100) if videos else (None, None)
    return SimpleNamespace(input_ids=ids, labels=labels, pixel_values=pv, image_grid_thw=ig,
                           pixel_values_videos=pvv, video_grid_thw=vg)


SAMPLES = [
    ([5, ("image", 1, 4, 6), 3], 6),
    ([4], 5),
    ([2, ("video", 2, 4, 4), 2, ("image", 1, 2, 2), 1], 4),
    ([3, ("image", 1, 6, 4)], 7),
]


@pytest.fixture(scope="module")
def model():
    return Qwen2VL.from_config(Qwen2VLConfig.from_dict(tiny_config()), seed=0).train()


def unpacked_loss(model, samples):
    total = 0.0
    for s in samples:
        logits = model(s.input_ids[None], pixel_values=s.pixel_values, image_grid_thw=s.image_grid_thw,
                       pixel_values_videos=s.pixel_values_videos, video_grid_thw=s.video_grid_thw)[0]
        total = total + F.cross_entropy(logits[:-1], s.labels[1:], ignore_index=IGNORE, reduction="sum")
    return total


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", [[[0, 1, 2, 3]], [[0, 2], [1, 3]], [[3], [0, 1, 2]]])
def test_packed_loss_and_grads_equal_unpacked(model, layout):
    samples = [make_sample(parts, answer, seed=i) for i, (parts, answer) in enumerate(SAMPLES)]
    ref_loss = unpacked_loss(model, samples)
    ref = grads_of(model, ref_loss)
    batch = collate([[samples[i] for i in row] for row in layout], model.config)
    assert batch.supervised == sum(answer for _, answer in SAMPLES)
    loss = LossModel(model, chunk_tokens=5)(batch)  # chunks smaller than the supervised count
    got = grads_of(model, loss)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert ref.keys() == got.keys() and len(got) == len(list(model.parameters()))
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("power", [1.0, 0.5])
def test_weighted_packed_loss_equals_per_sample_weighting(model, power):
    """loss_weighting sample/sqrt: each sample's summed answer loss divided by n ** power, whatever
    the packing; the trainer's divisor is the same weights' total."""
    samples = [make_sample(parts, answer, seed=i) for i, (parts, answer) in enumerate(SAMPLES)]
    ref_loss = sum(unpacked_loss(model, [s]) / answer ** power for s, (_, answer) in zip(samples, SAMPLES))
    ref = grads_of(model, ref_loss)
    for layout in ([[0, 1, 2, 3]], [[3], [0, 1, 2]]):
        batch = collate([[samples[i] for i in row] for row in layout], model.config)
        loss = LossModel(model, chunk_tokens=5)(batch, power)
        got = grads_of(model, loss)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-5, msg=name)
    answers = [answer for _, answer in SAMPLES]
    assert answer_weight_sum(answers, power) == pytest.approx(sum(n ** (1 - power) for n in answers))
    assert answer_weight_sum(answers + [0], 1.0) == len(answers)  # a sample with no answer weighs nothing


def test_token_weights_per_segment():
    targets = torch.tensor([[5, IGNORE, 7, 8, 9, IGNORE], [1, 2, IGNORE, IGNORE, IGNORE, IGNORE]])
    segments = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 2, 2, 0, 0]])
    assert token_weights(targets, segments, 0.0) is None
    w = token_weights(targets, segments, 1.0)
    torch.testing.assert_close(w, torch.tensor([[1, 0, 1 / 3, 1 / 3, 1 / 3, 0], [0.5, 0.5, 0, 0, 0, 0]]))
    # the same segment number in two rows is two samples
    assert w[0, :5].sum() == pytest.approx(2.0) and w[1].sum() == pytest.approx(1.0)


def test_each_reply_of_a_multi_turn_sample_is_one_answer():
    """Two replies in one sample weigh as two answers (each its tokens' unit), as the trainer counts them."""
    labels = torch.tensor([IGNORE, IGNORE, 4, 5, 6, IGNORE, IGNORE, 7, IGNORE, 8, 9])  # unshifted, one sample
    assert answer_lengths(labels) == [3, 1, 2]
    targets = torch.cat([labels[1:], torch.tensor([IGNORE])])[None]  # shifted as in a packed row
    w = token_weights(targets, torch.ones_like(targets), 1.0)
    torch.testing.assert_close(w[0, 1:4], torch.full((3,), 1 / 3))
    assert w[0, 6] == 1.0 and w[0, 8:10].tolist() == [0.5, 0.5]
    assert w.sum() == pytest.approx(answer_weight_sum(answer_lengths(labels), 1.0)) == 3
    # the same tokens as three samples get the same weights
    three = token_weights(targets, torch.tensor([[1] * 5 + [2] * 3 + [3] * 3]), 1.0)
    torch.testing.assert_close(three, w)


def test_positions_restart_per_sample(model):
    a, b = make_sample([3], 2, seed=1), make_sample([1, ("image", 1, 4, 4), 1], 2, seed=2)
    batch = collate([[a, b]], model.config)
    assert batch.segment_ids.tolist() == [[1] * 5 + [2] * 10]
    # sample b starts at position 0 again; its 2x2 merged image sits at 2..3 on h and w, then text at 4
    assert batch.position_ids[0, 0, 5:].tolist() == [0, 1, 2, 2, 2, 2, 4, 5, 6, 7]
    assert batch.position_ids[1, 0, 5:].tolist() == [0, 1, 2, 2, 3, 3, 4, 5, 6, 7]
    assert batch.position_ids[2, 0, 5:].tolist() == [0, 1, 2, 3, 2, 3, 4, 5, 6, 7]
    # the last token of a sample never predicts the first token of the next one
    assert batch.targets[0, 4] == IGNORE


def test_lockstep_keeps_text_only_loss_unchanged(model):
    batch = collate([[make_sample([6], 4, seed=3)]], model.config)
    plain = LossModel(model)(batch)
    with_blank = LossModel(model, lockstep=True)(batch)
    assert torch.equal(plain, with_blank)
    model.zero_grad(set_to_none=True)
    with_blank.backward()
    assert model.visual.blocks[0].attn.qkv.weight.grad is not None  # took part in the backward


def test_loss_without_supervised_tokens_is_zero_and_differentiable():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    loss = supervised_loss_sum(hidden, torch.full((1, 4), IGNORE), torch.nn.Linear(8, 10), chunk=2)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad is not None


def test_pack_in_order_and_stream():
    assert pack_in_order([5, 3, 4, 2, 8], [0, 1, 2, 3, 4], 8) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="sample 1 has 9 tokens"):
        pack_in_order([1, 9], [0, 1], 8)
    stream = PackedStream([3, 4, 2, 5, 1, 6], seq_len=7, seed=1)
    first = [row for _, row in stream.rows(0, 12)]
    again = PackedStream([3, 4, 2, 5, 1, 6], seq_len=7, seed=1)
    assert [row for _, row in again.rows(5, 7)] == first[5:12]
    epochs = [e for e, _ in stream.rows(0, 12)]
    assert epochs == sorted(epochs) and epochs[-1] >= 2
    per_epoch = len(stream.epoch(0))
    assert sorted(i for row in first[:per_epoch] for i in row) == list(range(6))
