"""``qwen2vl batch``: offline inference over a JSONL file of chat-completion requests.

    qwen2vl batch --input requests.jsonl --output results.jsonl [--model DIR]
    torchrun --nproc_per_node 4 -m qwen2vl batch --input requests.jsonl --output results.jsonl

Each input line is an OpenAI chat-completion body with an ``"id"`` (a string or an integer,
unique in the file), e.g. ``{"id": "q1", "messages": [...], "max_tokens": 64}``. Each output line
is ``{"id": ..., "response": <chat.completion>}`` or, for a request that cannot be served,
``{"id": ..., "status": 400, "error": {"message", "type", "param", "code"}}``. Lines appear in the
order requests finish; all requests of a process share its model through the same continuous
batching scheduler as the server.

Output and resume: every line is written with a single ``write()`` as soon as its request
finishes, so a killed run leaves only whole lines, except at worst one torn last line, which
the next run cuts off. A run skips every id already present, so re-running the same command
after an interruption completes the file with each id exactly once.

Sharding: under torchrun (``WORLD_SIZE`` > 1) rank ``r`` takes input lines ``r, r+W, r+2W, ...``
and writes them to its own part file ``OUTPUT.part-r``. When all ranks are done they meet at a
barrier and rank 0 appends the part files' lines (ids not yet in OUTPUT) to OUTPUT and deletes
the parts. If a run stops before that merge, the part files stay; the next run (with any number
of processes) counts their ids as done and merges them at its end.

Local media paths are read as given (relative to the working directory) unless
``--allowed-media-dir`` restricts them to one directory; http(s) URLs need ``--allow-remote-media``.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import time
from datetime import timedelta
from pathlib import Path

from ..cli import UserError
from ..generation.cli import Parser, add_model_options, load_engine
from ..processing import MediaAccess
from .cli import add_serving_options, check_serving_options, served_model_name
from .constraints import constraint_factory
from .errors import APIError
from .protocol import choice_params, completion, completion_id, parse_chat_request, prepare
from .scheduler import Job, QueueFull, Scheduler, SchedulerDown


def main(argv: list[str]) -> int:
    parser = Parser(prog="qwen2vl batch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="JSONL of chat-completion request bodies, each with an id")
    parser.add_argument("--output", required=True, help="JSONL of results (appended to; ids in it are skipped)")
    parser.add_argument("--served-model-name", help="the model name written in each response")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_options(parser)
    add_serving_options(parser)
    args = parser.parse_args(argv)
    check_serving_options(args)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    output = Path(args.output)
    requests = read_requests(Path(args.input))
    own = output if world == 1 else part_path(output, rank)
    repair_tail(own)
    done = set(read_ids(output))
    for part in part_files(output):
        done.update(read_ids(part))
    todo = [(ident, body) for k, (ident, body) in enumerate(requests) if k % world == rank and key(ident) not in done]

    if args.device is None and world > 1:
        import torch
        if torch.cuda.is_available():
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    engine = load_engine(args) if todo else None
    if todo:
        name = served_model_name(args)
        try:
            run(engine, todo, own, args, name, rank, world)
        except SchedulerDown as err:
            raise UserError(f"{err}; the results so far are in {own}, run again to resume") from None
    if world > 1:
        _barrier()
    if rank == 0:
        merge_parts(output)
    return 0


def run(engine, todo: list, path: Path, args, model_name: str, rank: int, world: int) -> None:
    """Generate every request of ``todo`` through one scheduler, appending each result as it finishes.

    A request's ``n`` choices are ``n`` jobs; its line is written when all of them are done. Media
    are read under one policy for the whole file (the input is the user's own: private addresses
    may be fetched when remote media are allowed).
    """
    from tqdm import tqdm

    access = MediaAccess(args.allow_remote_media, args.allowed_media_dir, args.remote_timeout,
                         int(args.max_remote_mb * (1 << 20)), max_image_pixels=args.max_image_pixels,
                         max_video_frame_pixels=args.max_video_frame_pixels, max_video_pixels=args.max_video_pixels,
                         max_items=args.max_media_items)
    tokenizer = engine.processor.tokenizer
    constraints = constraint_factory(tokenizer)
    max_len = Scheduler.serving_max_len(engine, args.max_model_len)
    scheduler = Scheduler(engine, args.max_batch, max_queue=2 * args.max_batch, max_len=max_len)
    finished: queue.Queue = queue.Queue()
    desc = "batch" if world == 1 else f"batch rank {rank}/{world}"
    bar = tqdm(total=len(todo), desc=desc, unit="req", disable=args.quiet, position=rank, file=sys.stderr)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    pending: dict = {}  # key(ident) -> (ident, jobs, results, chat)

    def write(record: dict) -> None:
        append_line(fd, record)
        bar.update(1)

    def drain(until: int) -> None:
        """Write the requests that are done, waiting while more than ``until`` are in flight."""
        while pending:
            try:
                ident, index, kind, value = finished.get(block=len(pending) > until)
            except queue.Empty:
                return
            if key(ident) not in pending:
                continue  # a choice of a request that already failed
            _, jobs, results, chat = pending[key(ident)]
            if kind != "done":
                for job in jobs:
                    scheduler.cancel(job)
                del pending[key(ident)]
                write({"id": ident, "status": 500, "error": {"message": value, "type": "server_error",
                                                             "param": None, "code": None}})
                continue
            results[index] = value
            if all(r is not None for r in results):
                del pending[key(ident)]
                write({"id": ident, "response": completion(completion_id(), model_name, results, tokenizer, chat)})

    scheduler.start()
    try:
        for ident, body in todo:
            try:
                chat = parse_chat_request({k: v for k, v in body.items() if k != "id"}, access, args.tool_format)
                batch, params = prepare(engine, chat, scheduler.max_len, args.default_max_tokens, access, constraints)
                choices = [params] + [choice_params(params, chat, i, constraints) for i in range(1, chat.n)]
            except APIError as err:
                write({"id": ident, "status": err.status, **err.body()})
                continue
            jobs = [Job(batch, p, _sink(finished, ident, i)) for i, p in enumerate(choices)]
            pending[key(ident)] = (ident, jobs, [None] * len(jobs), chat)
            for job in jobs:
                while True:
                    try:
                        scheduler.reserve()
                        break
                    except QueueFull:  # places free up as waiting jobs are admitted
                        drain(until=len(pending))
                        time.sleep(0.01)
                try:
                    scheduler.submit(job)
                except ValueError as err:
                    for other in jobs:
                        scheduler.cancel(other)
                    pending.pop(key(ident), None)
                    write({"id": ident, "status": 400,
                           **APIError(400, str(err), "context_length_exceeded", "max_tokens").body()})
                    break
            drain(until=len(pending))
        drain(until=0)
    finally:
        scheduler.stop()
        os.close(fd)
        bar.close()


def _sink(finished: queue.Queue, ident, index: int):
    def sink(event: tuple) -> None:
        if event[0] != "delta":
            finished.put((ident, index, *event[:2]))
    return sink


# ------------------------------------------------------------------------------------------ files

def key(ident) -> str:
    """A hashable key that keeps ``1`` and ``"1"`` apart."""
    return json.dumps(ident)


def read_requests(path: Path) -> list[tuple]:
    """``(id, body)`` for every non-empty line; UserError naming the line for bad JSON, ids or duplicates."""
    if not path.is_file():
        raise UserError(f"input file not found: {path}")
    requests, first_line = [], {}
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                body = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: not valid JSON ({err})") from None
            if not isinstance(body, dict):
                raise UserError(f"{path}:{number}: each line must be a JSON object (a request body)")
            ident = body.get("id")
            if isinstance(ident, bool) or not isinstance(ident, (str, int)):
                raise UserError(f"{path}:{number}: the request needs an \"id\" (a string or an integer)")
            if key(ident) in first_line:
                raise UserError(f"{path}:{number}: id {ident!r} already appears on line {first_line[key(ident)]}")
            first_line[key(ident)] = number
            requests.append((ident, body))
    return requests


def read_ids(path: Path) -> list[str]:
    """Keys of the ids of the whole lines of a results file (a torn last line is not counted)."""
    if not path.is_file():
        return []
    ids = []
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                ids.append(key(json.loads(line)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                continue
    return ids


def repair_tail(path: Path) -> None:
    """Cut a torn last line (no newline: the writer was killed mid-write) off the file we append to."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def append_line(fd: int, record: dict) -> None:
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    while data:
        data = data[os.write(fd, data):]


def part_path(output: Path, rank: int) -> Path:
    return output.with_name(f"{output.name}.part-{rank}")


def part_files(output: Path) -> list[Path]:
    prefix = f"{output.name}.part-"
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if p.name.startswith(prefix) and p.name[len(prefix):].isdigit())


def merge_parts(output: Path) -> None:
    """Append the part files' results whose ids OUTPUT lacks, then delete the parts."""
    parts = part_files(output)
    if not parts:
        return
    repair_tail(output)
    have = set(read_ids(output))
    fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for part in parts:
            with part.open("rb") as f:
                for line in f:
                    if not line.endswith(b"\n"):
                        break
                    try:
                        record = json.loads(line)
                        ident = key(record["id"])
                    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                        continue
                    if ident not in have:
                        append_line(fd, record)
                        have.add(ident)
        os.fsync(fd)
    finally:
        os.close(fd)
    for part in parts:
        part.unlink()


def _barrier() -> None:
    """Wait for every rank (torchrun's environment; gloo, so it works without GPUs)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(days=1))
    dist.barrier()
    dist.destroy_process_group()
