"""Tokenizer: the ``tokenizers`` library over ``tokenizer.json``, with Qwen2-VL's special ids.

Qwen2's tokenizer is byte-level BPE (spec section 2): every token stands for a run of bytes, so a
character of several bytes can be split across tokens. ``IncrementalDecoder`` feeds token bytes
to an incremental UTF-8 decoder and so never emits half a character while streaming.
"""

from __future__ import annotations

import codecs
import json
import os
from functools import lru_cache

import tokenizers
from tokenizers import decoders

SPECIAL_TOKENS = {
    "endoftext_id": "<|endoftext|>",
    "im_start_id": "<|im_start|>",
    "im_end_id": "<|im_end|>",
    "vision_start_id": "<|vision_start|>",
    "vision_end_id": "<|vision_end|>",
    "vision_pad_id": "<|vision_pad|>",
    "image_pad_id": "<|image_pad|>",
    "video_pad_id": "<|video_pad|>",
}


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable character -> the byte it stands for.

    Bytes that are printable Latin-1 (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves;
    the other 68 bytes map in order to code points 256, 257, ... (so a space is ``Ġ`` = 288).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _token_text(token: dict | str | None) -> str | None:
    """A tokenizer_config token entry (a string or ``{"content": ...}``) as text."""
    return token.get("content") if isinstance(token, dict) else token


class Tokenizer:
    """Byte-level BPE tokenizer with the special ids the processor, engine and trainer need.

    ``encode`` recognises special tokens written in the text (``"<|im_end|>"`` is one id).
    ``pad_id``/``eos_id`` come from tokenizer_config.json (``pad_token``/``eos_token``) when
    given, else ``<|endoftext|>`` / ``<|im_end|>``. Ids of absent special tokens are None.
    """

    def __init__(self, backend: tokenizers.Tokenizer, config: dict | None = None):
        if not _is_byte_level(backend.decoder):
            raise ValueError("only byte-level BPE tokenizers (decoder type ByteLevel) are supported")
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        config = config or {}
        for attr, token in SPECIAL_TOKENS.items():
            setattr(self, attr, backend.token_to_id(token))
        eos, pad = _token_text(config.get("eos_token")), _token_text(config.get("pad_token"))
        self.eos_id = backend.token_to_id(eos) if eos else (self.im_end_id if self.im_end_id is not None
                                                             else self.endoftext_id)
        self.pad_id = backend.token_to_id(pad) if pad else (self.endoftext_id if self.endoftext_id is not None
                                                             else self.eos_id)
        added = backend.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, tok in added.items() if tok.special)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._bytes: dict[int, bytes] = {}

    @classmethod
    def from_file(cls, path: str, config: dict | None = None) -> Tokenizer:
        """Load ``tokenizer.json``; ``config`` is the parsed tokenizer_config.json, if any."""
        return cls(tokenizers.Tokenizer.from_file(path), config)

    @classmethod
    def from_pretrained(cls, directory: str) -> Tokenizer:
        """Load ``tokenizer.json`` and (when present) ``tokenizer_config.json`` from a model directory."""
        config_path = os.path.join(directory, "tokenizer_config.json")
        config = None
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        return cls.from_file(os.path.join(directory, "tokenizer.json"), config)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each token's ``(start, end)`` character span in ``text``."""
        encoding = self.backend.encode(text)
        return encoding.ids, encoding.offsets

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (empty for an unknown id), as the ByteLevel decoder maps them."""
        cached = self._bytes.get(token_id)
        if cached is None:
            text = self.backend.id_to_token(token_id)
            alphabet = _byte_alphabet()
            if text is None:
                cached = b""
            elif all(ch in alphabet for ch in text):
                cached = bytes(alphabet[ch] for ch in text)
            else:  # the decoder passes tokens outside the alphabet through as UTF-8
                cached = text.encode("utf-8")
            self._bytes[token_id] = cached
        return cached

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens)


def _is_byte_level(decoder) -> bool:
    if isinstance(decoder, decoders.ByteLevel):
        return True
    state = json.loads(decoder.__getstate__()) if decoder is not None else {}
    return state.get("type") == "Sequence" and any(d.get("type") == "ByteLevel" for d in state.get("decoders", []))


class IncrementalDecoder:
    """Streams text token by token; ``push`` returns only whole characters.

    >>> dec = IncrementalDecoder(tok)          # "é" is bytes C3 A9, split over two tokens
    >>> dec.push(first), dec.push(second)      # doctest: +SKIP
    ('', 'é')

    ``flush`` returns what is left: U+FFFD for an incomplete trailing sequence, as ``decode`` does.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if self.skip_special_tokens and token_id in self.tokenizer.special_ids:
            return ""
        return self._utf8.decode(self.tokenizer.token_bytes(int(token_id)))

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
