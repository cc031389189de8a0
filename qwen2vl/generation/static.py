"""The fast decode path: a static cache, a decode step captured once (CUDA graph) and replayed.

The step reads its inputs from preallocated buffers (token, rope position and cache slot per row)
and attends over the whole preallocated cache under a validity mask, so every replay has the same
shapes and addresses. On CUDA it is captured in a CUDA graph (one launch per token instead of
hundreds); with ``compile=True`` it is first fused by ``torch.compile``. Without CUDA the same
step runs directly, which keeps the path testable on CPU.

Sampling stays on the device and the loop reads nothing back from it except every
``sync_every`` steps, to see whether every row has stopped.
"""

from __future__ import annotations

import time

import torch

from ..model import KVCache
from .sampling import SamplingParams

CAPACITY_STEP = 256  # cache lengths are rounded up to this, so graphs are reused across prompt lengths


class StaticDecoder:
    def __init__(self, model, batch: int, capacity: int, compile: bool = False, graph: bool | None = None):
        self.model = model
        device = model.device
        self.cache = KVCache(model.config.text, batch, capacity, model.dtype, device)
        self.cache.view_len = capacity
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.slots = torch.zeros(batch, dtype=torch.long, device=device)
        self.fn = torch.compile(self._step, fullgraph=True, dynamic=False) if compile else self._step
        self.graph = None
        self.logits = None
        self.use_graph = device.type == "cuda" if graph is None else graph  # captured on first call

    def _step(self) -> torch.Tensor:
        rows = self.tokens.shape[0]
        slots = self.slots.view(rows, 1)
        positions = self.positions.view(1, rows, 1).expand(3, rows, 1)
        self.cache.valid.scatter_(1, slots, True)
        mask = self.cache.attention_mask(slots)  # (B, 1, 1, capacity)
        x = self.model.model.embed_tokens(self.tokens.view(rows, 1))
        hidden = self.model.decode(x, positions, mask, self.cache, slots)
        return self.model.lm_head(hidden[:, -1])

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up (and compilation) outside the graph
                self.fn()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.fn()

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """tokens, positions, slots: (B,) device tensors -> logits (B, V) (a buffer reused by the next call)."""
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.slots.copy_(slots)
        if self.use_graph and self.graph is None:
            # the warm-up runs of the capture compute this very step, so what they write to the
            # cache is exactly what the replay below writes again
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self.fn()


def capacity_for(tokens: int) -> int:
    return -(-tokens // CAPACITY_STEP) * CAPACITY_STEP


def device_samplable(params: list[SamplingParams]) -> bool:
    """Rows can be sampled together on the device: same settings, no repetition penalty."""
    first = params[0]
    same = all((p.temperature, p.top_p, p.top_k, p.min_p, p.seed) ==
               (first.temperature, first.top_p, first.top_k, first.min_p, first.seed) for p in params)
    return same and all(p.repetition_penalty == 1.0 for p in params)


class DeviceSampler:
    """Greedy or temperature / top-k / top-p / min-p sampling of all rows at once, on the device."""

    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.greedy:
            return logits.argmax(-1)
        logits = logits.float() / p.temperature
        if 0 < p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            probs = sorted_logits.softmax(-1)
            drop = (probs.cumsum(-1) - probs) >= p.top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
        if p.min_p > 0.0:
            probs = logits.softmax(-1)
            logits = logits.masked_fill(probs < p.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=self.generator).view(-1)


def run_static(engine, batch, params: list[SamplingParams], ids: torch.Tensor, mask: torch.Tensor):
    """The engine's decode loop on a :class:`StaticDecoder` (same events as ``Engine.run``)."""
    from .engine import Sequence

    rows, length = ids.shape
    device = engine.device
    max_new = max(p.max_new_tokens for p in params)
    start = time.perf_counter()
    decoder = engine.static_decoder(rows, capacity_for(length + max_new))
    cache = decoder.cache
    cache.reset_rows(list(range(rows)))
    cache.view_len = cache.max_len
    logits, deltas = engine.prefill(ids, mask, batch, cache)
    cache.view_len = cache.max_len
    sampler = DeviceSampler(params[0], device)
    token = sampler(logits)
    prefill_s = time.perf_counter() - start
    stop_ids = torch.tensor(sorted({t for p in params for t in p.stop_token_ids}) or [-1], device=device)
    out = torch.empty(rows, max_new, dtype=torch.long, device=device)
    positions = length + deltas
    slots = torch.full((rows,), length, dtype=torch.long, device=device)
    stopped = torch.zeros(rows, dtype=torch.bool, device=device)
    produced = 0
    for step in range(max_new):
        out[:, step] = token
        stopped |= torch.isin(token, stop_ids)
        produced = step + 1
        if produced == max_new or (produced % engine.sync_every == 0 and bool(stopped.all())):
            break
        token = sampler(decoder(token, positions, slots))
        positions += 1
        slots += 1
    tokens = out[:, :produced].tolist()
    decode_s = time.perf_counter() - start - prefill_s
    seqs = [Sequence(p, None, engine.tokenizer.incremental_decoder() if engine.tokenizer else None,
                     engine.control_ids, int(mask[r].sum()), int(deltas[r])) for r, p in enumerate(params)]
    for r, seq in enumerate(seqs):
        for t in tokens[r]:
            delta = seq.add(t)
            if delta or seq.done:
                yield r, delta
            if seq.done:
                break
    timings = {"prefill_s": prefill_s, "decode_s": decode_s, "time_to_first_token_s": prefill_s,
               "decode_tokens_per_s": (produced - 1) * rows / decode_s if decode_s > 0 else 0.0,
               "reused_prefix_tokens": 0}
    yield [s.result(dict(timings)) for s in seqs]
