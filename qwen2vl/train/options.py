"""Training options: a YAML file whose keys can each be overridden on the command line.

``qwen2vl train --config run.yaml --lr 2e-5 --lora.r 16 --resume`` reads ``run.yaml``, then applies
each ``--key value`` (nested keys with a dot). Values are parsed as YAML and then converted to the
option's type, so ``--lr 1e-4`` is a float and ``--freeze_vision false`` a bool.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LLM_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VISION_LORA_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


LOSS_WEIGHTINGS = {"token": 0.0, "sqrt": 0.5, "sample": 1.0}  # name -> p: an answer of n tokens weighs n ** -p each


class OptionError(ValueError):
    """A bad key or value in the options (the CLI reports it as a one-line user error)."""


@dataclass
class LoraOptions:
    """LoRA adapters (peft) on the linear layers of the LLM and/or the vision blocks; ``r = 0`` disables."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    llm: bool = True  # adapters on the decoder layers (LLM_LORA_TARGETS)
    vision: bool = False  # adapters on the vision blocks (VISION_LORA_TARGETS)
    target_modules: list[str] | None = None  # module-name suffixes replacing the default targets

    @property
    def enabled(self) -> bool:
        return self.r > 0


@dataclass
class TrainOptions:
    # model: a checkpoint directory, or model_config (config.json or preset name) + tokenizer directory
    model: str | None = None
    model_config: str | None = None
    tokenizer: str | None = None
    # data (JSONL, media paths relative to the file)
    data: list[str] = field(default_factory=list)
    eval_data: list[str] = field(default_factory=list)
    on_bad_record: str = "skip"  # "skip" (count and report) or "fail"
    min_pixels: int | None = None
    max_pixels: int | None = None
    shuffle: bool = True
    # what trains: stage 1 = vision + merger, 2 = all, 3 = LLM + merger; flags override the stage
    stage: int = 2
    freeze_vision: bool | None = None
    freeze_merger: bool | None = None
    freeze_llm: bool | None = None
    lora: LoraOptions = field(default_factory=LoraOptions)
    # optimisation
    lr: float = 1e-5
    lr_vision: float | None = None
    lr_merger: float | None = None
    lr_llm: float | None = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio at max_steps
    max_grad_norm: float = 1.0  # 0 disables clipping
    # how answer tokens are weighted: "token" (each supervised token alike), "sample" (each answer's
    # tokens share one unit: a one-token answer counts as much as an 80-token one; every reply of a
    # multi-turn sample is an answer), "sqrt" (n ** -0.5 each)
    loss_weighting: str = "token"
    max_steps: int = 100
    seq_len: int = 4096  # tokens per packed sequence
    batch_size: int = 1  # packed sequences per optimizer step, over all processes
    grad_accum: int = 1  # micro-steps per optimizer step (batch_size / (processes * grad_accum) each)
    precision: str = "auto"  # auto (bf16 autocast on GPU, float32 on CPU), bf16, fp32
    gradient_checkpointing: bool = False
    seed: int = 0
    # output
    output_dir: str = "runs/train"
    save_every: int = 0  # optimizer steps between checkpoints (0: only the last step)
    keep_checkpoints: int = 2
    eval_every: int = 0  # optimizer steps between evaluations (0: only at the end)
    progress: bool = True
    export: bool = True  # write output_dir/final/ at the end
    resume: bool = False

    def validate(self, world_size: int = 1) -> None:
        problems = []
        if (self.model is None) == (self.model_config is None):
            problems.append("give either `model` (a checkpoint directory) or `model_config` (+ `tokenizer`)")
        if self.model_config is not None and self.tokenizer is None:
            problems.append("`model_config` needs `tokenizer` (a directory with tokenizer.json)")
        if not self.data:
            problems.append("`data` (one or more JSONL files) is required")
        if self.stage not in (1, 2, 3):
            problems.append(f"stage must be 1, 2 or 3, got {self.stage}")
        if self.on_bad_record not in ("skip", "fail"):
            problems.append(f"on_bad_record must be 'skip' or 'fail', got {self.on_bad_record!r}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            problems.append(f"loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {self.loss_weighting!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            problems.append(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        for name in ("max_steps", "seq_len", "batch_size", "grad_accum", "keep_checkpoints"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_every", "eval_every"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        shards = world_size * self.grad_accum
        if self.batch_size % shards:
            problems.append(f"batch_size {self.batch_size} must be a multiple of processes x grad_accum = "
                            f"{world_size} x {self.grad_accum}")
        if self.lora.enabled and not (self.lora.llm or self.lora.vision or self.lora.target_modules):
            problems.append("lora.r > 0 but neither lora.llm nor lora.vision nor lora.target_modules is set")
        if problems:
            raise OptionError("; ".join(problems))


def load_options(config_file: str | Path | None, overrides: dict[str, str]) -> TrainOptions:
    """Options from a YAML file (may be None) with ``{"lora.r": "16"}``-style string overrides applied."""
    raw: dict[str, Any] = {}
    if config_file is not None:
        import yaml
        path = Path(config_file)
        if not path.is_file():
            raise OptionError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise OptionError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise OptionError(f"{path} must hold a mapping of option: value, got {type(raw).__name__}")
    for dotted, text in overrides.items():
        import yaml
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        target = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise OptionError(f"--{dotted}: {part!r} is not a group of options")
        target[leaf] = value
    return _build(TrainOptions, raw, "")


def _build(cls, raw: dict[str, Any], prefix: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise OptionError(f"unknown option {prefix + key!r}{hint}")
        kwargs[key] = _convert(hints[key], value, prefix + key)
    return cls(**kwargs)


def _convert(hint, value, name: str):
    """Convert a YAML value to the annotated type (``int | None``, ``list[str]``, bool, nested options)."""
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise OptionError(f"{name} must be a mapping of its options, got {value!r}")
        return _build(hint, value, name + ".")
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, name)
    if typing.get_origin(hint) is list:
        items = value if isinstance(value, list) else [value]
        return [_convert(args[0], item, name) for item in items]
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "on"):
                return True
            if str(value).lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise OptionError(f"{name} must be {getattr(hint, '__name__', hint)}, got {value!r}") from None
    raise OptionError(f"{name}: unsupported option type {hint}")


def parse_argv(argv: list[str]) -> tuple[str | None, dict[str, str], bool]:
    """``[--config FILE] [--key value]... [--resume]`` -> (config file, overrides, resume)."""
    config_file, overrides, resume = None, {}, False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise OptionError(f"expected --key value, got {arg!r}")
        key, eq, inline = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key == "resume" and not eq:
            resume = True
            i += 1
            continue
        if eq:
            value = inline
            i += 1
        else:
            if i + 1 >= len(argv):
                raise OptionError(f"--{key} needs a value")
            value = argv[i + 1]
            i += 2
        if key == "config":
            config_file = value
        else:
            overrides[key] = value
    return config_file, overrides, resume
