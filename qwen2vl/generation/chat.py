"""A multi-turn chat that reuses work across turns.

Each turn re-renders the whole conversation, but only the tokens after the longest prefix shared
with the previous turn's KV cache are recomputed (that prefix is copied into a free row of the
decode loop), and images already seen are not re-encoded (the engine's vision cache is keyed by
content). The session keeps a one-row copy of its cache between turns.

>>> chat = ChatSession(engine)                                            # doctest: +SKIP
>>> "".join(chat.send([{"type": "image", "image": "cat.png"}, {"type": "text", "text": "What is it?"}]))
>>> "".join(chat.send("And its colour?"))   # the image and the first turn are not recomputed
"""

from __future__ import annotations

from collections.abc import Iterator

from ..model import KVCache
from .engine import Engine, GenerationResult


class ChatSession:
    def __init__(self, engine: Engine, system: str | None = None, **params):
        self.engine = engine
        self.params = params
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.cache: KVCache | None = None  # one-row KV cache of the previous turn
        self.tokens: list[int] = []  # the tokens held in that cache
        self.last_result: GenerationResult | None = None

    def send(self, content: str | list[dict], **params) -> Iterator[str]:
        """Add a user message and stream the assistant's answer (text deltas)."""
        sampling = self.engine.sampling_params(**{**self.params, **params})
        self.messages.append({"role": "user", "content": content})
        try:
            batch = self.engine.prepare([self.messages], sampling.max_new_tokens)
        except Exception:
            self.messages.pop()  # a refused message leaves the conversation as it was
            raise
        for event in self.engine.run(batch, [sampling], prefix=(self.cache, self.tokens), keep=self._keep):
            if isinstance(event, list):
                self.last_result = event[0]
            elif event[1]:
                yield event[1]
        self.messages.append({"role": "assistant", "content": self.last_result.text})

    def _keep(self, cache: KVCache, tokens: list[int]) -> None:
        self.cache, self.tokens = cache, tokens

    def ask(self, content: str | list[dict], **params) -> GenerationResult:
        """Like :meth:`send`, but return the whole result."""
        for _ in self.send(content, **params):
            pass
        return self.last_result

    def reset(self) -> None:
        system = [m for m in self.messages[:1] if m["role"] == "system"]
        self.messages, self.cache, self.tokens = system, None, []
