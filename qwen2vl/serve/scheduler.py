"""Continuous batching: one thread owns the model's decode loop and steps every active request together.

The scheduler owns a :class:`DecodeLoop` of ``max_batch`` rows of ``max_len`` slots, built once.
Between steps it admits waiting jobs into free rows: the media of all jobs admitted together go
through the vision tower in one packed call (at most ``vision_patches`` patches, at least one job),
and each job's prompt is then prefilled into its row in chunks of ``prefill_chunk`` tokens, one
chunk per loop step, so a long prompt never stalls the streams already running. A finished or
cancelled job frees its row in place (nothing is copied). Each row samples with its own
parameters and seed, so a request's tokens do not depend on which others share its steps.

Results leave through each job's ``sink``, called on the scheduler thread with one event at a
time: ``("delta", text, logprob_entries)`` as text becomes safe to show (the entries of the tokens
behind it, [] without logprobs), then ``("done", GenerationResult)``, or ``("error", message)``.
The HTTP server's sink hands events to an asyncio queue with ``loop.call_soon_threadsafe``;
offline batch puts them on a ``queue.Queue``.

Admission is bounded: ``reserve()`` takes one of ``max_queue`` places (raising QueueFull when
none is left) before the caller spends time preprocessing, and ``submit()`` turns it into a
waiting job. ``cancel()`` drops a job from the queue at once, or from its row before the next step.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..generation.loop import DecodeLoop, TokenEvent
from ..generation.sampling import SamplingParams
from ..generation.sequence import Sequence

log = logging.getLogger("qwen2vl.serve")
VISION_PATCHES = 32768  # patches encoded together when several waiting jobs are admitted at once


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
    row: int | None = None  # its row in the decode loop while admitted
    sent_logprobs: int = 0  # logprob entries already sent with a delta

    @property
    def prompt_tokens(self) -> int:
        return int(self.batch["input_ids"].shape[1])

    @property
    def patches(self) -> int:
        return sum(int(self.batch[k].shape[0]) for k in ("pixel_values", "pixel_values_videos")
                   if self.batch.get(k) is not None)


class Scheduler:
    @staticmethod
    def serving_max_len(engine, max_model_len: int | None) -> int:
        """Tokens per row for the server and the batch runner: ``--max-model-len``, else the model's
        context capped at 8192 (the KV cache holds ``max_batch`` rows of this length)."""
        return max_model_len or min(engine.max_context, 8192)

    def __init__(self, engine, max_batch: int = 8, max_queue: int = 64, max_len: int | None = None,
                 prefill_chunk: int | None = None, vision_patches: int = VISION_PATCHES):
        """``prefill_chunk``: prompt tokens prefilled per step (default: the engine's)."""
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch ({max_batch}) and max_queue ({max_queue}) must be >= 1")
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_len = min(max_len or engine.max_context, engine.max_context)
        self.prefill_chunk = prefill_chunk or engine.prefill_chunk
        self.vision_patches = vision_patches
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._reserved = 0
        self._admitting: list[Job] = []  # taken from the queue, media being encoded
        self._rows: dict[int, Job] = {}  # loop row -> job
        self._loop: DecodeLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.fault: str | None = None  # why the scheduler thread died, if it did
        self.counters = {"completed": 0, "cancelled": 0, "failed": 0, "steps": 0, "peak_batch": 0,
                         "generated_tokens": 0}

    # ------------------------------------------------------------------ other threads
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop_thread, name="qwen2vl-scheduler", daemon=True)
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
            prefilling = sum(job.seq is not None and not job.seq.tokens for job in self._rows.values())
            return {"active": len(self._rows) - prefilling, "admitting": len(self._admitting) + prefilling,
                    "waiting": len(self._waiting), "reserved": self._reserved,
                    "max_batch": self.max_batch, "max_queue": self.max_queue, "max_model_len": self.max_len,
                    "fault": self.fault, **self.counters}

    # ------------------------------------------------------------------ the scheduler thread
    def _loop_thread(self) -> None:
        try:
            with torch.inference_mode():
                self._serve()
            reason = "the server is shutting down"
        except Exception as err:  # e.g. the cache does not fit in memory: say so to every request
            log.exception("the scheduler stopped")
            reason = f"{type(err).__name__}: {err}"
            self.fault = reason
        with self._cond:
            left = self._admitting + list(self._rows.values()) + list(self._waiting)
            self._admitting, self._rows, self._waiting = [], {}, deque()
        for job in left:
            self._fail(job, reason)

    def _serve(self) -> None:
        self._loop = self.engine.new_loop(self.max_batch, self.max_len, self.prefill_chunk)
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._rows):
                    self._cond.wait()
                if self._stopping:
                    return
                self._admitting = self._take()
            if self._admitting:
                self._admit(self._admitting)
                with self._cond:
                    self._admitting = []
            self._drop_cancelled()
            if self._rows:
                self._step()

    def _take(self) -> list[Job]:
        """Waiting jobs for the free rows, oldest first, within the packed vision budget (under the lock)."""
        taken, patches = [], 0
        free = self._loop.free_rows
        while self._waiting and len(taken) < free:
            job = self._waiting[0]
            if taken and patches + job.patches > self.vision_patches:
                break
            taken.append(self._waiting.popleft())
            patches += job.patches
        return taken

    def _admit(self, jobs: list[Job]) -> None:
        """Encode the jobs' media in one vision call and queue their prefills (a job that fails alone is
        refused alone)."""
        live = [job for job in jobs if not job.cancelled]
        self.counters["cancelled"] += len(jobs) - len(live)
        try:
            prompts = self.engine.prompts([job.batch for job in live])
        except Exception:
            if len(live) == 1:
                log.exception("prefill failed")
                self._fail(live[0], f"prefill failed: {sys.exc_info()[1]}")
                return
            for job in live:  # find the culprit: each on its own
                self._admit([job])
            return
        for job, prompt in zip(live, prompts):
            job.seq = self.engine.new_sequence(job.params, len(prompt), job.submitted)
            try:
                job.row = self._loop.admit(prompt, job.seq, owner=job)
            except ValueError as err:
                self._fail(job, str(err))
                continue
            with self._cond:
                self._rows[job.row] = job

    def _step(self) -> None:
        try:
            events = self._loop.step()
        except Exception as err:
            log.exception("decode step failed")
            with self._cond:
                jobs, self._rows = list(self._rows.values()), {}
            for job in jobs:
                self._loop.release(job.row)
                self._fail(job, f"decode step failed: {type(err).__name__}")
            return
        self.counters["steps"] += 1
        self.counters["peak_batch"] = max(self.counters["peak_batch"], len(self._rows))
        for event in events:
            self._deliver(event)

    def _deliver(self, event: TokenEvent) -> None:
        job, seq = event.owner, event.seq
        self.counters["generated_tokens"] += 1
        if event.delta or seq.done:
            entries = []
            if seq.logprobs is not None:
                entries, job.sent_logprobs = seq.logprobs[job.sent_logprobs:], len(seq.logprobs)
            if event.delta:
                self._emit(job, ("delta", event.delta, entries))
        if seq.done:  # the loop has freed its row
            with self._cond:
                self._rows.pop(job.row, None)
            self._emit(job, ("done", seq.result()))
            self.counters["completed"] += 1

    def _drop_cancelled(self) -> None:
        for row, job in list(self._rows.items()):
            if job.cancelled:
                self._loop.release(row)
                with self._cond:
                    self._rows.pop(row, None)
                self.counters["cancelled"] += 1

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
