"""Chat template: text equal to transformers' apply_chat_template with the Qwen2-VL template; loss spans."""

import pytest
from processing_helpers import model_dir  # noqa: F401  (fixture)

from qwen2vl.processing import MediaError, apply_chat_template, render_chat

IMG = {"type": "image", "image": "cat.png"}
CONVERSATIONS = {
    "text only": [{"role": "user", "content": "Hello there."}],
    "text parts": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "you"}]}],
    "image": [{"role": "user", "content": [IMG, {"type": "text", "text": "Describe this image."}]}],
    "openai image_url": [{"role": "user", "content": [
        {"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "image_url", "image_url": {"url": "b.png"}}]}],
    "video": [{"role": "user", "content": [{"type": "video", "video": "clip.mp4", "fps": 1.0},
                                           {"type": "text", "text": "What happens?"}]}],
    "multi-turn with system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [IMG, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "video", "video": ["f1.png", "f2.png"]}, IMG,
                                     {"type": "text", "text": "And these?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A video and a cat."}]},
    ],
    "assistant first": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Yo"}],
}


@pytest.fixture(scope="module")
def hf_tok(model_dir):  # noqa: F811
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_vision_id", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_template_matches_transformers(hf_tok, name, add_vision_id, add_generation_prompt):
    conversation = CONVERSATIONS[name]
    expected = hf_tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
                                          add_vision_id=add_vision_id)
    assert apply_chat_template(conversation, add_generation_prompt, add_vision_id) == expected


def test_vision_ids_count_per_kind():
    text = apply_chat_template(CONVERSATIONS["multi-turn with system"], add_vision_id=True)
    assert "Picture 1: " in text and "Video 1: " in text and "Picture 2: " in text and "Picture 3" not in text


def test_media_parts_in_order_with_positions():
    rendered = render_chat(CONVERSATIONS["multi-turn with system"])
    assert [(m.kind, m.message_index, m.part_index, m.number) for m in rendered.media] == [
        ("image", 1, 0, 1), ("video", 3, 0, 1), ("image", 3, 1, 2)]
    assert rendered.media[1].source == ["f1.png", "f2.png"]
    assert rendered.media[0].where == "image 1 (message 1, part 0)"
    url = render_chat([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "v.mp4"}},
                                                    {"type": "image_url", "image_url": "plain.png"}]}])
    assert [(m.kind, m.source) for m in url.media] == [("video", "v.mp4"), ("image", "plain.png")]


def test_train_spans_cover_assistant_content_and_im_end():
    rendered = render_chat(CONVERSATIONS["multi-turn with system"], add_generation_prompt=False)
    covered = [rendered.text[lo:hi] for lo, hi in rendered.train_spans]
    assert covered == ["A cat.<|im_end|>", "A video and a cat.<|im_end|>"]


@pytest.mark.parametrize("content,where", [
    ("look <|image_pad|>", "message 0"),
    ([{"type": "text", "text": "ok"}, {"type": "text", "text": "<|vision_start|>"}], "message 0, part 1"),
])
def test_placeholder_text_is_refused(content, where):
    with pytest.raises(MediaError, match=where + r".*placeholders would not match"):
        render_chat([{"role": "user", "content": content}])


def test_bad_parts_are_named():
    with pytest.raises(ValueError, match=r"message 0, part 1: unsupported content part \(type 'audio'\)"):
        render_chat([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "audio", "audio": "x"}]}])
    with pytest.raises(MediaError, match=r"message 1, part 0: image part has no source"):
        render_chat([{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "image"}]}])
    with pytest.raises(ValueError, match="message 0 must be a dict"):
        render_chat([{"content": "no role"}])


def test_tool_conversation_encodes_with_labels_on_calls_and_replies(model_dir):  # noqa: F811
    """Through the processor: the tool result's image is encoded, labels cover the call and the reply only."""
    from PIL import Image

    from qwen2vl.processing import Processor

    processor = Processor.from_pretrained(model_dir)
    conversation = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1",
         "content": [{"type": "image", "image": Image.new("RGB", (56, 56), "blue")}, {"type": "text", "text": "rain"}]},
        {"role": "assistant", "content": "Rain."},
    ]
    sample = processor.encode(conversation, add_generation_prompt=False, return_labels=True)
    assert sample.image_grid_thw.tolist() == [[1, 4, 4]]
    trained = sample.labels[sample.labels != -100].tolist()
    assert processor.tokenizer.decode(trained) == (
        '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>Rain.<|im_end|>')
