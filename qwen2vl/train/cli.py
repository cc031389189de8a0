"""``qwen2vl train --config run.yaml [--key value]... [--resume]``; the same under torchrun.

Examples::

    qwen2vl train --config configs/stage3.yaml --data data/train.jsonl --max_steps 200
    torchrun --nproc_per_node 8 -m qwen2vl train --config configs/stage2.yaml --resume
"""

from __future__ import annotations

import dataclasses

from .options import OptionError, TrainOptions, load_options, parse_argv

HELP = """usage: qwen2vl train [--config run.yaml] [--key value]... [--resume]

Every option of the YAML file can be given or overridden as --key value (nested: --lora.r 16).
--resume continues from the last checkpoint in output_dir. Under torchrun the same command
shards the model with FSDP2 over all processes. Options and defaults:
"""


def options_help() -> str:
    lines = []
    for f in dataclasses.fields(TrainOptions):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            for sub in dataclasses.fields(default):
                lines.append(f"  --{f.name}.{sub.name:<24} {getattr(default, sub.name)!r}")
        else:
            lines.append(f"  --{f.name:<29} {default!r}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from ..cli import UserError

    if any(a in ("-h", "--help") for a in argv):
        print(HELP + options_help())
        return 0
    try:
        config_file, overrides, resume = parse_argv(argv)
        opts = load_options(config_file, overrides)
        opts.resume = opts.resume or resume
    except OptionError as e:
        raise UserError(str(e)) from None
    return run(opts)


def run(opts: TrainOptions) -> int:
    from ..cli import UserError
    from .dataset import DataError
    from .distributed import close_distributed, init_distributed
    from .trainer import Trainer

    d = init_distributed()
    try:
        Trainer(opts, d).fit()
    except (OptionError, DataError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    finally:
        close_distributed()
    return 0
