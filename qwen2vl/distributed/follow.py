"""Serving under tensor parallelism: rank 0 drives, the other ranks follow the same decode steps.

Every model call of a sharded model is collective, so all ranks must make the same calls in the
same order. On rank 0 the server's scheduler runs as usual over :class:`Leader`, a view of the
engine that announces each call on the decode path before making it; every other rank runs
:func:`follow`, which receives the announcements and makes the same calls on its own shard:

    ("loop", rows, capacity, chunk)   build the decode loop (its cache holds this rank's KV heads)
    ("prompts", batches)              encode media and embed prompts (kept until admitted)
    ("admit", index, params)          admit prompt ``index`` of the last ``prompts`` call
    ("step",)                         one loop step
    ("release", rows)                 free rows (finished on rank 0 or cancelled)
    ("stop",)                         the server has shut down

The sampled tokens of each step are broadcast from rank 0 (``DecodeLoop.agree``), so the ranks
feed identical tokens even where only rank 0 knows a row's constraint or seed. Rows end when rank
0 says so: a follower's copy of a request has no stop rules of its own.

Announcements go over a gloo group (picklable Python objects); tokens over the model's group.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.distributed as dist

log = logging.getLogger("qwen2vl.distributed")


class _Channel:
    def __init__(self):
        self.group = dist.new_group(backend="gloo")

    def send(self, *message) -> None:
        dist.broadcast_object_list([message], src=0, group=self.group)

    def receive(self) -> tuple:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


def _agree(tokens: torch.Tensor) -> torch.Tensor:
    """Every rank takes rank 0's tokens (the ranks' own samples may differ: seeds, constraints)."""
    dist.broadcast(tokens, src=0)
    return tokens


def _follower_params(params):
    """A follower's copy of a request: rank 0's tokens and rank 0's decision to stop, nothing of its own."""
    return dataclasses.replace(params, stop=[], stop_token_ids=[], min_tokens=0, constraint=None, logprobs=None,
                               repetition_penalty=1.0, temperature=0.0)


class _LeaderLoop:
    """Rank 0's decode loop: each call is announced to the followers first."""

    def __init__(self, loop, channel: _Channel, prompts: list):
        self._loop, self._channel, self._prompts = loop, channel, prompts

    def __getattr__(self, name):
        return getattr(self._loop, name)

    def admit(self, prompt, seq, owner=None, **kwargs):
        index = next(i for i, p in enumerate(self._prompts) if p is prompt)
        self._channel.send("admit", index, _follower_params(seq.params))
        return self._loop.admit(prompt, seq, owner=owner, **kwargs)

    def release(self, row: int) -> None:
        if self._loop.rows[row] is not None:
            self._channel.send("release", [row])
        self._loop.release(row)

    def step(self):
        self._channel.send("step")
        events = self._loop.step()
        done = [e.row for e in events if e.seq.done]
        self._channel.send("release", done)  # the loop freed them already; the followers do it now
        return events


class Leader:
    """Rank 0's engine for the server: the real engine, with the decode path announced to the others."""

    def __init__(self, engine):
        self._engine = engine
        self._channel = _Channel()
        self._prompts: list = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def new_loop(self, rows: int, capacity: int, chunk_size: int | None = None):
        chunk = chunk_size or self._engine.prefill_chunk
        self._channel.send("loop", rows, capacity, chunk)
        loop = self._engine.new_loop(rows, capacity, chunk)
        loop.agree = _agree
        return _LeaderLoop(loop, self._channel, self._prompts)

    def prompts(self, batches: list):
        self._channel.send("prompts", [dict(b) for b in batches])
        self._prompts[:] = self._engine.prompts(batches)
        return list(self._prompts)

    def close(self) -> None:
        self._channel.send("stop")


def follow(engine) -> None:
    """Ranks > 0 while rank 0 serves: make every announced call until the server stops."""
    channel = _Channel()
    loop, prompts = None, []
    while True:
        message = channel.receive()
        kind = message[0]
        try:
            if kind == "stop":
                return
            if kind == "loop":
                _, rows, capacity, chunk = message
                loop = engine.new_loop(rows, capacity, chunk)
                loop.agree = _agree
            elif kind == "prompts":
                prompts = engine.prompts(message[1])
            elif kind == "admit":
                _, index, params = message
                prompt = prompts[index]
                loop.admit(prompt, engine.new_sequence(params, len(prompt)))
            elif kind == "step":
                loop.step()
            elif kind == "release":
                for row in message[1]:
                    loop.release(row)
        except Exception:  # rank 0 met the same failure on the same inputs and carries on
            log.exception("follower: %s failed", kind)
