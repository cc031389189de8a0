"""The engine on model inputs: greedy parity with transformers generate, cache invariants, sampling."""

import pytest
import torch
from oracle import hf_model, left_pad, pixels, prompt, tiny_config

from qwen2vl import Qwen2VL
from qwen2vl.generation.engine import Engine
from qwen2vl.generation.sampling import SamplingParams
from qwen2vl.generation.step import DecodeStep

EOS = 1


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = hf_model(tiny_config(), seed=1)
    path = tmp_path_factory.mktemp("ckpt")
    hf.save_pretrained(path)
    return hf, Engine(Qwen2VL.from_pretrained(path))


def make_batch(rows, images=(), videos=()):
    ids, mask = left_pad(rows)
    batch = {"input_ids": ids, "attention_mask": mask}
    if images:
        batch["pixel_values"], batch["image_grid_thw"] = pixels(list(images), seed=5)
    if videos:
        batch["pixel_values_videos"], batch["video_grid_thw"] = pixels(list(videos), seed=6)
    return batch


CASES = {
    "one image": ([prompt(5, ("image", 1, 4, 6), 5)], [(1, 4, 6)], []),
    "several images": ([prompt(2, ("image", 1, 4, 4), 1, ("image", 1, 2, 6), 3)], [(1, 4, 4), (1, 2, 6)], []),
    "video": ([prompt(3, ("video", 3, 4, 4), 4)], [], [(3, 4, 4)]),
    "image + video": ([prompt(2, ("image", 1, 6, 4), ("video", 2, 4, 6), 3)], [(1, 6, 4)], [(2, 4, 6)]),
    "text only": ([prompt(9)], [], []),
    "batch of three": ([prompt(5, ("image", 1, 4, 6), 5, seed=1), prompt(12, seed=2),
                        prompt(2, ("image", 1, 4, 4), 3, ("video", 2, 4, 4), 2, seed=3)],
                       [(1, 4, 6), (1, 4, 4)], [(2, 4, 4)]),
}


@pytest.mark.hf
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_ids_equal_transformers_generate(pair, case):
    hf, engine = pair
    rows, images, videos = CASES[case]
    batch = make_batch(rows, images, videos)
    results = engine.generate_batch(batch, [SamplingParams(max_new_tokens=32, stop_token_ids=[EOS])] * len(rows))
    with torch.no_grad():
        out = hf.generate(**batch, max_new_tokens=32, do_sample=False, eos_token_id=EOS, pad_token_id=0)
    for row, result in enumerate(results):
        expected = out[row, batch["input_ids"].shape[1]:].tolist()
        if EOS in expected:
            expected = expected[: expected.index(EOS) + 1]
        assert result.token_ids == expected
        assert len(set(expected)) > 8  # the random model does not collapse to one token
        assert result.finish_reason == ("stop" if expected[-1] == EOS else "length")


@pytest.mark.parametrize("chunk", [4, 512])
def test_cached_decode_equals_full_forward(pair, chunk):
    """Chunked prefill into rows of the fixed-slot cache, then decode steps == one full forward."""
    _, engine = pair
    model = engine.model
    rows = [prompt(3, ("image", 1, 4, 6), 2, seed=7), prompt(10, seed=8)]
    batch = make_batch(rows, [(1, 4, 6)])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    steps = 6
    fed = torch.randint(2, 240, (2, steps))
    with torch.inference_mode():
        prompts = engine.prompts([batch])
        step = DecodeStep(model, rows=3, capacity=64, fixed=False)  # row 1 stays idle: rows are independent
        first = []
        for row, p in zip((0, 2), prompts):
            for start in range(0, len(p), chunk):
                end = min(start + chunk, len(p))
                logits = step.prefill(row, p.embeds[start:end], p.positions[:, start:end], start)
            first.append(logits)
            step.start_row(row, fed[len(first) - 1, :1], slot=len(p), position=len(p) + p.delta)
        step_logits = [torch.stack(first)]
        for k in range(steps):
            logits = step.decode(3, span=max(len(p) for p in prompts) + k + 1)[[0, 2]]
            step_logits.append(logits)
            nxt = fed[:, k + 1] if k + 1 < steps else fed[:, k]
            step.advance(torch.stack([nxt[0], torch.tensor(0), nxt[1]]), 3)
        full = model(torch.cat([ids, fed], 1), attention_mask=torch.cat([mask, torch.ones_like(fed)], 1),
                     pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    for k, got in enumerate(step_logits):
        expected = full[:, ids.shape[1] - 1 + k]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_batched_equals_one_at_a_time(pair):
    _, engine = pair
    rows, images, videos = CASES["batch of three"]
    params = SamplingParams(max_new_tokens=16, stop_token_ids=[EOS])
    batched = engine.generate_batch(make_batch(rows, images, videos), [params] * 3)
    singles = [engine.generate_batch(make_batch([rows[0]], images[:1]), [params]),
               engine.generate_batch(make_batch([rows[1]]), [params]),
               engine.generate_batch(make_batch([rows[2]], images[1:], videos), [params])]
    pv_all = make_batch(rows, images, videos)["pixel_values"]
    # the singles used fresh pixels; regenerate row 0 and 2 media exactly as in the batch
    rows0 = make_batch([rows[0]])
    rows0["pixel_values"], rows0["image_grid_thw"] = pv_all[:24], torch.tensor([[1, 4, 6]])
    row2 = make_batch([rows[2]], [], videos)
    row2["pixel_values"], row2["image_grid_thw"] = pv_all[24:], torch.tensor([[1, 4, 4]])
    singles[0] = engine.generate_batch(rows0, [params])
    singles[2] = engine.generate_batch(row2, [params])
    for b, s in zip(batched, singles):
        assert b.token_ids == s[0].token_ids


def test_seeded_sampling_repeats_and_differs_by_seed(pair):
    _, engine = pair
    batch = make_batch([prompt(8, seed=3)])

    def run(seed):
        p = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=seed)
        return engine.generate_batch(batch, [p])[0].token_ids

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_repetition_penalty_and_stop_ids(pair):
    _, engine = pair
    batch = make_batch([prompt(8, seed=4)])
    plain = engine.generate_batch(batch, [SamplingParams(max_new_tokens=24)])[0].token_ids
    penalised = engine.generate_batch(batch, [SamplingParams(max_new_tokens=24, repetition_penalty=5.0)])[0].token_ids
    assert len(set(penalised)) >= len(set(plain)) and penalised != plain
    stop_at = plain[5]
    stopped = engine.generate_batch(batch, [SamplingParams(max_new_tokens=24, stop_token_ids=[stop_at])])[0]
    assert stopped.token_ids == plain[: plain.index(stop_at) + 1] and stopped.finish_reason == "stop"


def test_vision_features_are_cached_by_content(pair):
    _, engine = pair
    engine.vision_cache.entries.clear()
    batch = make_batch([prompt(2, ("image", 1, 4, 6), 2)], [(1, 4, 6)])
    params = [SamplingParams(max_new_tokens=4)]
    first = engine.generate_batch(batch, params)[0].token_ids
    misses = engine.vision_cache.misses
    again = engine.generate_batch(batch, params)[0].token_ids
    assert again == first and engine.vision_cache.misses == misses and engine.vision_cache.hits >= 1


def test_invalid_sampling_values_are_refused():
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"max_new_tokens": 0}, {"min_p": 1.5},
                {"repetition_penalty": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad).validate()


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_static_path_equals_eager_path(pair, compile):
    """Fixed shapes (the CUDA-graph path, run directly on CPU) give the eager tokens, greedy and sampled."""
    _, eager = pair
    static = Engine(eager.model, static=True, compile=compile)
    rows, images, videos = CASES["batch of three"]
    batch = make_batch(rows, images, videos)
    sampled = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.8, top_k=40, seed=4)
    for params in (SamplingParams(max_new_tokens=20, stop_token_ids=[EOS]),
                   SamplingParams(max_new_tokens=9, stop_token_ids=[EOS]), sampled):
        expected = eager.generate_batch(batch, [params] * 3)
        got = static.generate_batch(batch, [params] * 3)
        assert [r.token_ids for r in got] == [r.token_ids for r in expected]
        assert [r.finish_reason for r in got] == [r.finish_reason for r in expected]
