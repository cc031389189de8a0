"""The training loop: model + data + stages/LoRA + FSDP2, AdamW with warmup + cosine, accumulation,
clipping, evaluation, metrics, checkpoints, exact resume, export.

One optimizer step consumes ``batch_size`` packed rows of the global stream; process r takes its
contiguous share and splits it into ``grad_accum`` micro-batches. Every micro-batch loss is its
sum of token losses divided by the supervised-token count of the whole global batch (known from
the up-front length pass), so the step's gradient is that of the global mean loss whatever the
number of processes or micro-steps. With ``loss_weighting: sample`` each answer's tokens share one
unit of weight (a multi-turn sample has one answer per reply) and the divisor is the number of
answers (the evaluation loss stays per token).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..config import Qwen2VLConfig
from ..model.qwen2vl import Qwen2VL
from .checkpointing import latest_checkpoint, load_checkpoint, remove_partial, save_checkpoint
from .dataset import Dataset
from .distributed import Dist, all_sum, barrier, shard
from .export import export_checkpoint, full_state_dict
from .lora import add_lora, lora_config
from .loss import LossModel, answer_lengths, answer_weight_sum
from .metrics import MetricsLog, plot_losses, progress_bar
from .optim import clip_grad_norm, lr_factor, make_optimizer, set_lr
from .options import LOSS_WEIGHTINGS, OptionError, TrainOptions
from .packing import PackedStream, collate, pack_in_order
from .stages import apply_freezing, learning_rates, lora_parts, param_groups, trainable_parts
from .stream import SyntheticStream, is_stream_spec


def load_model_and_processor(opts: TrainOptions):
    """(model in float32, processor, source directory for tokenizer/preprocessor files)."""
    from ..checkpoint import resolve_checkpoint
    from ..processing.processor import Processor

    pixels = {k: v for k, v in (("min_pixels", opts.min_pixels), ("max_pixels", opts.max_pixels)) if v is not None}
    if opts.model is not None:
        source = resolve_checkpoint(opts.model)
        model = Qwen2VL.from_pretrained(source, dtype=torch.float32)
    else:
        source = Path(opts.tokenizer)
        if not (source / "tokenizer.json").is_file():
            raise OptionError(f"tokenizer directory {source} has no tokenizer.json")
        try:
            config = Qwen2VLConfig.from_pretrained(opts.model_config)
        except (FileNotFoundError, ValueError) as e:
            raise OptionError(f"model_config {opts.model_config!r}: {e}") from None
        model = Qwen2VL.from_config(config, dtype=torch.float32, seed=opts.seed)
    processor = Processor.from_pretrained(str(source), **pixels)
    check_tokenizer(processor.tokenizer, model.config)
    return model, processor, source


def check_tokenizer(tokenizer, config: Qwen2VLConfig) -> None:
    """The tokenizer's vision ids must be the model's, and its ids must fit the embedding."""
    pairs = (("<|image_pad|>", tokenizer.image_pad_id, config.image_token_id),
             ("<|video_pad|>", tokenizer.video_pad_id, config.video_token_id),
             ("<|vision_start|>", tokenizer.vision_start_id, config.vision_start_token_id),
             ("<|vision_end|>", tokenizer.vision_end_id, config.vision_end_token_id))
    wrong = [f"{tok} is {got} in the tokenizer but {want} in the model config" for tok, got, want in pairs if got != want]
    if len(tokenizer) > config.text.vocab_size:
        wrong.append(f"the tokenizer has {len(tokenizer)} tokens, the model's vocab_size is {config.text.vocab_size}")
    if wrong:
        raise OptionError("tokenizer and model do not fit: " + "; ".join(wrong))


class Trainer:
    def __init__(self, opts: TrainOptions, d: Dist):
        opts.validate(d.world_size)
        trainable, adapted = trainable_parts(opts), lora_parts(opts)  # option errors before any loading
        self.opts, self.d = opts, d
        self.power = LOSS_WEIGHTINGS[opts.loss_weighting]  # each answer token weighs n ** -power
        self.out = Path(opts.output_dir)
        if d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "options.json").write_text(json.dumps(dataclasses.asdict(opts), indent=2) + "\n")
        torch.manual_seed(opts.seed)
        model, processor, self.source = load_model_and_processor(opts)
        self.config = model.config
        self.export_dtype = model.config.torch_dtype or "float32"
        self.pad_id = processor.tokenizer.pad_id or 0
        self.pixels = (processor.min_pixels, processor.max_pixels)  # written into the export

        def encode(messages):
            return processor.encode(messages, add_generation_prompt=False, return_labels=True,
                                    max_tokens=opts.seq_len)

        if any(is_stream_spec(p) for p in opts.data):
            if len(opts.data) > 1:
                raise OptionError(f"a generated data stream ({opts.data}) must be the only `data` entry")
            self.train_data = SyntheticStream(opts.data[0], encode, opts.seq_len)
        else:
            self.train_data = Dataset(opts.data, encode, opts.seq_len, d, opts.on_bad_record)
        self.eval_data = Dataset(opts.eval_data, encode, opts.seq_len, d, opts.on_bad_record) if opts.eval_data else None
        self._report_bad()

        self.lora_config = None
        if adapted:
            self.lora_config = lora_config(model, opts.lora)
            add_lora(model, self.lora_config, seed=opts.seed)
        apply_freezing(model, trainable, adapted)
        model.visual.gradient_checkpointing = model.model.gradient_checkpointing = opts.gradient_checkpointing
        self.loss_model = LossModel(model, lockstep=d.sharded).to(d.device).train()
        if d.sharded:
            shard(self.loss_model)
        self.lrs = learning_rates(opts)
        groups = param_groups(self.loss_model, self.lrs, opts.weight_decay)
        self.trainable = [p for g in groups for p in g["params"]]
        self.optimizer = make_optimizer(groups, opts, d.device)
        self.n_trainable = sum(p.numel() for p in self.trainable)
        self.step = self._resume() if opts.resume else 0
        if self.step == 0:  # a fresh run: per-process random streams (dropout); a resumed run restored its own
            torch.manual_seed(opts.seed + 1 + d.rank)
        self.autocast = self._autocast()

    # ----------------------------------------------------------------- setup pieces
    def log(self, text: str) -> None:
        if self.d.main:
            from tqdm.auto import tqdm
            tqdm.write(text)

    def _report_bad(self) -> None:
        for name, data in (("train", self.train_data), ("eval", self.eval_data)):
            if data is None:
                continue
            self.log(f"{name} data: {data.summary()}")
            if getattr(data, "bad", None) and self.d.main:
                with (self.out / f"skipped-{name}.jsonl").open("w") as f:
                    for bad in data.bad:
                        f.write(json.dumps({"source": bad.source, "reason": bad.reason}) + "\n")

    def _autocast(self):
        device_type = self.d.device.type
        bf16 = self.opts.precision == "bf16" or (self.opts.precision == "auto" and device_type == "cuda")
        if not bf16:
            return contextlib.nullcontext
        return lambda: torch.autocast(device_type, dtype=torch.bfloat16)

    def _resume(self) -> int:
        if self.d.main:
            remove_partial(self.out)
        barrier(self.d)
        path = latest_checkpoint(self.out)
        if path is None:
            self.log(f"resume: no checkpoint in {self.out}; starting from step 0")
            return 0
        state = load_checkpoint(path, self.loss_model, self.optimizer, self.d)
        for group in self.optimizer.param_groups:  # learning rates come from the options, not the checkpoint
            group["base_lr"] = self.lrs[group["part"]]
        self.log(f"resume: continuing after step {state['step']} from {path.name}")
        return int(state["step"])

    # ----------------------------------------------------------------- the loop
    def fit(self) -> dict:
        """Train from the current step to ``max_steps``; on the CPU with float denormals flushed to zero.

        A trained model's small gradients make denormal floats, which the CPU computes on a slow path:
        a step of the nano recipe's trained model took 1.73 s with them and 1.02 s flushed (2 threads;
        the same loss to 3 decimals; docs/training.md). Flushing is a process-wide switch, reset after.
        """
        flush = self.d.device.type == "cpu" and torch.set_flush_denormal(True)
        try:
            return self._fit()
        finally:
            if flush:
                torch.set_flush_denormal(False)

    def _fit(self) -> dict:
        opts, d = self.opts, self.d
        generated = isinstance(self.train_data, SyntheticStream)
        stream = None if generated else PackedStream(self.train_data.lengths, opts.seq_len, opts.seed, opts.shuffle)
        metrics = MetricsLog(self.out / "metrics.jsonl", self.step) if d.main else None
        self.log(f"training {self.n_trainable:,} parameters on {d.world_size} process(es), "
                 f"{opts.batch_size} x {opts.seq_len}-token rows per step, steps {self.step + 1}..{opts.max_steps}")
        bar = progress_bar(opts.max_steps, self.step, opts.progress and d.main)
        started, run_tokens, last = time.perf_counter(), 0, {}
        # a worker thread encodes and packs the next step's rows while this one computes
        with ThreadPoolExecutor(max_workers=1) as pool:
            upcoming = pool.submit(self._prepare, stream, self.step)
            for step in range(self.step, opts.max_steps):
                t0 = time.perf_counter()
                epoch, local, batches = upcoming.result()
                if step + 1 < opts.max_steps:
                    upcoming = pool.submit(self._prepare, stream, step + 1)
                *counts, weight = all_sum(d, local)  # over the global batch
                tokens, supervised, samples, answers = (int(v) for v in counts)
                factor = lr_factor(step, opts.warmup_steps, opts.max_steps, opts.min_lr_ratio)
                set_lr(self.optimizer, factor)
                loss, grad_norm = self._train_step(batches, weight)
                elapsed = time.perf_counter() - t0
                run_tokens += tokens
                last = {"step": step + 1, "loss": loss, "lr": opts.lr * factor, "grad_norm": grad_norm,
                        "tokens": tokens, "supervised_tokens": supervised, "tokens_per_s": tokens / elapsed,
                        "samples": samples, "answers": answers,
                        "padding": 1 - tokens / (opts.batch_size * opts.seq_len),
                        "epoch": epoch, "step_s": elapsed}
                if self.eval_data is not None and self._due(step + 1, opts.eval_every):
                    last["eval_loss"] = self.evaluate()
                if metrics is not None:
                    metrics.write(last)
                if bar is not None:
                    rate = run_tokens / (time.perf_counter() - started)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}", refresh=False)
                    bar.update(1)
                if self._due(step + 1, opts.save_every):
                    save_checkpoint(self.out, step + 1, self.loss_model, self.optimizer, d, opts.keep_checkpoints)
        if bar is not None:
            bar.close()
        return self._finish(last)

    def _prepare(self, stream: PackedStream | None, step: int):
        """(epoch, this process's [tokens, supervised tokens, samples, answers, loss weight], its micro-batches
        on the CPU).

        Rows come from the packed data set (``stream``) or, with ``stream`` None, are generated.
        """
        opts, d, data = self.opts, self.d, self.train_data
        per_process = opts.batch_size // d.world_size
        first = step * opts.batch_size + d.rank * per_process  # this process's rows of the global batch
        if stream is None:
            epoch, mine = 0, [data.row(g) for g in range(first, first + per_process)]
        else:
            rows = stream.rows(first, per_process)
            epoch, mine = rows[-1][0], [[data.sample(i) for i in row] for _, row in rows]
        samples = [s for row in mine for s in row]
        answers = [n for s in samples for n in answer_lengths(s.labels)]
        local = [sum(int(s.input_ids.numel()) for s in samples), sum(answers), len(samples), len(answers),
                 answer_weight_sum(answers, self.power)]
        micro = per_process // opts.grad_accum
        batches = [collate(mine[k * micro:(k + 1) * micro], self.config, self.pad_id) for k in range(opts.grad_accum)]
        return epoch, local, batches

    def _train_step(self, batches: list, weight: float) -> tuple[float, float]:
        """Accumulate the micro-batches, clip, step: (global weighted mean loss, gradient norm).

        ``weight`` is the global batch's total loss weight: its supervised tokens under "token"
        weighting, its answers under "sample".
        """
        d = self.d
        loss_sum = torch.zeros((), device=d.device)
        for k, batch in enumerate(batches):
            if d.sharded:
                self.loss_model.set_requires_gradient_sync(k == len(batches) - 1)
            with self.autocast():
                part = self.loss_model(batch.to(d.device), self.power)
            # FSDP averages gradients over processes: scale by the process count to get the sum
            (part * (d.world_size / weight)).backward()
            loss_sum += part.detach()
        grad_norm = clip_grad_norm(self.trainable, self.opts.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return all_sum(d, [float(loss_sum)])[0] / weight, grad_norm

    def _due(self, step: int, every: int) -> bool:
        return step == self.opts.max_steps or (every > 0 and step % every == 0)

    def _collate(self, data: Dataset, rows: list[list[int]]):
        return collate([[data.sample(i) for i in row] for row in rows], self.config, self.pad_id)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss over the whole evaluation set (packed in file order, split over processes)."""
        d, data = self.d, self.eval_data
        rows = pack_in_order(data.lengths, list(range(len(data))), self.opts.seq_len)
        micro = max(self.opts.batch_size // d.world_size // self.opts.grad_accum, 1)
        mine = rows[d.rank::d.world_size]
        calls = -(-len(rows) // (d.world_size * micro))  # every process makes the same number of calls
        self.loss_model.eval()
        total = 0.0
        for k in range(calls):
            chunk = mine[k * micro:(k + 1) * micro]
            batch = self._collate(data, chunk or rows[:1]).to(d.device)
            with self.autocast():
                value = self.loss_model(batch).item()
            total += value if chunk else 0.0
        self.loss_model.train()
        loss_sum = all_sum(d, [total])[0]
        return loss_sum / sum(data.supervised)

    def _finish(self, last: dict) -> dict:
        opts, d = self.opts, self.d
        summary = {"step": opts.max_steps, "loss": last.get("loss"), "eval_loss": last.get("eval_loss")}
        if opts.export:
            state = full_state_dict(self.loss_model, d)
            if d.main:
                final = export_checkpoint(state, self.config, self.out / "final", self.source, self.pixels,
                                          self.export_dtype, self.lora_config)
                summary["final"] = str(final)
            barrier(d)
        if d.main:
            png = plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
            summary["loss_png"] = str(png) if png else None
            self.log("done: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in summary.items() if v is not None))
        return summary
