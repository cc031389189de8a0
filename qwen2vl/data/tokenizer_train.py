"""Train the qwen2vl-nano byte-level BPE tokenizer on synthetic-task text (Qwen2 pre-tokenization).

The result is a Hugging Face tokenizer directory: ``tokenizer.json`` (NFC normaliser, the Qwen2
split regex with behaviour "isolated" then ByteLevel without prefix space or regex, ByteLevel
decoder; spec §2), ``tokenizer_config.json`` (the Qwen2-VL Instruct chat template of spec §3.1,
eos ``<|im_end|>``, pad ``<|endoftext|>``, left padding), ``chat_template.json`` and
``generation_config.json``. The 14 Qwen2-VL special tokens follow the learned vocabulary, in
Qwen's order, so ``<|endoftext|>`` is id ``learned`` and ``<|video_pad|>`` id ``learned + 13``.

    python -m qwen2vl.data.tokenizer_train --out assets/nano --vocab-size 3072 --samples 4000
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
DEFAULT_SYSTEM = "You are a helpful assistant."

# The Qwen2-VL Instruct template (spec §3.1): default system turn, `Picture N: ` / `Video N: ` with
# add_vision_id, one vision span per media item, text items verbatim, no separators between items.
CHAT_TEMPLATE = (
    "{%- set seen = namespace(images=0, videos=0) -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{%- set seen.images = seen.images + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' ~ seen.images ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{%- set seen.videos = seen.videos + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' ~ seen.videos ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Chat scaffolding text, repeated so each piece becomes whole tokens.
SCAFFOLD = ["system\n" + DEFAULT_SYSTEM, "user\n", "assistant\n", "\n", "Picture 1: ", "Picture 2: ", "Video 1: "]

# A little generic English (written for this project) so a user's own wording tokenizes sensibly.
GENERIC_ENGLISH = """\
Hello! Can you help me with this image? Please look at the picture and tell me what you see.
What is in this photo? Describe the image in one sentence. Answer the question briefly.
I would like to know how many things are on the table, and where the cup is.
Could you read the words on this page for me? The text is very small, so take your time.
Thank you very much, that was helpful. Sorry, I do not understand the question.
Yes, there is a red car next to the blue house. No, the door is closed and the light is off.
The chart shows the number of visitors for each month of the year, from January to December.
Which one is bigger, the left box or the right box? The answer is on the top of the screen.
Here is a short video of a ball rolling down the hill. What happens at the end of the video?
Find the button that says open and click on it. Then type your name and press enter.
The weather today is sunny and warm, but it will rain tomorrow in the morning and at night.
She bought some bread, milk and fruit at the market before she went home after work.
Please give me the coordinates of the object, the total price, and the date on the receipt.
This is a document with a title, a date, a name and a few lines of text about an order.
Is it possible to count all the circles, squares, triangles and stars in the scene?
My first question is simple: what color is the sign, and what does it say in large letters?
We can see people, animals, buildings, trees, roads, cars, boats, clouds and the sun.
It was a good day. They were happy because everything worked, and nobody was late.
There are two, three, four or five of them; maybe six, seven, eight, nine or ten.
Where, when, why, who, which, what and how are words that start questions in English.
"""

_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def without_special_tokens(text: str) -> list[str]:
    """The pieces of ``text`` between special tokens (they are added, not learned)."""
    return [piece for piece in _SPECIAL_RE.split(text) if piece]


def synthetic_texts(n_samples: int, seed: int = 0) -> list[str]:
    """Questions and answers of ``n_samples`` training samples, plus the generators' word lists."""
    from .synthetic import generate_sample
    from .synthetic import vocabulary as vocab

    texts: list[str] = []
    for i in range(n_samples):
        sample = generate_sample(i, seed, "train", image_size_policy="compact")
        texts += without_special_tokens(sample.question) + without_special_tokens(sample.answer)
    words = vocab.WORDS + vocab.FIRST_NAMES + vocab.LAST_NAMES + vocab.GROCERIES + vocab.SIGN_WORDS
    texts += [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    return texts


def default_corpus(n_samples: int = 4000, seed: int = 0, scaffold_repeats: int = 300) -> list[str]:
    """Synthetic-task text + chat scaffolding + generic English: the nano tokenizer's corpus."""
    return synthetic_texts(n_samples, seed) + SCAFFOLD * scaffold_repeats + GENERIC_ENGLISH.splitlines() * 20


def new_tokenizer() -> Tokenizer:
    """An empty byte-level BPE with Qwen2's normaliser, pre-tokenizer and decoder."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(out_dir: str | os.PathLike, texts: Iterable[str], vocab_size: int = 3072,
                    model_max_length: int = 32768, min_frequency: int = 2) -> Path:
    """Train on ``texts`` and write the tokenizer directory; returns its ``tokenizer.json`` path.

    ``vocab_size`` counts everything: the 256 byte symbols, the learned merges and the 14 special
    tokens (the trainer may stop short when the text has no more frequent pairs).
    """
    learned = vocab_size - len(SPECIAL_TOKENS)
    if learned < 257:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for merges; "
                         f"use at least {257 + len(SPECIAL_TOKENS)}")
    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=learned, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator((piece for text in texts for piece in without_special_tokens(text)), trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False,
                                             single_word=False) for t in SPECIAL_TOKENS])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    _write_json(out / "tokenizer_config.json", {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for t, i in ids.items()},
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })
    _write_json(out / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    _write_json(out / "generation_config.json", {
        "bos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "do_sample": False,
        "transformers_version": "4.57.1",
    })
    return out / "tokenizer.json"


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def config_token_ids(path: str | os.PathLike, multiple_of: int = 64) -> dict[str, int]:
    """The ids a Qwen2VLConfig must use for the tokenizer at ``path`` (tokenizer.json or its directory).

    ``num_tokens`` is the tokenizer's size; ``vocab_size`` (embedding rows) rounds it up to
    ``multiple_of``, as the released models pad 151657 tokens to 151936 rows.
    """
    path = Path(path)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))

    def tid(token: str) -> int:
        i = tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"{path}: tokenizer has no {token}")
        return i

    n = tokenizer.get_vocab_size(with_added_tokens=True)
    return {
        "num_tokens": n,
        "vocab_size": -(-n // multiple_of) * multiple_of,
        "bos_token_id": tid("<|endoftext|>"),
        "eos_token_id": tid("<|im_end|>"),
        "pad_token_id": tid("<|endoftext|>"),
        "image_token_id": tid("<|image_pad|>"),
        "video_token_id": tid("<|video_pad|>"),
        "vision_start_token_id": tid("<|vision_start|>"),
        "vision_end_token_id": tid("<|vision_end|>"),
        "vision_token_id": tid("<|vision_pad|>"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen2vl.data.tokenizer_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--vocab-size", type=int, default=3072, help="total tokens, special tokens included")
    p.add_argument("--samples", type=int, default=4000, help="synthetic training samples whose text is used")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    path = train_tokenizer(args.out, default_corpus(args.samples, args.seed), args.vocab_size)
    print(json.dumps(config_token_ids(path), indent=1))
    print(f"wrote {path.parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
