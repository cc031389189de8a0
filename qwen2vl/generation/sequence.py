"""One generated answer: its tokens, its text as it becomes safe to show, and its stop rules.

Every consumer of the decode loop (Engine.generate and stream, ChatSession, the server's
scheduler, offline batch) turns token columns into text through :class:`Sequence`, so stop ids,
stop strings, ``min_tokens``, constraints and special-token hiding mean the same everywhere.
Text that could still be the start of a stop string is held back until it cannot be.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .sampling import SamplingParams


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # every generated token, including a final stop token
    finish_reason: str  # "stop" (stop token or string, finished constraint) or "length"
    prompt_tokens: int
    completion_tokens: int
    timings: dict = field(default_factory=dict)  # prefill_s, decode_s, time_to_first_token_s, decode_tokens_per_s
    logprobs: list[dict] | None = None  # per token {"token_id", "logprob", "top": [[id, logprob], ...]}


class Sequence:
    def __init__(self, params: SamplingParams, decoder, hidden_ids: frozenset[int], prompt_tokens: int,
                 submitted: float | None = None):
        """``decoder``: an incremental detokenizer (None: token ids only); ``hidden_ids``: tokens never
        shown as text."""
        self.params = params
        self.decoder = decoder
        self.hidden_ids = hidden_ids
        self.stop_ids = frozenset(params.stop_token_ids)
        self.hold = max((len(s) for s in params.stop), default=1) - 1
        self.prompt_tokens = prompt_tokens
        self.tokens: list[int] = []
        self.logprobs: list[dict] | None = [] if params.logprobs is not None else None
        self.text = ""
        self.emitted = 0
        self.finish_reason: str | None = None
        self.reused_prefix = 0
        now = time.perf_counter()
        self.times = {"submitted": submitted or now, "admitted": now, "first_token": None, "finished": None}

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int, logprob: dict | None = None) -> str:
        """Take the next token; return the text that became safe to show."""
        now = time.perf_counter()
        if self.times["first_token"] is None:
            self.times["first_token"] = now
        self.tokens.append(token)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        constraint = self.params.constraint
        if constraint is not None:
            constraint.advance(token)
        early = len(self.tokens) <= self.params.min_tokens
        if token in self.stop_ids and not early:
            self.finish_reason = "stop"
        else:
            if self.decoder is not None and token not in self.hidden_ids:
                self.text += self.decoder.push(token)
            if self.params.stop and not early:
                self._cut_at_stop_string()
            complete = constraint is not None and constraint.finished()
            if not self.done and (complete or len(self.tokens) >= self.params.max_new_tokens):
                self.finish_reason = "stop" if complete else "length"
                if self.decoder is not None:  # the text ends here: bytes held for a character come out
                    self.text += self.decoder.flush()
        if self.done:
            self.times["finished"] = now
        end = len(self.text) if self.done else max(self.emitted, len(self.text) - self.hold)
        delta, self.emitted = self.text[self.emitted:end], end
        return delta

    def _cut_at_stop_string(self) -> None:
        start = max(0, self.emitted - self.hold)
        hits = [i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish_reason = "stop"

    def timings(self) -> dict:
        t = self.times
        end = t["finished"] or time.perf_counter()
        first = t["first_token"] or end
        decode_s = end - first
        return {"queue_s": t["admitted"] - t["submitted"], "prefill_s": first - t["admitted"],
                "time_to_first_token_s": first - t["submitted"], "decode_s": decode_s,
                "decode_tokens_per_s": (len(self.tokens) - 1) / decode_s if decode_s > 0 else 0.0,
                "total_s": end - t["submitted"], "reused_prefix_tokens": self.reused_prefix}

    def result(self) -> GenerationResult:
        return GenerationResult(self.text, list(self.tokens), self.finish_reason or "length", self.prompt_tokens,
                                len(self.tokens), self.timings(), self.logprobs)
