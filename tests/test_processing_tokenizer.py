"""Tokenizer: ids and text equal to transformers' Qwen2 tokenizer; special ids; UTF-8-safe streaming."""

import json
import os
import random

import pytest
from processing_helpers import CORPUS, SPECIALS, model_dir  # noqa: F401  (fixture)

from qwen2vl.processing import IncrementalDecoder, Tokenizer

TEXTS = CORPUS + [
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "a<|image_pad|><|image_pad|>b<|video_pad|>",
    "  leading spaces\n\n\ntrailing  ", "🐱" * 5 + "猫" * 3, "mixed<|im_end|>中文<|endoftext|>emoji🎉", "",
    "e\u0301 composed by NFC", "<|im_start|", "tab\tnew\r\nline",
]


@pytest.fixture(scope="module")
def tok(model_dir):  # noqa: F811
    return Tokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf_tok(model_dir):  # noqa: F811
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_ids_and_text_match_transformers(tok, hf_tok):
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tok(text)["input_ids"], text
        assert tok.decode(ids) == hf_tok.decode(ids), text
        assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True), text
    assert tok.vocab_size == len(hf_tok)


def test_special_ids(tok, model_dir):  # noqa: F811
    for name, token in [("endoftext_id", "<|endoftext|>"), ("im_start_id", "<|im_start|>"),
                        ("im_end_id", "<|im_end|>"), ("image_pad_id", "<|image_pad|>"),
                        ("video_pad_id", "<|video_pad|>"), ("vision_start_id", "<|vision_start|>"),
                        ("vision_end_id", "<|vision_end|>")]:
        assert getattr(tok, name) == tok.token_to_id(token) is not None
        assert tok.encode(token) == [getattr(tok, name)]
    assert tok.eos_id == tok.im_end_id and tok.pad_id == tok.endoftext_id
    assert tok.special_ids == {tok.token_to_id(t) for t in SPECIALS}
    assert tok.token_to_id("<|no such token|>") is None
    bare = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))  # no config: Qwen defaults
    assert (bare.eos_id, bare.pad_id) == (tok.im_end_id, tok.endoftext_id)
    with open(os.path.join(model_dir, "tokenizer_config.json")) as f:
        config = json.load(f)
    config.update(eos_token={"content": "<|endoftext|>"}, pad_token="<|im_end|>")
    custom = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"), config)
    assert (custom.eos_id, custom.pad_id) == (tok.endoftext_id, tok.im_end_id)


def test_incremental_decoder_never_splits_a_character(tok):
    rng = random.Random(0)
    texts = TEXTS + ["".join(rng.choice("a猫🐱é \n<|im_end|>") for _ in range(200)) for _ in range(20)]
    split_seen = False
    for text in texts:
        ids = tok.encode(text)
        for skip in (False, True):
            decoder = IncrementalDecoder(tok, skip_special_tokens=skip)
            pieces = [decoder.push(i) for i in ids]
            pieces.append(decoder.flush())
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
            assert not any("\ufffd" in p for p in pieces)
            split_seen |= any(p == "" for p in pieces[:-1]) and not skip
    assert split_seen  # some character really was split across tokens


def test_incremental_decoder_holds_partial_bytes_until_complete(tok):
    ids = tok.encode("🐱")
    assert len(ids) > 1  # four bytes, not one token in this small vocabulary
    decoder = tok.incremental_decoder()
    out = [decoder.push(i) for i in ids]
    assert out[:-1] == [""] * (len(ids) - 1) and out[-1] == "🐱"
    decoder.push(ids[0])
    assert decoder.flush() == "\ufffd"  # an unfinished character at the end, as decode() renders it
    assert decoder.push(tok.encode("a")[0]) == "a"
