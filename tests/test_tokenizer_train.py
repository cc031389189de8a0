"""The nano tokenizer: Qwen2 pipeline, special-token order and ids, transformers 4.57.1 loading, chat template."""

import json

import pytest
import regex
from tokenizers import Regex, Tokenizer, pre_tokenizers

from qwen2vl.data.tokenizer_train import (
    CHAT_TEMPLATE,
    SCAFFOLD,
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    config_token_ids,
    synthetic_texts,
    train_tokenizer,
)

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
TEXTS = [
    "How many red circles are there?",
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Read the sign.<|im_end|>\n",
    "<|object_ref_start|>red circle<|object_ref_end|><|box_start|>(123,456),(789,12)<|box_end|>",
    "I'll say it's 3.50 dollars, isn't it?\n\n  Two   spaces\tand tabs\r\nnew line",
    "Zürich café naïve 😀 日本語 Ω≈ç√",
    "e\u0301 composed by NFC",  # e + combining acute -> é
    "<|endoftext|><|im_end|>",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("nano_tok")
    corpus = synthetic_texts(120, seed=0) + SCAFFOLD * 50
    train_tokenizer(out, corpus, vocab_size=700, model_max_length=4096)
    return out


def test_special_tokens_follow_the_learned_vocab_in_order(tok_dir):
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    n = tok.get_vocab_size(with_added_tokens=True)
    learned = n - len(SPECIAL_TOKENS)
    assert 257 <= learned <= 700 - len(SPECIAL_TOKENS)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(learned, n))
    ids = config_token_ids(tok_dir)
    assert ids["num_tokens"] == n and ids["vocab_size"] % 64 == 0 and ids["vocab_size"] >= n
    assert (ids["image_token_id"], ids["video_token_id"]) == (learned + 12, learned + 13)
    assert (ids["vision_start_token_id"], ids["vision_end_token_id"], ids["vision_token_id"]) == (
        learned + 9, learned + 10, learned + 11)
    assert ids["eos_token_id"] == learned + 2 and ids["pad_token_id"] == ids["bos_token_id"] == learned
    gen = json.loads((tok_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [learned + 2, learned] and gen["pad_token_id"] == learned


def test_qwen2_pipeline_and_round_trip(tok_dir):
    data = json.loads((tok_dir / "tokenizer.json").read_text())
    assert data["normalizer"]["type"] == "NFC"
    split, byte_level = data["pre_tokenizer"]["pretokenizers"]
    assert split["type"] == "Split" and split["behavior"] == "Isolated" and split["pattern"]["Regex"] == SPLIT_PATTERN
    assert byte_level == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    assert data["decoder"]["type"] == "ByteLevel" and data["model"]["type"] == "BPE"
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=False) == regex.sub(r"e\u0301", "é", text)
    enc = tok.encode(TEXTS[2])
    assert enc.tokens[0] == "<|object_ref_start|>" and "<|box_end|>" == enc.tokens[-1]
    assert [t for t in enc.tokens if t.isdigit()] == list("12345678912")  # digits one by one


def test_split_regex_matches_the_spec_pattern():
    split = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    for text in TEXTS[:5]:
        pieces = [p for p, _ in split.pre_tokenize_str(text)]
        assert pieces == regex.findall(SPLIT_PATTERN, text)


def test_scaffolding_is_whole_tokens(tok_dir):
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    assert tok.encode(SYSTEM).tokens == ["<|im_start|>", "system", "Ċ", "You", "Ġare", "Ġa", "Ġhelpful",
                                         "Ġassistant", ".", "<|im_end|>", "Ċ"]
    for word in ("user", "assistant"):
        assert tok.encode(word).tokens == [word]


@pytest.mark.hf
def test_transformers_loads_it_and_tokenizes_the_same(tok_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    ours = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>" and hf.bos_token is None
    assert hf.padding_side == "left" and hf.model_max_length == 4096 and len(hf) == ours.get_vocab_size()
    for text in TEXTS:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ids == ours.encode(text).ids
        assert hf.decode(ids) == ours.decode(ids, skip_special_tokens=False)
    assert set(hf.all_special_tokens) == set(SPECIAL_TOKENS)
    batch = hf(["a", "much longer text here"], padding=True)["input_ids"]
    assert batch[0][0] == hf.pad_token_id  # left padding


@pytest.mark.hf
def test_chat_template_renders_the_spec(tok_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    assert hf.chat_template == CHAT_TEMPLATE
    assert json.loads((tok_dir / "chat_template.json").read_text())["chat_template"] == CHAT_TEMPLATE

    def render(messages, **kw):
        return hf.apply_chat_template(messages, tokenize=False, **kw)

    assert render([{"role": "user", "content": "Hi"}], add_generation_prompt=True) == (
        SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    image_and_text = [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                   {"type": "text", "text": "Count."}]},
                      {"role": "assistant", "content": "3"}]
    assert render(image_and_text) == (SYSTEM + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Count."
                                      "<|im_end|>\n<|im_start|>assistant\n3<|im_end|>\n")
    mixed = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"image_url": {"url": "x"}},
                                          {"type": "video", "video": ["f0.png", "f1.png"]}, {"image": "b.png"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Same."}]},
             {"role": "user", "content": "Why?"}]
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCompare {p1}<|vision_start|><|image_pad|>"
                "<|vision_end|>{v1}<|vision_start|><|video_pad|><|vision_end|>{p2}<|vision_start|><|image_pad|>"
                "<|vision_end|><|im_end|>\n<|im_start|>assistant\nSame.<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert render(mixed, add_generation_prompt=True) == expected.format(p1="", v1="", p2="")
    assert render(mixed, add_generation_prompt=True, add_vision_id=True) == expected.format(
        p1="Picture 1: ", v1="Video 1: ", p2="Picture 2: ")
    ids = hf.apply_chat_template(image_and_text, tokenize=True)
    if isinstance(ids, dict):
        ids = ids["input_ids"]
    assert ids[:3] == [hf.convert_tokens_to_ids("<|im_start|>"), hf.convert_tokens_to_ids("system"),
                       hf.convert_tokens_to_ids("Ċ")]


def test_too_small_vocab_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no room for merges"):
        train_tokenizer(tmp_path, ["abc"], vocab_size=200)
