"""The generation engine: prefill (vision + text) into a preallocated KV cache, then a decode loop.

>>> engine = Engine.from_pretrained("checkpoint/")                     # doctest: +SKIP
>>> [r.text for r in engine.generate([conversation], max_new_tokens=32)]  # doctest: +SKIP

Decode positions come from the per-row rope delta: the token in cache slot ``s`` (left padding
counted) has M-RoPE position ``s + delta[row]`` on all three axes, because the slot is not the
position once an image has been seen (an image of h x w merged tokens takes h*w slots but advances
positions by max(h, w)).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..model import KVCache, Qwen2VL, rope_index
from .sampling import RowSampler, SamplingParams, sample_rows
from .static import StaticDecoder, device_samplable, run_static
from .vision_cache import VisionCache

CONTROL_TOKENS = ("endoftext_id", "im_start_id", "im_end_id", "vision_start_id", "vision_end_id",
                  "vision_pad_id", "image_pad_id", "video_pad_id")


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # every generated token, including a final stop token
    finish_reason: str  # "stop" (stop token or string) or "length"
    prompt_tokens: int
    completion_tokens: int
    timings: dict = field(default_factory=dict)  # prefill_s, decode_s, time_to_first_token_s, decode_tokens_per_s


class Sequence:
    """One row being generated: its sampler, tokens, text and stop rules.

    Text that could still be the start of a stop string is held back from the stream until it
    cannot be.
    """

    def __init__(self, params: SamplingParams, sampler: RowSampler, decoder, control_ids: frozenset[int],
                 prompt_tokens: int, delta: int):
        self.params = params
        self.sampler = sampler
        self.decoder = decoder
        self.control_ids = control_ids
        self.stop_ids = frozenset(params.stop_token_ids)
        self.hold = max((len(s) for s in params.stop), default=1) - 1
        self.prompt_tokens = prompt_tokens
        self.delta = delta
        self.tokens: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> str:
        """Take the next token; return the text that became safe to show."""
        self.tokens.append(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
        else:
            if self.decoder is not None and token not in self.control_ids:
                self.text += self.decoder.push(token)
            if self.params.stop:
                self._cut_at_stop_string()
            if not self.done and len(self.tokens) >= self.params.max_new_tokens:
                self.finish_reason = "length"
        if self.done and self.finish_reason == "length" and self.decoder is not None:
            self.text += self.decoder.flush()
        end = len(self.text) if self.done else max(self.emitted, len(self.text) - self.hold)
        delta, self.emitted = self.text[self.emitted:end], end
        return delta

    def _cut_at_stop_string(self) -> None:
        start = max(0, self.emitted - self.hold)
        hits = [i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish_reason = "stop"

    def result(self, timings: dict) -> GenerationResult:
        return GenerationResult(self.text, list(self.tokens), self.finish_reason or "length", self.prompt_tokens,
                                len(self.tokens), timings)


class Engine:
    """Generation over a :class:`Qwen2VL` and its processor."""

    def __init__(self, model: Qwen2VL, processor=None, generation_config: dict | None = None,
                 vision_cache_items: int = 64, max_context: int | None = None, static: bool | None = None,
                 compile: bool = False, compile_vision: bool = False, sync_every: int = 16):
        """``static`` (default: on CUDA) decodes with a captured :class:`StaticDecoder`; ``compile``
        fuses its step with torch.compile first; ``compile_vision`` compiles the vision blocks;
        ``sync_every`` is how many tokens pass between checks
        for stopped rows on that path."""
        self.model = model.eval()
        self.processor = processor
        self.config = model.config
        self.tokenizer = getattr(processor, "tokenizer", None)
        self.generation_config = generation_config or {}
        self.vision_cache = VisionCache(vision_cache_items)
        self.max_context = max_context or self.config.text.max_position_embeddings
        ids = [getattr(self.tokenizer, name, None) for name in CONTROL_TOKENS] if self.tokenizer else []
        self.control_ids = frozenset(i for i in ids if i is not None)
        self.static = model.device.type == "cuda" if static is None else static
        self.compile = compile
        self.sync_every = sync_every
        if compile_vision:
            model.visual.compile_blocks(dynamic=True)
        self._static_decoders: dict[tuple[int, int], StaticDecoder] = {}

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, progress=None, **kwargs) -> Engine:
        from ..checkpoint import resolve_checkpoint
        from ..processing import Processor

        directory = resolve_checkpoint(path)
        model = Qwen2VL.from_pretrained(directory, dtype=dtype, device=device, progress=progress)
        if model.device.type == "cuda":
            model.fuse_projections()  # one matmul for q/k/v and one for gate/up per layer
        return cls(model, Processor.from_pretrained(directory), read_generation_config(directory), **kwargs)

    def new_sequence(self, params: SamplingParams, vocab: int, prompt_ids: torch.Tensor, delta: int) -> Sequence:
        """A row to generate after its prefill: sampler, incremental decoder, stop rules."""
        decoder = self.tokenizer.incremental_decoder() if self.tokenizer else None
        sampler = RowSampler(params, vocab, prompt_ids, self.device)
        return Sequence(params, sampler, decoder, self.control_ids, len(prompt_ids), delta)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------ parameters
    def sampling_params(self, **overrides) -> SamplingParams:
        """Explicit values, else generation_config.json's, else greedy with 64 new tokens."""
        g = self.generation_config
        sampled = g.get("do_sample", False)
        defaults = {
            "max_new_tokens": g.get("max_new_tokens", 64),
            "temperature": g.get("temperature", 1.0) if sampled else 0.0,
            "top_p": g.get("top_p", 1.0) if sampled else 1.0,
            "top_k": g.get("top_k", 0) if sampled else 0,
            "min_p": g.get("min_p") or 0.0,
            "repetition_penalty": g.get("repetition_penalty", 1.0),
        }
        values = {k: (overrides[k] if overrides.get(k) is not None else v) for k, v in defaults.items()}
        stop = overrides.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        stop_ids = overrides.get("stop_token_ids")
        if stop_ids is None:
            eos = g.get("eos_token_id", getattr(self.tokenizer, "eos_id", None))
            stop_ids = [eos] if isinstance(eos, int) else list(eos or [])
            for name in ("im_end_id", "endoftext_id"):
                extra = getattr(self.tokenizer, name, None)
                if extra is not None and extra not in stop_ids:
                    stop_ids.append(extra)
        return SamplingParams(**values, seed=overrides.get("seed"), stop=stop,
                              stop_token_ids=list(stop_ids)).validate()

    # ------------------------------------------------------------------ public API
    def generate(self, conversations, max_new_tokens=None, temperature=None, top_p=None, top_k=None,
                 repetition_penalty=None, seed=None, stop=None, min_p=None, stop_token_ids=None,
                 add_vision_id=False) -> list[GenerationResult]:
        """One result per conversation (a single conversation is accepted as a batch of one)."""
        conversations = _as_batch(conversations)
        params = self.sampling_params(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                                      stop=stop, stop_token_ids=stop_token_ids)
        batch = self.prepare(conversations, params.max_new_tokens, add_vision_id=add_vision_id)
        return self.generate_batch(batch, [params] * len(conversations))

    def stream(self, conversation, max_new_tokens=None, temperature=None, top_p=None, top_k=None,
               repetition_penalty=None, seed=None, stop=None, min_p=None, stop_token_ids=None,
               add_vision_id=False) -> Iterator[str]:
        """Text deltas of one conversation as they are generated (never half a UTF-8 character)."""
        params = self.sampling_params(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                                      stop=stop, stop_token_ids=stop_token_ids)
        batch = self.prepare([conversation], params.max_new_tokens, add_vision_id=add_vision_id)
        for event in self.run(batch, [params]):
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

    # ------------------------------------------------------------------ the loop
    @torch.inference_mode()
    def run(self, batch, params: list[SamplingParams], session=None):
        """Yield ``(row, text_delta)`` as tokens arrive, then the list of results.

        ``session`` (one row only) is an object with ``cache`` and ``tokens`` attributes: the KV
        cache of its previous turn and the tokens in it. The longest common prefix of those tokens
        and the new prompt is copied instead of recomputed, and both attributes are updated at the
        end for the next turn.
        """
        ids = batch["input_ids"].to(self.device)
        rows, length = ids.shape
        if len(params) != rows:
            raise ValueError(f"{len(params)} sampling parameter sets for {rows} rows")
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(self.device)
        capacity = length + max(p.max_new_tokens for p in params)
        if capacity > self.max_context:
            raise ValueError(f"prompt of {length} tokens + {max(p.max_new_tokens for p in params)} new tokens "
                             f"exceeds the context of {self.max_context} tokens")
        if self.static and session is None and device_samplable(params):
            yield from run_static(self, batch, params, ids, mask)
            return
        start = time.perf_counter()
        cache = KVCache(self.config.text, rows, capacity, self.model.dtype, self.device)
        reused = 0
        if session is not None and session.cache is not None:
            if rows != 1:
                raise ValueError("a chat session holds one conversation")
            reused = common_prefix(session.tokens, ids[0].tolist(), limit=length - 1)
            cache.copy_row(0, session.cache, 0, reused)
        logits, deltas = self.prefill(ids, mask, batch, cache, start=reused)
        seqs = [self.new_sequence(p, logits.shape[-1], ids[r][mask[r].bool()], int(deltas[r]))
                for r, p in enumerate(params)]
        padded = not bool(mask.all())
        prefill_s = time.perf_counter() - start
        steps = 0
        while True:
            tokens = sample_rows(logits, [None if s.done else s.sampler for s in seqs])
            for r, (seq, token) in enumerate(zip(seqs, tokens)):
                if token is not None:
                    delta = seq.add(token)
                    if delta or seq.done:
                        yield r, delta
            if all(s.done for s in seqs):
                break
            feed = torch.tensor([t if t is not None else 0 for t in tokens], device=self.device)
            logits = self.decode_step(feed, deltas, cache, padded)
            steps += 1
        decode_s = time.perf_counter() - start - prefill_s
        timings = {"prefill_s": prefill_s, "decode_s": decode_s, "time_to_first_token_s": prefill_s,
                   "decode_tokens_per_s": steps * rows / decode_s if decode_s > 0 else 0.0,
                   "reused_prefix_tokens": reused}
        if session is not None:
            session.cache, session.tokens = cache, ids[0].tolist() + seqs[0].tokens[:steps]
        yield [s.result(dict(timings)) for s in seqs]

    def static_decoder(self, rows: int, capacity: int) -> StaticDecoder:
        """The captured decoder for this batch size and cache capacity (built on first use)."""
        key = (rows, capacity)
        if key not in self._static_decoders:
            self._static_decoders[key] = StaticDecoder(self.model, rows, capacity, compile=self.compile)
        return self._static_decoders[key]

    def encode_media(self, batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        merge = self.config.vision.spatial_merge_size
        encode = self.model.encode_vision
        images = self.vision_cache.encode(encode, batch.get("pixel_values"), batch.get("image_grid_thw"), merge)
        videos = self.vision_cache.encode(encode, batch.get("pixel_values_videos"), batch.get("video_grid_thw"), merge)
        return images, videos

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, batch, cache: KVCache, start: int = 0):
        """Run the prompt ``ids`` (B, T) through the model into ``cache`` from slot ``start``.

        Slots before ``start`` must already hold the same tokens (a reused prefix). Returns the
        logits of the last position (B, V) and the rope deltas (B,).
        """
        images, videos = self.encode_media(batch)
        x = self.model.embed(ids, images, videos)
        positions, deltas = rope_index(self.config, ids, batch.get("image_grid_thw"), batch.get("video_grid_thw"),
                                       mask)
        rows, length = ids.shape
        slots = torch.arange(start, length, device=self.device).expand(rows, -1)
        cache.view_len = length
        cache.mark(slots, mask[:, start:].bool())
        attn = None if start == 0 and bool(mask.all()) else cache.attention_mask(slots)
        hidden = self.model.decode(x[:, start:], positions[:, :, start:], attn, cache, slots)
        cache.lengths[:] = length
        return self.model.lm_head(hidden[:, -1]), deltas

    def decode_step(self, tokens: torch.Tensor, deltas: torch.Tensor, cache: KVCache, padded: bool) -> torch.Tensor:
        """Feed one token per row (B,) at each row's next slot; return next-token logits (B, V)."""
        rows = tokens.shape[0]
        slots = cache.lengths.view(rows, 1)
        positions = (slots + deltas.view(rows, 1)).view(1, rows, 1).expand(3, rows, 1)
        cache.mark(slots, torch.ones_like(slots, dtype=torch.bool))
        cache.view_len = int(cache.lengths.max()) + 1
        attn = cache.attention_mask(slots) if padded else None
        x = self.model.model.embed_tokens(tokens.view(rows, 1))
        hidden = self.model.decode(x, positions, attn, cache, slots)
        cache.lengths += 1
        return self.model.lm_head(hidden[:, -1])


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
