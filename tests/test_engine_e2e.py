"""The engine end to end: conversations through the processor, against transformers generate; chat; streaming."""

import pytest
import torch
from engine_helpers import build_checkpoint, write_image, write_video

from qwen2vl.generation.chat import ChatSession
from qwen2vl.generation.engine import Engine


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    build_checkpoint(root / "model")
    write_image(root / "a.png", (90, 70), seed=1)
    write_image(root / "b.jpg", (60, 120), seed=2)
    write_video(root / "clip.mp4")
    return root


@pytest.fixture(scope="module")
def engine(checkpoint):
    return Engine.from_pretrained(checkpoint / "model")


def user(*parts):
    content = []
    for p in parts:
        if p.endswith((".png", ".jpg")):
            content.append({"type": "image", "image": p})
        elif p.endswith(".mp4"):
            content.append({"type": "video", "video": p, "nframes": 4})
        else:
            content.append({"type": "text", "text": p})
    return [{"role": "user", "content": content}]


@pytest.mark.hf
def test_conversations_match_transformers_generate(checkpoint, engine):
    from transformers import Qwen2VLForConditionalGeneration

    hf = Qwen2VLForConditionalGeneration.from_pretrained(checkpoint / "model", attn_implementation="sdpa").eval()
    a, b, clip = (str(checkpoint / n) for n in ("a.png", "b.jpg", "clip.mp4"))
    conversations = [user(a, "What is this?"), user(a, b, "Compare them."), user(clip, "What happens?"),
                     user(b, clip, "Describe both."), user("Tell me a story.")]
    eos = engine.sampling_params().stop_token_ids
    for batch_rows in ([c] for c in conversations):
        results = engine.generate(batch_rows, max_new_tokens=32)
        batch = engine.prepare(batch_rows, 32)
        with torch.no_grad():
            out = hf.generate(**batch, max_new_tokens=32, do_sample=False, eos_token_id=eos,
                              pad_token_id=engine.tokenizer.pad_id)
        expected = out[0, batch["input_ids"].shape[1]:].tolist()
        cut = next((i for i, t in enumerate(expected) if t in eos), None)
        expected = expected if cut is None else expected[: cut + 1]
        assert results[0].token_ids == expected
    # a batch of three mixed conversations, left padded
    mixed = [conversations[0], conversations[4], conversations[3]]
    results = engine.generate(mixed, max_new_tokens=32)
    batch = engine.prepare(mixed, 32)
    with torch.no_grad():
        out = hf.generate(**batch, max_new_tokens=32, do_sample=False, eos_token_id=eos,
                          pad_token_id=engine.tokenizer.pad_id)
    for row, result in enumerate(results):
        expected = out[row, batch["input_ids"].shape[1]:].tolist()
        cut = next((i for i, t in enumerate(expected) if t in eos), None)
        assert result.token_ids == (expected if cut is None else expected[: cut + 1])


def test_stream_equals_generate_and_never_splits_characters(checkpoint, engine):
    conversation = user(str(checkpoint / "a.png"), "Describe it.")
    for seed in (1, 2):
        params = dict(max_new_tokens=40, temperature=1.5, top_k=0, seed=seed)
        deltas = list(engine.stream(conversation, **params))
        final = engine.generate([conversation], **params)[0]
        assert "".join(deltas) == final.text
        # the streamed pieces decode exactly like the whole token sequence (no character was split)
        shown = [t for t in final.token_ids if t not in engine.control_ids]
        assert final.text == engine.tokenizer.decode(shown)


def test_stop_strings_cut_the_text(checkpoint, engine):
    conversation = user("Say something.")
    free = engine.generate([conversation], max_new_tokens=30, temperature=1.0, seed=3)[0]
    word = free.text[5:8]
    assert word
    stopped = engine.generate([conversation], max_new_tokens=30, temperature=1.0, seed=3, stop=[word])[0]
    assert stopped.text == free.text[: free.text.index(word)] and stopped.finish_reason == "stop"
    streamed = "".join(engine.stream(conversation, max_new_tokens=30, temperature=1.0, seed=3, stop=[word]))
    assert streamed == stopped.text


def test_chat_reuses_prefix_and_vision_and_matches_a_fresh_run(checkpoint, engine):
    image = str(checkpoint / "a.png")
    chat = ChatSession(engine, max_new_tokens=12)
    first = chat.ask([{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}])
    hits = engine.vision_cache.hits
    second = chat.ask("And then?")
    assert second.timings["reused_prefix_tokens"] > first.prompt_tokens // 2
    assert engine.vision_cache.hits > hits  # the image was not encoded again
    fresh = Engine(engine.model, engine.processor, engine.generation_config, vision_cache_items=0)
    expected = fresh.generate([chat.messages[:-1]], max_new_tokens=12)[0]
    assert second.token_ids == expected.token_ids


def test_prompt_over_the_context_is_refused_before_model_work(checkpoint, engine):
    small = Engine(engine.model, engine.processor, engine.generation_config, max_context=64)
    with pytest.raises(ValueError, match="budget"):
        small.generate([user(str(checkpoint / "a.png"), "x " * 80)], max_new_tokens=8)
