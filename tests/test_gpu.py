"""The CUDA fast path against the eager path (runs only where CUDA is available)."""

import pytest
import torch
from oracle import left_pad, pixels, prompt, tiny_config

from qwen2vl import Qwen2VL, Qwen2VLConfig
from qwen2vl.generation.engine import Engine
from qwen2vl.generation.sampling import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def model():
    config = Qwen2VLConfig.from_dict(tiny_config())
    return Qwen2VL.from_config(config, dtype=torch.bfloat16, device="cuda", seed=0)


def batch():
    rows = [prompt(4, ("image", 1, 4, 6), 3, seed=1), prompt(12, seed=2)]
    ids, mask = left_pad(rows)
    pv, grid = pixels([(1, 4, 6)])
    return {"input_ids": ids.cuda(), "attention_mask": mask.cuda(), "pixel_values": pv.cuda(),
            "image_grid_thw": grid.cuda()}


@pytest.mark.parametrize("compile", [False, True])
def test_graphed_decode_matches_eager(model, compile):
    params = [SamplingParams(max_new_tokens=12)] * 2
    eager = Engine(model, static=False).generate_batch(batch(), params)
    fast = Engine(model, static=True, compile=compile).generate_batch(batch(), params)
    assert [r.token_ids for r in fast] == [r.token_ids for r in eager]


def test_bf16_vision_and_logits_are_finite_and_close_to_float32(model):
    b = batch()
    with torch.no_grad():
        low = model(**b).float()
        high = model.float()(**b)
        model.to(torch.bfloat16)
    mask = b["attention_mask"].bool()
    assert torch.isfinite(low).all()
    assert (low[mask] - high[mask]).abs().max() <= 2e-2 * high[mask].abs().max()
