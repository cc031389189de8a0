"""Choosing the next token: repetition penalty, then greedy or temperature / top-k / top-p / min-p sampling.

The order follows transformers: the repetition penalty acts on the raw logits; temperature, top-k,
top-p and min-p then shape the distribution that is sampled. ``temperature == 0`` is greedy.
Every row has its own parameters and its own seeded generator, so a row's tokens do not depend on
which other requests share its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the text)
    stop_token_ids: list[int] = field(default_factory=list)

    def validate(self) -> SamplingParams:
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens must be an integer >= 1"),
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 = off)"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message} (got {self})")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Divide positive and multiply negative logits of already-seen tokens by the row's penalty.

    logits (B, V); seen (B, V) bool (prompt and generated tokens); penalty (B,).
    """
    p = penalty.view(-1, 1).to(logits.dtype)
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """One row (V,) of temperature-scaled logits with the excluded tokens set to -inf."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the first token always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


class RowSampler:
    """The sampling state of one sequence: its parameters, seeded generator and seen-token mask."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: torch.Tensor, device: torch.device):
        self.params = params
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[prompt_ids.to(device)] = True

    def choose(self, logits: torch.Tensor) -> int:
        """One row of logits (V,) -> the next token id."""
        p = self.params
        logits = logits.float()
        if self.seen is not None:
            logits = apply_repetition_penalty(logits.view(1, -1), self.seen.view(1, -1),
                                              torch.tensor([p.repetition_penalty], device=logits.device)).view(-1)
        if p.greedy:
            token = int(logits.argmax())
        else:
            filtered = filter_logits(logits / p.temperature, p.top_k, p.top_p, p.min_p)
            token = int(torch.multinomial(filtered.softmax(-1), 1, generator=self.generator))
        if self.seen is not None:
            self.seen[token] = True
        return token


def sample_rows(logits: torch.Tensor, samplers: list[RowSampler | None]) -> list[int | None]:
    """logits (B, V) -> one token per row (None for rows without a sampler, i.e. idle rows)."""
    plain = [s is not None and s.seen is None and s.params.greedy for s in samplers]
    greedy = logits.argmax(-1).tolist() if any(plain) else None
    return [None if s is None else greedy[i] if plain[i] else s.choose(logits[i]) for i, s in enumerate(samplers)]
