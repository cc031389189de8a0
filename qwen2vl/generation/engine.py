"""The generation engine: conversations -> prompts (vision packed into one tower call) -> the decode loop.

>>> engine = Engine.from_pretrained("checkpoint/")                     # doctest: +SKIP
>>> [r.text for r in engine.generate([conversation], max_new_tokens=32)]  # doctest: +SKIP

Decode positions come from the per-row rope delta: the token in cache slot ``s`` has M-RoPE
position ``s + delta[row]`` on all three axes, because the slot is not the position once an image
has been seen (an image of h x w merged tokens takes h*w slots but advances positions by max(h, w)).

The engine keeps at most one decode loop (and so one KV cache) of its own, reused while it is big
enough and replaced by a bigger one when a request needs more rows or slots; the server's
scheduler owns a loop of its own, sized once by ``--max-batch`` and ``--max-model-len``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..model import KVCache, Qwen2VL, rope_index
from .loop import DecodeLoop, Prompt
from .sampling import SamplingParams
from .sequence import GenerationResult, Sequence
from .vision_cache import VisionCache

CONTROL_TOKENS = ("endoftext_id", "im_start_id", "im_end_id", "vision_start_id", "vision_end_id",
                  "vision_pad_id", "image_pad_id", "video_pad_id")
CAPACITY_STEP = 256  # the engine's cache length is rounded up to this, so it (and its CUDA graph) is reused
OVERRIDES = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop",
             "stop_token_ids", "min_tokens", "ignore_eos", "logprobs", "skip_special_tokens", "constraint")


class Engine:
    """Generation over a :class:`Qwen2VL` and its processor."""

    def __init__(self, model: Qwen2VL, processor=None, generation_config: dict | None = None,
                 vision_cache_items: int = 64, max_context: int | None = None, static: bool | None = None,
                 compile: bool = False, compile_vision: bool = False, prefill_chunk: int = 512):
        """``static`` (default: on CUDA, or with ``compile``): decode steps over every row and slot of the
        cache, captured in a CUDA graph on CUDA (run as is elsewhere, so the path is testable on CPU);
        ``compile`` fuses that step with torch.compile first (on the CPU too: one shape, so one
        compilation; the 2B int4 at 2 threads decodes about 1.4x faster, docs/benchmarks.md); ``compile_vision`` compiles the vision blocks;
        ``prefill_chunk``: prompt tokens prefilled per loop step."""
        self.model = model.eval()
        self.processor = processor
        self.config = model.config
        self.tokenizer = getattr(processor, "tokenizer", None)
        self.generation_config = generation_config or {}
        self.vision_cache = VisionCache(vision_cache_items)
        self.max_context = max_context or self.config.text.max_position_embeddings
        ids = [getattr(self.tokenizer, name, None) for name in CONTROL_TOKENS] if self.tokenizer else []
        self.control_ids = frozenset(i for i in ids if i is not None)
        self.special_ids = frozenset(self.tokenizer.special_ids) | self.control_ids if self.tokenizer else frozenset()
        self.static = (model.device.type == "cuda" or compile) if static is None else static
        self.compile = compile
        if prefill_chunk < 1:
            raise ValueError(f"prefill chunk must be >= 1 token (got {prefill_chunk})")
        self.prefill_chunk = prefill_chunk
        if compile_vision:
            model.visual.compile_blocks(dynamic=True)
        self._loop: DecodeLoop | None = None

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, progress=None, quantize=None, tensor_parallel: int = 1,
                        **kwargs) -> Engine:
        """The one way to build an engine from a checkpoint (generate, chat, serve, batch and eval).

        Device: CUDA when available, else the CPU. Dtype: float32 on the CPU (this CPU path has no
        fast bfloat16 matmul, and float32 answers equal transformers' default), the checkpoint's own
        (config.json ``torch_dtype``) on CUDA; ``dtype`` overrides. On CUDA the q/k/v and gate/up
        projections are fused (one matmul each). ``quantize`` ("int8" / "int4") quantizes the weights
        after loading (:meth:`Qwen2VL.quantize`); GPTQ/AWQ checkpoints load quantized as they are.
        ``tensor_parallel`` N > 1 (under torchrun, N processes): each rank loads its shard only
        (docs/distributed.md; the device is the rank's own) and every rank must make the same calls.
        """
        from ..checkpoint import resolve_checkpoint
        from ..processing import Processor

        mesh = None
        if tensor_parallel != 1:
            if quantize is not None:
                raise ValueError(f"quantize={quantize!r} does not run tensor-parallel yet")
            from ..distributed import init_tensor_parallel
            mesh, device = init_tensor_parallel(tensor_parallel, None if device is None else str(device))
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None and device.type == "cpu":
            dtype = torch.float32
        directory = resolve_checkpoint(path)
        if mesh is not None:
            from ..distributed import load_tensor_parallel
            model = load_tensor_parallel(directory, mesh, dtype=dtype, device=device)  # fused on CUDA
        else:
            model = Qwen2VL.from_pretrained(directory, dtype=dtype, device=device, progress=progress)
            if quantize is not None:
                model.quantize(quantize)
            if model.device.type == "cuda":
                model.fuse_projections()
        return cls(model, Processor.from_pretrained(directory), read_generation_config(directory), **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------ parameters
    def sampling_params(self, **overrides) -> SamplingParams:
        """Explicit values, else generation_config.json's, else greedy with 64 new tokens.

        Stop ids: ``stop_token_ids`` plus the model's end tokens (generation_config's eos, ``<|im_end|>``,
        ``<|endoftext|>``) unless ``ignore_eos``.
        """
        unknown = set(overrides) - set(OVERRIDES)
        if unknown:
            raise TypeError(f"unknown sampling parameters: {sorted(unknown)}")
        g = self.generation_config
        sampled = g.get("do_sample", False)
        defaults = {
            "max_new_tokens": g.get("max_new_tokens", 64),
            "temperature": g.get("temperature", 1.0) if sampled else 0.0,
            "top_p": g.get("top_p", 1.0) if sampled else 1.0,
            "top_k": g.get("top_k", 0) if sampled else 0,
            "min_p": g.get("min_p") or 0.0,
            "repetition_penalty": g.get("repetition_penalty", 1.0),
            "min_tokens": 0,
            "skip_special_tokens": False,
        }
        values = {k: (overrides[k] if overrides.get(k) is not None else v) for k, v in defaults.items()}
        stop = overrides.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        stop_ids = list(overrides.get("stop_token_ids") or [])
        if not overrides.get("ignore_eos"):
            for t in self.end_token_ids():
                if t not in stop_ids:
                    stop_ids.append(t)
        return SamplingParams(**values, seed=overrides.get("seed"), stop=stop, stop_token_ids=stop_ids,
                              logprobs=overrides.get("logprobs"), constraint=overrides.get("constraint")).validate()

    def end_token_ids(self) -> list[int]:
        eos = self.generation_config.get("eos_token_id", getattr(self.tokenizer, "eos_id", None))
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        for name in ("im_end_id", "endoftext_id"):
            extra = getattr(self.tokenizer, name, None)
            if extra is not None and extra not in ids:
                ids.append(extra)
        return ids

    def new_sequence(self, params: SamplingParams, prompt_tokens: int, submitted: float | None = None) -> Sequence:
        """A row to generate: incremental decoder and stop rules."""
        decoder = self.tokenizer.incremental_decoder() if self.tokenizer else None
        hidden = self.special_ids if params.skip_special_tokens else self.control_ids
        return Sequence(params, decoder, hidden, prompt_tokens, submitted)

    # ------------------------------------------------------------------ public API
    def generate(self, conversations, max_new_tokens=None, *, add_vision_id=False, **params) -> list[GenerationResult]:
        """One result per conversation (a single conversation is accepted as a batch of one).

        ``params``: max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop,
        stop_token_ids, min_tokens, ignore_eos, logprobs, skip_special_tokens, constraint.
        """
        conversations = _as_batch(conversations)
        sampling = self.sampling_params(max_new_tokens=max_new_tokens, **params)
        batch = self.prepare(conversations, sampling.max_new_tokens, add_vision_id=add_vision_id)
        return self.generate_batch(batch, [sampling] * len(conversations))

    def stream(self, conversation, max_new_tokens=None, *, add_vision_id=False, **params) -> Iterator[str]:
        """Text deltas of one conversation as they are generated (never half a UTF-8 character)."""
        sampling = self.sampling_params(max_new_tokens=max_new_tokens, **params)
        batch = self.prepare([conversation], sampling.max_new_tokens, add_vision_id=add_vision_id)
        for event in self.run(batch, [sampling]):
            if isinstance(event, tuple) and event[1]:
                yield event[1]

    def prepare(self, conversations, max_new_tokens: int, add_vision_id: bool = False):
        """Conversations -> a left-padded model batch, refusing prompts that leave no room to answer."""
        if self.processor is None:
            raise RuntimeError("this engine has no processor; pass model inputs to generate_batch instead")
        budget = self.max_context - max_new_tokens
        if budget <= 0:
            raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the "
                             f"{self.max_context}-token context")
        return self.processor(conversations, add_generation_prompt=True, max_tokens=budget,
                              add_vision_id=add_vision_id)

    def generate_batch(self, batch, params: list[SamplingParams]) -> list[GenerationResult]:
        """Generate for a prepared batch (``input_ids``, ``attention_mask``, media keys)."""
        results = None
        for event in self.run(batch, params):
            if isinstance(event, list):
                results = event
        return results

    # ------------------------------------------------------------------ driving the loop
    def run(self, batch, params: list[SamplingParams], prefix: tuple[KVCache, list[int]] | None = None,
            keep: Callable[[KVCache, list[int]], None] | None = None):
        """Yield ``(row, text_delta)`` as tokens arrive, then the list of results.

        ``prefix`` (one row only): a one-row cache and the tokens in it (a chat session's previous turn);
        the longest common prefix with the new prompt is copied instead of recomputed. ``keep`` receives
        the row's cache and tokens when it finishes (the session's next prefix).
        """
        prompts = self.prompts([batch])
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling parameter sets for {len(prompts)} rows")
        if prefix is not None and len(prompts) != 1:
            raise ValueError("a chat session holds one conversation")
        longest = max(len(p) + s.max_new_tokens for p, s in zip(prompts, params))
        if longest > self.max_context:
            raise ValueError(f"prompt + {max(s.max_new_tokens for s in params)} new tokens needs {longest} "
                             f"tokens, over the context of {self.max_context} tokens")
        loop = self.engine_loop(len(prompts), longest)
        seqs = [self.new_sequence(s, len(p)) for p, s in zip(prompts, params)]
        rows = []
        try:
            for r, (prompt, seq) in enumerate(zip(prompts, seqs)):
                reuse = None
                if prefix is not None and prefix[0] is not None:
                    reuse = (prefix[0], common_prefix(prefix[1], prompt.ids.tolist(), limit=len(prompt) - 1))
                rows.append(loop.admit(prompt, seq, owner=r, prefix=reuse, keep=keep))
            while not all(s.done for s in seqs):
                for event in loop.step():
                    if event.delta or event.seq.done:
                        yield event.owner, event.delta
        finally:
            for row in rows:
                loop.release(row)  # a consumer that stops early frees its rows
        yield [s.result() for s in seqs]

    def new_loop(self, rows: int, capacity: int, chunk_size: int | None = None) -> DecodeLoop:
        """A decode loop over this engine's model (``chunk_size``: prompt tokens per step, default the engine's)."""
        return DecodeLoop(self.model, rows, capacity, chunk_size or self.prefill_chunk, fixed=self.static,
                          compile=self.compile)

    def engine_loop(self, rows: int, tokens: int) -> DecodeLoop:
        """The engine's own loop, if idle and big enough for ``rows`` x ``tokens``; else a new one
        (the old one, and its cache, is dropped first)."""
        loop = self._loop
        if loop is None or loop.busy or len(loop.rows) < rows or loop.capacity < tokens:
            self._loop = None
            capacity = -(-tokens // CAPACITY_STEP) * CAPACITY_STEP
            rows = max(rows, len(loop.rows)) if loop is not None and not loop.busy else rows
            self._loop = loop = self.new_loop(rows, capacity)
        return loop

    # ------------------------------------------------------------------ prompts
    @torch.inference_mode()
    def prompts(self, batches: list) -> list[Prompt]:
        """Prepared batches (left-padded ids, media) -> one :class:`Prompt` per row, in order.

        The media of every batch go through the vision tower in one call (items in the vision cache
        are not encoded again); pixel values are hashed on the host before any moves to the device.
        """
        features = self.encode_media(batches)
        prompts = []
        for batch, (images, videos) in zip(batches, features):
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask
            positions, _ = rope_index(self.config, ids, batch.get("image_grid_thw"), batch.get("video_grid_thw"),
                                      mask)
            x = self.model.embed(ids.to(self.device), images, videos)  # (B, T, H)
            for r in range(ids.shape[0]):
                real = mask[r].bool()
                pos = positions[:, r, real]
                delta = int(pos.max()) + 1 - int(real.sum())
                prompts.append(Prompt(x[r, real.to(self.device)], pos.to(self.device), delta, ids[r, real].cpu()))
        return prompts

    def encode_media(self, batches: list) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """(image features, video features) per batch, all items in one vision-tower call."""
        parts, grids = [], []  # every item group in order: batch 0 images, batch 0 videos, batch 1 ...
        for batch in batches:
            for key, grid_key in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
                if batch.get(key) is not None:
                    parts.append(batch[key])
                    grids.append(batch[grid_key])
        if not parts:
            return [(None, None)] * len(batches)
        merge = self.config.vision.spatial_merge_size
        feats = self.vision_cache.encode(self.model.encode_vision, torch.cat(parts), torch.cat(grids), merge)
        sizes = [int(g.prod(-1).sum()) // merge**2 for g in grids]
        pieces = iter(feats.split(sizes))
        out = []
        for batch in batches:
            images = next(pieces) if batch.get("pixel_values") is not None else None
            videos = next(pieces) if batch.get("pixel_values_videos") is not None else None
            out.append((images, videos))
        return out


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the common prefix of two token lists, at most ``limit``."""
    n = 0
    for x, y in zip(a[:limit], b[:limit]):
        if x != y:
            break
        n += 1
    return n


def read_generation_config(directory) -> dict:
    path = Path(directory) / "generation_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _as_batch(conversations) -> list:
    if isinstance(conversations, list) and conversations and isinstance(conversations[0], dict):
        return [conversations]
    return list(conversations)
