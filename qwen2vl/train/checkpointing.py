"""Training checkpoints: written atomically, resumed exactly.

``output_dir/checkpoints/step-00000040/`` holds the model and optimizer state (torch distributed
checkpoint format, one shard file per process, so FSDP never gathers the full state), each
process's RNG state, and ``state.json`` (step, world size). Everything is written into
``step-00000040.tmp/`` first and renamed when complete, so a kill during a save leaves the
previous checkpoint as the latest usable one; older checkpoints are pruned only afterwards.

The schedule is a function of the step and the data stream a function of (seed, step), so model,
optimizer, RNG and step are all a resumed run needs to repeat an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from .distributed import Dist, barrier

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


@contextlib.contextmanager
def _quiet():
    """Single-process distributed checkpointing warns that no process group exists; that is intended."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _rng_state() -> dict:
    import numpy as np
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, directory) of every finished checkpoint, oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and (path / "state.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def save_checkpoint(output_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    d: Dist, keep: int) -> Path:
    """Collective: every process writes its shard. Returns the finished directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = checkpoints_root(output_dir) / f"step-{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(d)
    with _quiet():
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng-{d.rank}.pt")
    barrier(d)
    if d.main:
        (tmp / "state.json").write_text(json.dumps({"step": step, "world_size": d.world_size}) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for _, old in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(d)
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, d: Dist) -> dict:
    """Collective: restore model, optimizer and this process's RNG from ``path``; returns state.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    state = json.loads((path / "state.json").read_text())
    with _quiet():
        model_state, optim_state = get_state_dict(model, optimizer)  # initialises the optimizer state
        target = {"model": model_state, "optim": optim_state}
        dcp.load(target, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    rng = path / f"rng-{d.rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    elif d.main:
        print(f"resume: {path.name} was written by {state['world_size']} process(es); RNG state of process "
              f"{d.rank} not found, continuing with a fresh one")
    return state


def remove_partial(output_dir: str | Path) -> None:
    """Delete ``*.tmp`` checkpoint directories left by a run killed during a save."""
    root = checkpoints_root(output_dir)
    if root.is_dir():
        for path in root.glob("step-*.tmp"):
            shutil.rmtree(path, ignore_errors=True)
