"""Continuous batching: one thread owns the model and steps every active request together.

The scheduler holds a KV cache of ``max_batch`` rows of ``max_len`` slots. Between decode steps it
admits waiting jobs: each is prefilled alone into a cache just long enough for its prompt, and
that row is copied into the next free row of the shared cache. Active rows are kept packed at
the front: when row ``i`` of ``n`` finishes (or its client went away) the last active row is
moved into it, so a step decodes exactly rows ``0..n-1`` through a view of the cache, and a row
that is not in use is never stepped (it cannot grow). Each row samples with its own parameters
and seed, so a request's tokens do not depend on which others share its steps.

Results leave through each job's ``sink``, called on the scheduler thread with one event at a
time: ``("delta", text)`` as text becomes safe to show, then ``("done", GenerationResult)``, or
``("error", message)``. The HTTP server's sink hands events to an asyncio queue with
``loop.call_soon_threadsafe``; offline batch puts them on a ``queue.Queue``.

Admission is bounded: ``reserve()`` takes one of ``max_queue`` places (raising QueueFull when
none is left) before the caller spends time preprocessing, and ``submit()`` turns it into a
waiting job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..generation.engine import Sequence
from ..generation.sampling import SamplingParams, sample_rows
from ..model import KVCache

log = logging.getLogger("qwen2vl.serve")


class QueueFull(Exception):
    """Every place in the waiting queue is taken."""


class SchedulerDown(RuntimeError):
    """The scheduler thread stopped (shut down, or a fault it could not recover from)."""


@dataclass(eq=False)
class Job:
    """One request: a one-row prepared batch, its sampling parameters and where its events go."""

    batch: dict
    params: SamplingParams
    sink: Callable[[tuple], None]
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    seq: Sequence | None = None  # set on admission
    admitted: float = 0.0
    first_token: float = 0.0

    @property
    def prompt_tokens(self) -> int:
        return int(self.batch["input_ids"].shape[1])


class Scheduler:
    @staticmethod
    def serving_max_len(engine, max_model_len: int | None) -> int:
        """Tokens per row for the server and the batch runner: ``--max-model-len``, else the model's
        context capped at 8192 (the KV cache holds ``max_batch`` rows of this length)."""
        return max_model_len or min(engine.max_context, 8192)

    def __init__(self, engine, max_batch: int = 8, max_queue: int = 64, max_len: int | None = None):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch ({max_batch}) and max_queue ({max_queue}) must be >= 1")
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_len = min(max_len or engine.max_context, engine.max_context)
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._reserved = 0
        self._admitting: list[Job] = []  # taken from the queue, being prefilled
        self._active: list[Job] = []  # index = cache row
        self._cache: KVCache | None = None
        self._deltas: torch.Tensor | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.fault: str | None = None  # why the scheduler thread died, if it did
        self.counters = {"completed": 0, "cancelled": 0, "failed": 0, "steps": 0, "peak_batch": 0,
                         "generated_tokens": 0}

    # ------------------------------------------------------------------ other threads
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="qwen2vl-scheduler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def reserve(self) -> None:
        """Take a place in the queue for a request about to be prepared (QueueFull when none is left)."""
        with self._cond:
            if self.fault is not None:
                raise SchedulerDown(f"the scheduler stopped: {self.fault}")
            if self._reserved + len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{self._reserved + len(self._waiting)} requests are already queued "
                                f"(limit {self.max_queue})")
            self._reserved += 1

    def release(self) -> None:
        """Give back a reserved place (the request failed before it was submitted)."""
        with self._cond:
            self._reserved -= 1

    def submit(self, job: Job) -> None:
        """Queue a job in the place reserved for it."""
        needed = job.prompt_tokens + job.params.max_new_tokens
        if needed > self.max_len:
            self.release()
            raise ValueError(f"prompt of {job.prompt_tokens} tokens + {job.params.max_new_tokens} new tokens "
                             f"exceeds the context of {self.max_len} tokens")
        with self._cond:
            self._reserved -= 1
            if self.fault is not None:
                raise SchedulerDown(f"the scheduler stopped: {self.fault}")
            self._waiting.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """Drop a job (its client went away): from the queue now, from its cache row before the next step."""
        with self._cond:
            if job.cancelled or (job.seq is not None and job.seq.done):
                return
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
                self.counters["cancelled"] += 1
            self._cond.notify_all()

    def stats(self) -> dict:
        with self._cond:
            return {"active": len(self._active), "admitting": len(self._admitting), "waiting": len(self._waiting),
                    "reserved": self._reserved,
                    "max_batch": self.max_batch, "max_queue": self.max_queue, "max_model_len": self.max_len,
                    "fault": self.fault, **self.counters}

    # ------------------------------------------------------------------ the scheduler thread
    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                self._serve()
            reason = "the server is shutting down"
        except Exception as err:  # e.g. the cache does not fit in memory: say so to every request
            log.exception("the scheduler stopped")
            reason = f"{type(err).__name__}: {err}"
            self.fault = reason
        with self._cond:
            left = self._admitting + self._active + list(self._waiting)
            self._admitting, self._active, self._waiting = [], [], deque()
        for job in left:
            self._fail(job, reason)

    def _serve(self) -> None:
        engine = self.engine
        self._cache = KVCache(engine.config.text, self.max_batch, self.max_len, engine.model.dtype, engine.device)
        self._deltas = torch.zeros(self.max_batch, dtype=torch.long, device=engine.device)
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._active):
                    self._cond.wait()
                if self._stopping:
                    return
                while self._waiting and len(self._active) + len(self._admitting) < self.max_batch:
                    self._admitting.append(self._waiting.popleft())
            while self._admitting:
                self._admit(self._admitting[0])
                with self._cond:
                    self._admitting.pop(0)
            self._drop_cancelled()
            if self._active:
                self._step()

    def _admit(self, job: Job) -> None:
        engine = self.engine
        job.admitted = time.perf_counter()
        if job.cancelled:
            self.counters["cancelled"] += 1
            return
        try:
            batch = job.batch.to(engine.device) if hasattr(job.batch, "to") else job.batch
            ids = batch["input_ids"]
            mask = torch.ones_like(ids)
            prompt = KVCache(engine.config.text, 1, ids.shape[1], engine.model.dtype, engine.device)
            logits, deltas = engine.prefill(ids, mask, batch, prompt)
            row = len(self._active)
            self._cache.copy_row(row, prompt, 0, ids.shape[1])
            self._deltas[row] = deltas[0]
            job.seq = engine.new_sequence(job.params, logits.shape[-1], ids[0], int(deltas[0]))
            self._active.append(job)
            token = sample_rows(logits, [job.seq.sampler])[0]
        except Exception as err:  # a bad request must not take the others down
            log.exception("prefill failed")
            if job in self._active:
                self._free(self._active.index(job))
            self._fail(job, f"prefill failed: {err}")
            return
        job.first_token = time.perf_counter()
        if self._accept(job, token):
            self._free(len(self._active) - 1)

    def _step(self) -> None:
        rows = len(self._active)
        try:
            tokens = torch.tensor([job.seq.tokens[-1] for job in self._active], device=self.engine.device)
            logits = self.engine.decode_step(tokens, self._deltas[:rows], self._cache.narrow(rows), padded=True)
            chosen = sample_rows(logits, [job.seq.sampler for job in self._active])
        except Exception as err:
            log.exception("decode step failed")
            for job in self._active:
                self._fail(job, f"decode step failed: {err}")
            self._cache.reset_rows(list(range(rows)))
            self._active.clear()
            return
        self.counters["steps"] += 1
        self.counters["peak_batch"] = max(self.counters["peak_batch"], rows)
        finished = [row for row, (job, token) in enumerate(zip(self._active, chosen)) if self._accept(job, token)]
        for row in reversed(finished):
            self._free(row)

    def _accept(self, job: Job, token: int) -> bool:
        """Give ``token`` to the job's sequence and its client; True when the job is finished."""
        self.counters["generated_tokens"] += 1
        delta = job.seq.add(token)
        if delta:
            self._emit(job, ("delta", delta))
        if not job.seq.done:
            return False
        now = time.perf_counter()
        timings = {"queue_s": job.admitted - job.submitted, "prefill_s": job.first_token - job.admitted,
                   "time_to_first_token_s": job.first_token - job.submitted, "decode_s": now - job.first_token,
                   "total_s": now - job.submitted}
        self._emit(job, ("done", job.seq.result(timings)))
        self.counters["completed"] += 1
        return True

    def _drop_cancelled(self) -> None:
        for row in reversed(range(len(self._active))):
            if self._active[row].cancelled:
                self._free(row)
                self.counters["cancelled"] += 1

    def _free(self, row: int) -> None:
        """Release cache row ``row``, moving the last active row into it to keep rows packed."""
        last = len(self._active) - 1
        if row != last:
            self._cache.copy_row(row, self._cache, last, int(self._cache.lengths[last]))
            self._deltas[row] = self._deltas[last]
            self._active[row] = self._active[last]
        self._active.pop()
        self._cache.reset_rows([last])

    def _fail(self, job: Job, message: str) -> None:
        self.counters["failed"] += 1
        self._emit(job, ("error", message))

    @staticmethod
    def _emit(job: Job, event: tuple) -> None:
        try:
            job.sink(event)
        except Exception:  # the receiver is gone (e.g. its event loop closed): stop generating for it
            log.warning("dropping a job whose receiver failed", exc_info=True)
            job.cancelled = True
