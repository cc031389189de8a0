"""The decode loop: the one place where rows are admitted, prefilled, decoded, sampled and freed.

    loop = DecodeLoop(model, rows=8, capacity=4096, chunk_size=512)
    row = loop.admit(prompt, sequence)           # prefill is queued, nothing runs yet
    while not sequence.done:
        for event in loop.step():                # one token column per step
            print(event.delta, end="")

``step()`` does, in order: prefill of at most ``chunk_size`` prompt tokens, oldest rows first
(several short prompts, or one chunk of a long one: a long prompt is spread over several steps,
so the other rows keep getting tokens), sampling of the first token of each prompt completed,
then one decode step over every decoding row,
and it returns a :class:`TokenEvent` per row that got a token. A row whose sequence is done is
freed in the same step (its slots are reused by the next admission). Engine.generate/stream,
ChatSession and the server's scheduler all drive this loop; none has a loop of its own.

On CUDA the sampled column stays on the device as the next step's input, and its copy to the
host (to turn tokens into text and check stops) is the only transfer per step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..model import KVCache
from .sampling import BatchSampler
from .sequence import Sequence
from .step import DecodeStep


@dataclass
class Prompt:
    """A prompt ready to prefill: embeddings with vision features in place, and 3-D positions."""

    embeds: torch.Tensor  # (T, H) on the model's device
    positions: torch.Tensor  # (3, T)
    delta: int  # rope position of slot s after the prompt: s + delta
    ids: torch.Tensor  # (T,) token ids, on the host

    def __len__(self) -> int:
        return self.embeds.shape[0]


@dataclass
class TokenEvent:
    row: int
    owner: object  # what the caller attached at admission (a job, a batch index)
    seq: Sequence
    delta: str  # text that became safe to show (may be empty)


@dataclass
class _Row:
    prompt: Prompt
    seq: Sequence
    owner: object
    filled: int  # prompt slots written
    keep: Callable[[KVCache, list[int]], None] | None  # receives the row's cache before it is freed

    @property
    def decoding(self) -> bool:
        return self.filled == len(self.prompt)


class DecodeLoop:
    def __init__(self, model, rows: int, capacity: int, chunk_size: int = 512, fixed: bool | None = None,
                 compile: bool = False):
        """``capacity``: tokens per row (prompt + answer). ``fixed``: run every row and slot each step
        (CUDA-graph shapes; the default on CUDA)."""
        if chunk_size < 1:
            raise ValueError(f"prefill chunk size must be >= 1 (got {chunk_size})")
        self.step_model = DecodeStep(model, rows, capacity + 1, fixed=fixed, compile=compile)
        self.sampler = BatchSampler(rows, model.lm_head.out_features, model.device)
        self.chunk_size = chunk_size
        self.rows: list[_Row | None] = [None] * rows
        self.prefilling: deque[int] = deque()  # rows whose prompt is not complete, oldest first
        self.counters = {"decode_steps": 0, "prefill_chunks": 0}
        self._index: tuple[tuple[int, ...], torch.Tensor] | None = None  # decoding rows, on the device
        # tensor parallel: every rank takes rank 0's sampled tokens (tokens -> tokens, a broadcast)
        self.agree: Callable[[torch.Tensor], torch.Tensor] | None = None
        cuda = model.device.type == "cuda"
        self._host = torch.empty(rows, dtype=torch.long, pin_memory=cuda)  # where sampled columns land

    @property
    def capacity(self) -> int:
        return self.step_model.capacity

    @property
    def free_rows(self) -> int:
        return sum(r is None for r in self.rows)

    @property
    def busy(self) -> bool:
        return any(r is not None for r in self.rows)

    def admit(self, prompt: Prompt, seq: Sequence, owner=None, prefix: tuple[KVCache, int] | None = None,
              keep: Callable[[KVCache, list[int]], None] | None = None) -> int:
        """Put a prompt into a free row (its prefill runs in the coming steps); return the row.

        ``prefix``: a one-row cache whose first ``n`` slots hold this prompt's first ``n`` tokens; they
        are copied instead of recomputed. ``keep`` receives a copy of the row's cache and its tokens
        when the sequence ends (the next chat turn's prefix).
        """
        needed = len(prompt) + seq.params.max_new_tokens
        if needed > self.capacity:
            raise ValueError(f"prompt of {len(prompt)} tokens + {seq.params.max_new_tokens} new tokens exceeds the "
                             f"context of {self.capacity} tokens")
        row = self.rows.index(None)  # ValueError when full: callers check free_rows
        filled = 0
        if prefix is not None:
            cache, filled = prefix
            filled = min(filled, len(prompt) - 1)  # at least one token is computed, for its logits
            self.step_model.cache.copy_row(row, cache, 0, filled)
            seq.reused_prefix = filled
        self.sampler.set_row(row, seq.params, prompt.ids)
        self.rows[row] = _Row(prompt, seq, owner, filled, keep)
        self.prefilling.append(row)
        return row

    def release(self, row: int) -> None:
        """Free ``row`` now (its sequence finished or its client went away)."""
        if self.rows[row] is None:
            return
        self.rows[row] = None
        if row in self.prefilling:
            self.prefilling.remove(row)
        self.step_model.stop_row(row)
        self.sampler.clear_row(row)

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        if self.prefilling:
            events += self._prefill()
        decoding = [i for i, r in enumerate(self.rows) if r is not None and r.decoding]
        if decoding:
            events += self._decode(decoding)
        return events

    # ------------------------------------------------------------------ internals
    def _prefill(self) -> list[TokenEvent]:
        """Prefill up to ``chunk_size`` prompt tokens, oldest rows first (several short prompts, or one
        chunk of a long one); sample the first token of every prompt completed."""
        budget, done, logits = self.chunk_size, [], []
        while self.prefilling and budget > 0:
            row = self.prefilling[0]
            state = self.rows[row]
            p = state.prompt
            start = state.filled
            end = min(start + budget, len(p))
            last = self.step_model.prefill(row, p.embeds[start:end], p.positions[:, start:end], start)
            state.filled, budget = end, budget - (end - start)
            self.counters["prefill_chunks"] += 1
            if end < len(p):
                break
            self.prefilling.popleft()
            done.append(row)
            logits.append(last)
        if not done:
            return []
        tokens, entries = self.sampler.sample(torch.stack(logits), done, [0] * len(done))
        if self.agree is not None:
            tokens = self.agree(tokens)
        for row, token in zip(done, tokens):
            p = self.rows[row].prompt
            self.step_model.start_row(row, token, slot=len(p), position=len(p) + p.delta)
        return self._accept(done, tokens, entries)

    def _decode(self, rows: list[int]) -> list[TokenEvent]:
        width = rows[-1] + 1
        # the slot each row is fed at is prompt + tokens - 1; attend up to the largest
        span = max(len(self.rows[r].prompt) + len(self.rows[r].seq.tokens) for r in rows)
        logits = self.step_model.decode(width, span)  # (width, V)
        if self._index is None or self._index[0] != tuple(rows):  # changes only on admission and finish
            self._index = (tuple(rows), torch.tensor(rows, device=logits.device))
        index = self._index[1]
        generated = [len(self.rows[r].seq.tokens) for r in rows]
        tokens, entries = self.sampler.sample(logits.index_select(0, index), rows, generated, index)
        if self.agree is not None:
            tokens = self.agree(tokens)
        column = torch.zeros(width, dtype=torch.long, device=logits.device).index_copy_(0, index, tokens)
        self.step_model.advance(column, width)
        self.counters["decode_steps"] += 1
        return self._accept(rows, tokens, entries)

    def _accept(self, rows: list[int], tokens: torch.Tensor, entries: list) -> list[TokenEvent]:
        host = self._host[: len(rows)]
        host.copy_(tokens, non_blocking=True)  # the one device-to-host copy of the step (pinned on CUDA)
        if tokens.device.type == "cuda":
            torch.cuda.current_stream(tokens.device).synchronize()
        events = []
        for row, token, entry in zip(rows, host.tolist(), entries):
            state = self.rows[row]
            delta = state.seq.add(token, entry)
            events.append(TokenEvent(row, state.owner, state.seq, delta))
            if state.seq.done:
                self._finish(row)
        return events

    def _finish(self, row: int) -> None:
        state = self.rows[row]
        if state.keep is not None:
            fed = state.seq.tokens[:-1]  # the last token was sampled, never fed
            length = len(state.prompt) + len(fed)
            state.keep(self.step_model.cache.snapshot_row(row, length), state.prompt.ids.tolist() + fed)
        self.release(row)
