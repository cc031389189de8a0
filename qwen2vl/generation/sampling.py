"""Choosing the next token of every row at once: one batched sampler with per-row parameters.

Order, as in transformers: a row's constraint (allowed tokens) and its ban on stop tokens before
``min_tokens`` act first, then the repetition penalty on the raw logits; temperature, top-k, top-p
and min-p then shape the distribution that is sampled. ``temperature == 0`` (or ``top_k == 1``) is
greedy and draws nothing.

Each sampled row owns a seeded generator and draws exactly one uniform number per token, which
picks the token by inverse CDF over the row's filtered distribution (tokens sorted by
probability). A row's tokens therefore depend on its own logits, parameters and seed only, never
on which other rows share the step.

Worked example (one row, top_p 0.8): probabilities sorted [0.5, 0.3, 0.15, 0.05]; the tokens kept are
those whose preceding mass is < 0.8, i.e. the first two (0.0, 0.5 < 0.8; 0.8 is not); renormalised
[0.625, 0.375]; a draw u = 0.7 falls past 0.625, so the second token is chosen.
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
    min_tokens: int = 0  # stop ids and stop strings are not honoured before this many new tokens
    logprobs: int | None = None  # None: off; 0: the chosen token's; k > 0: also the k most likely
    skip_special_tokens: bool = False  # False: control tokens hidden, grounding tokens kept; True: all hidden
    constraint: object | None = None  # allowed(vocab) -> bool (V,) | None, advance(token), finished() -> bool

    def validate(self) -> SamplingParams:
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens must be an integer >= 1"),
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 = off)"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
            (isinstance(self.min_tokens, int) and 0 <= self.min_tokens, "min_tokens must be an integer >= 0"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             "logprobs must be an integer in [0, 20]"),
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


def sample_sorted(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Rows of logits (S, V) and per-row parameters (S,) plus one uniform draw per row -> tokens (S,).

    top_k 0 means off. The filters act on the distribution sorted by probability, and the draw picks
    the token whose cumulative (renormalised) mass first passes ``uniform``.
    """
    vocab = logits.shape[-1]
    scaled = logits / temperature.view(-1, 1)
    ordered, order = torch.sort(scaled, descending=True, dim=-1)  # (S, V)
    probs = ordered.softmax(-1)
    rank = torch.arange(vocab, device=logits.device).view(1, -1)
    k = torch.where(top_k > 0, top_k, vocab).view(-1, 1)
    keep = rank < k
    keep &= (probs.cumsum(-1) - probs) < top_p.view(-1, 1)  # the mass before a token is still under top_p
    keep &= probs >= min_p.view(-1, 1) * probs[:, :1]
    keep[:, 0] = True  # the most likely token always stays
    kept = torch.where(keep, probs, 0.0)
    cumulative = kept.cumsum(-1)
    target = uniform.view(-1, 1) * cumulative[:, -1:]
    index = torch.searchsorted(cumulative, target, right=True).clamp_(max=vocab - 1)
    index = torch.minimum(index, keep.sum(-1, keepdim=True) - 1)  # rounding never picks a dropped token
    return order.gather(1, index).view(-1)


class BatchSampler:
    """Sampling state of a fixed set of rows: parameter tensors (rows,), a generator per sampled row,
    and, when some row uses a repetition penalty, a seen-token mask (rows, V)."""

    def __init__(self, rows: int, vocab: int, device: torch.device):
        self.vocab, self.device = vocab, device
        self.params: list[SamplingParams | None] = [None] * rows
        self.generators: list[torch.Generator | None] = [None] * rows
        self.temperature = torch.ones(rows, device=device)
        self.top_k = torch.zeros(rows, dtype=torch.long, device=device)
        self.top_p = torch.ones(rows, device=device)
        self.min_p = torch.zeros(rows, device=device)
        self.penalty = torch.ones(rows, device=device)
        self.seen: torch.Tensor | None = None

    def set_row(self, row: int, params: SamplingParams, prompt_ids: torch.Tensor) -> None:
        self.params[row] = params
        self.generators[row] = None
        if not params.greedy:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed if params.seed is not None else torch.seed())
            self.generators[row] = generator
        self.temperature[row] = params.temperature if not params.greedy else 1.0
        self.top_k[row], self.top_p[row], self.min_p[row] = params.top_k, params.top_p, params.min_p
        self.penalty[row] = params.repetition_penalty
        if params.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(len(self.params), self.vocab, dtype=torch.bool, device=self.device)
            self.seen[row] = False
            self.seen[row, prompt_ids.to(self.device)] = True

    def clear_row(self, row: int) -> None:
        self.params[row] = None
        self.generators[row] = None
        self.penalty[row] = 1.0

    def sample(self, logits: torch.Tensor, rows: list[int], generated: list[int], index: torch.Tensor | None = None):
        """Next tokens of ``rows``; ``logits`` (len(rows), V) in that order; ``generated[i]`` is how many
        tokens row ``rows[i]`` has produced so far (for ``min_tokens``); ``index``: ``rows`` as a device
        tensor, if the caller holds one (greedy rows then need no host-to-device copy at all).

        Returns the tokens (len(rows),) on the device and, per row, its logprob entry or None.
        """
        x = logits.float()
        params = [self.params[r] for r in rows]
        bans = [(i, self._ban(p, n)) for i, (p, n) in enumerate(zip(params, generated))]
        for i, allowed in bans:
            if allowed is not None:
                x[i] = x[i].masked_fill(~allowed.to(x.device), float("-inf"))
        if index is None:
            index = torch.tensor(rows, device=x.device)
        if self.seen is not None and any(p.repetition_penalty != 1.0 for p in params):
            x = apply_repetition_penalty(x, self.seen[index], self.penalty[index])
        tokens = x.argmax(-1)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            rs = [rows[i] for i in sampled]
            pick = torch.tensor(sampled, device=x.device)
            uniform = torch.cat([torch.rand(1, generator=self.generators[r], device=self.device) for r in rs])
            chosen = sample_sorted(x[pick], self.temperature[rs], self.top_k[rs], self.top_p[rs], self.min_p[rs],
                                   uniform)
            tokens = tokens.index_copy(0, pick, chosen)
        if self.seen is not None:
            self.seen[index, tokens] = True
        entries = [None] * len(rows)
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        if wanted:
            entries = logprob_entries(logits, tokens, wanted, [params[i].logprobs for i in wanted], len(rows))
        return tokens, entries

    def _ban(self, params: SamplingParams, generated: int) -> torch.Tensor | None:
        """The row's allowed tokens this step (None: all): its constraint, and no stop id before min_tokens."""
        allowed = params.constraint.allowed(self.vocab) if params.constraint is not None else None
        if generated < params.min_tokens and params.stop_token_ids:
            allowed = torch.ones(self.vocab, dtype=torch.bool) if allowed is None else allowed.clone()
            allowed[[t for t in params.stop_token_ids if 0 <= t < self.vocab]] = False
        return allowed


def logprob_entries(logits: torch.Tensor, tokens: torch.Tensor, wanted: list[int], tops: list[int],
                    rows: int) -> list[dict | None]:
    """Log-probabilities under the model's distribution (raw logits) of the chosen tokens, and the
    ``tops[j]`` most likely alternatives of row ``wanted[j]``."""
    pick = torch.tensor(wanted, device=logits.device)
    logp = logits[pick].float().log_softmax(-1)
    chosen = logp.gather(1, tokens[pick].view(-1, 1)).view(-1).tolist()
    k = max(tops)
    top_values, top_ids = logp.topk(k, dim=-1) if k else (None, None)
    out: list[dict | None] = [None] * rows
    for j, i in enumerate(wanted):
        top = [] if not tops[j] else [[int(t), float(v)] for t, v in
                                      zip(top_ids[j, : tops[j]].tolist(), top_values[j, : tops[j]].tolist())]
        out[i] = {"token_id": int(tokens[i]), "logprob": float(chosen[j]), "top": top}
    return out
