"""The model side of decoding: a fixed-slot KV cache and the two calls that fill it.

``decode()`` feeds one token to every row at once. Its inputs live in preallocated device
buffers, one entry per row: the token, its rope position, its cache slot and whether the row is
decoding at all. An idle row (free, or still being prefilled) points at the scratch slot, the
cache's last, which no sequence ever uses, so the step can run over every row with the same
shapes. With ``fixed`` shapes (the default on CUDA) it always runs every row and slot, and on CUDA
it is captured once in a CUDA graph (fused first by ``torch.compile`` with ``compile=True``) and
replayed for every token; otherwise it runs directly, over the rows and slots in use only.

``prefill()`` writes a chunk of one row's prompt (its embeddings and 3-D positions) into the
row's slots and returns the logits of the chunk's last position.
"""

from __future__ import annotations

import torch

from ..model import KVCache


class DecodeStep:
    def __init__(self, model, rows: int, capacity: int, fixed: bool | None = None, compile: bool = False):
        self.model = model
        device = model.device
        self.cache = KVCache(model.config.text, rows, capacity, model.dtype, device)
        self.scratch = capacity - 1
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.slots = torch.full((rows,), self.scratch, dtype=torch.long, device=device)
        self.active = torch.zeros(rows, dtype=torch.bool, device=device)
        self.fixed = device.type == "cuda" if fixed is None else fixed  # every row and slot, every step
        self.fn = torch.compile(self._forward, fullgraph=True, dynamic=False) if compile else self._forward
        self.graph = None
        self.logits = None

    @property
    def rows(self) -> int:
        return self.cache.rows

    @property
    def capacity(self) -> int:
        """Slots a sequence may use (the scratch slot excluded)."""
        return self.cache.capacity - 1

    # ------------------------------------------------------------------ rows
    def start_row(self, row: int, token: torch.Tensor, slot: int, position: int) -> None:
        """Row ``row`` decodes from now on: ``token`` (a 1-element device tensor) goes into ``slot``."""
        self.tokens[row] = token.view(())
        self.slots[row] = slot
        self.positions[row] = position
        self.active[row] = True

    def stop_row(self, row: int, keep: bool = False) -> None:
        """Row ``row`` stops decoding; its slots are forgotten unless ``keep`` (to be copied out first)."""
        self.active[row] = False
        self.slots[row] = self.scratch
        if not keep:
            self.cache.reset_row(row)

    def advance(self, tokens: torch.Tensor, rows: int) -> None:
        """After a decode step: the sampled ``tokens`` (rows,) are the next inputs of the active rows."""
        active = self.active[:rows]
        self.tokens[:rows] = torch.where(active, tokens, self.tokens[:rows])
        self.positions[:rows] += active
        self.slots[:rows] += active

    # ------------------------------------------------------------------ model calls
    def _forward(self, rows: int, span: int) -> torch.Tensor:
        window = self.cache.window(slice(0, rows), span)
        slots = self.slots[:rows].view(rows, 1)
        window.cache.valid[:rows].scatter_(1, slots, self.active[:rows].view(rows, 1))
        mask = window.attention_mask(slots)  # (rows, 1, 1, span)
        x = self.model.model.embed_tokens(self.tokens[:rows].view(rows, 1))
        positions = self.positions[:rows].view(1, rows, 1).expand(3, rows, 1)
        hidden = self.model.decode(x, positions, mask, window, slots)
        return self.model.lm_head(hidden[:, -1])

    def decode(self, rows: int, span: int) -> torch.Tensor:
        """Feed every active row among the first ``rows`` its token; next-token logits (rows, V).

        ``span``: slots attended (past the last slot in use). With fixed shapes the step always runs
        the whole cache, captured in a CUDA graph on CUDA.
        """
        if not self.fixed:
            return self.fn(rows, span)
        if self.cache.valid.device.type != "cuda":
            return self.fn(self.rows, self.cache.capacity)[:rows]
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits[:rows]

    def _capture(self) -> None:
        # warm-up (and compilation) on a side stream; idle rows only write the scratch slot
        rows, span = self.rows, self.cache.capacity
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        active = self.active.clone()
        slots = self.slots.clone()
        self.active.zero_()
        self.slots.fill_(self.scratch)
        with torch.cuda.stream(side):
            for _ in range(3):
                self.fn(rows, span)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.fn(rows, span)
        self.active.copy_(active)
        self.slots.copy_(slots)

    def prefill(self, row: int, embeds: torch.Tensor, positions: torch.Tensor, start: int) -> torch.Tensor:
        """Write ``embeds`` (T, H) with ``positions`` (3, T) into slots [start, start+T) of ``row``;
        return the logits of the last one (V,). Slots before ``start`` must hold the same prompt."""
        t = embeds.shape[0]
        end = start + t
        window = self.cache.window(slice(row, row + 1), end)
        slots = torch.arange(start, end, device=embeds.device).view(1, t)
        window.cache.valid[row, start:end] = True
        mask = None if start == 0 else window.attention_mask(slots)  # None: plain causal over [0, t)
        hidden = self.model.decode(embeds.unsqueeze(0), positions.unsqueeze(1), mask, window, slots)
        return self.model.lm_head(hidden[0, -1])
