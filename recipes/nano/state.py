"""Carry a training run of the nano recipe from one session to the next through the repository.

    python recipes/nano/state.py pack runs/nano recipes/nano/state      # the latest stage-2 checkpoint
    python recipes/nano/state.py unpack recipes/nano/state runs/nano    # then: train.py cpu --out runs/nano
    python recipes/nano/state.py export recipes/nano/state runs/state-model   # its weights, to evaluate

``pack`` writes ``state.pt`` (model weights in float32, Adam's moment estimates in 8 bits, the
step, the RNG state) plus the run's tokenizer, model ``config.json``, ``metrics.jsonl`` and
``options.json``: about 30 MB for the 5M-parameter model, against 60 MB for the checkpoint as
written (each state committed stays in git's history, so fewer bytes per state is a smaller
repository). The moments are stored as float8 (e4m3: 4 significant bits) with one float32 scale per
block of 256 values; the second moment as its square root, which halves its range of magnitudes.
Example: a block whose largest ``sqrt(exp_avg_sq)`` is 0.02 gets scale 0.02 / 448, and any value
down to 0.02 / 448 / 2**9 (about 9e-8, that is ``exp_avg_sq`` 8e-15) keeps a non-zero code.
``unpack`` turns it back into a checkpoint directory ``stage2/checkpoints/step-N`` that
``qwen2vl train --resume`` continues (it also reads the earlier states with bfloat16 moments). The
moments come back rounded (measured on the v2 state: ``exp_avg_sq`` within 12 % of each value, none
lost; ``exp_avg`` within 6 %, except values under ~4e-6 of their block's largest, which become zero:
0.8 % of them, a momentum the next ten steps rebuild), so the continued run is not bit-identical to an
uninterrupted one; everything else (weights, step, schedule, data rows, RNG) is. A checkpoint written by
several processes (``train.py --procs``) packs the same way, its shards joined (the RNG kept is process 0's),
and the unpacked state resumes under any number of processes.
``export`` writes the packed weights as a bf16 checkpoint (what the recipe ships) for ``qwen2vl eval``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

STAGE = "stage2"
ROUNDED = {"exp_avg": False, "exp_avg_sq": True}  # Adam state entries stored in 8 bits: (name, as its root)
BLOCK = 256  # values per float32 scale
FP8_MAX = 448.0  # the largest float8_e4m3fn
SIDE = ("metrics.jsonl", "options.json")


def relative_paths(options: dict) -> dict:
    """``options`` with absolute paths under the working directory written relative to it."""
    cwd = Path.cwd().resolve()

    def rel(value):
        if isinstance(value, list):
            return [rel(v) for v in value]
        if isinstance(value, str) and Path(value).is_absolute() and Path(value).resolve().is_relative_to(cwd):
            return str(Path(value).resolve().relative_to(cwd))
        return value

    return {k: rel(v) for k, v in options.items()}


def encode_moment(value: torch.Tensor, root: bool) -> dict:
    """``value`` (any shape) as float8 codes with one scale per block of ``BLOCK`` (of its square
    root when ``root``)."""
    x = value.float().sqrt() if root else value.float()
    flat = torch.nn.functional.pad(x.flatten(), (0, (-x.numel()) % BLOCK)).view(-1, BLOCK)  # (blocks, BLOCK)
    scale = flat.abs().amax(1).clamp_min(1e-30) / FP8_MAX  # (blocks,)
    return {"shape": list(value.shape), "root": root, "scale": scale,
            "codes": (flat / scale[:, None]).to(torch.float8_e4m3fn)}


def decode_moment(stored) -> torch.Tensor:
    """The float32 moment of :func:`encode_moment`'s output (or of a bfloat16 tensor: older states)."""
    if isinstance(stored, torch.Tensor):
        return stored.to(torch.float32)
    x = (stored["codes"].float() * stored["scale"][:, None]).flatten()
    x = x[:torch.Size(stored["shape"]).numel()].view(stored["shape"])
    return x.square() if stored["root"] else x


def pack(run: Path, dest: Path) -> Path:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from qwen2vl.train.checkpointing import latest_checkpoint
    from qwen2vl.train.metrics import read_metrics

    checkpoint = latest_checkpoint(run / STAGE)
    if checkpoint is None:
        raise SystemExit(f"{run / STAGE} has no finished checkpoint to pack")
    info = json.loads((checkpoint / "state.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(checkpoint), str(flat))
        state = torch.load(flat, weights_only=False)
    for entry in state["optim"]["state"].values():
        for key, root in ROUNDED.items():
            entry[key] = encode_moment(entry[key], root)
    tmp_dest = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp_dest, ignore_errors=True)
    tmp_dest.mkdir(parents=True)
    torch.save({"info": info, "checkpoint": state, "rng": torch.load(checkpoint / "rng-0.pt", weights_only=False)},
               tmp_dest / "state.pt")
    shutil.copytree(run / "tokenizer", tmp_dest / "tokenizer")
    kept = [r for r in read_metrics(run / STAGE / "metrics.jsonl") if r["step"] <= info["step"]]  # not the steps after it
    (tmp_dest / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    options = json.loads((run / STAGE / "options.json").read_text())
    shutil.copyfile(options["model_config"], tmp_dest / "config.json")
    (tmp_dest / "options.json").write_text(json.dumps(relative_paths(options), indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp_dest.rename(dest)
    return dest


def unpack(source: Path, run: Path) -> Path:
    from torch.distributed.checkpoint.format_utils import torch_save_to_dcp

    from qwen2vl.train.checkpointing import latest_checkpoint

    packed = torch.load(source / "state.pt", weights_only=False)
    step = packed["info"]["step"]
    existing = latest_checkpoint(run / STAGE)
    if existing is not None:
        raise SystemExit(f"{run / STAGE} already has a checkpoint ({existing.name}); unpack into a fresh run")
    state = packed["checkpoint"]
    for entry in state["optim"]["state"].values():
        for key in ROUNDED:
            entry[key] = decode_moment(entry[key])
    target = run / STAGE / "checkpoints" / f"step-{step:08d}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "full.pt"
        torch.save(state, flat)
        torch_save_to_dcp(str(flat), str(target))
    torch.save(packed["rng"], target / "rng-0.pt")
    (target / "state.json").write_text(json.dumps(packed["info"]) + "\n")
    if not (run / "tokenizer").exists():
        shutil.copytree(source / "tokenizer", run / "tokenizer")
    for name in SIDE:
        shutil.copyfile(source / name, run / STAGE / name)
    return target


def export(source: Path, dest: Path) -> Path:
    from qwen2vl.config import Qwen2VLConfig
    from qwen2vl.processing.image import MAX_PIXELS, MIN_PIXELS
    from qwen2vl.train.export import export_checkpoint

    packed = torch.load(source / "state.pt", weights_only=False)
    weights = {k.removeprefix("net."): v for k, v in packed["checkpoint"]["model"].items()}
    options = json.loads((source / "options.json").read_text())
    pixels = (options.get("min_pixels") or MIN_PIXELS, options.get("max_pixels") or MAX_PIXELS)
    config = Qwen2VLConfig.from_pretrained(source / "config.json")
    return export_checkpoint(weights, config, dest, source / "tokenizer", pixels, dtype=torch.bfloat16)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["pack", "unpack", "export"])
    p.add_argument("source", type=Path, help="pack: the run directory; unpack, export: the packed state")
    p.add_argument("dest", type=Path, help="pack: the state directory to write; unpack: the run directory; "
                                           "export: the checkpoint directory to write")
    args = p.parse_args(argv)
    done = {"pack": pack, "unpack": unpack, "export": export}[args.action](args.source, args.dest)
    print(f"wrote {done}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
