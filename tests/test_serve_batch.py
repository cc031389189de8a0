"""``qwen2vl batch``: results equal Engine.generate, bad requests become error lines, SIGKILL + resume gives
each id exactly once, torchrun sharding merges the ranks' part files."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engine_helpers import build_checkpoint, write_image

from qwen2vl.cli import main as cli_main
from qwen2vl.generation.engine import Engine
from qwen2vl.serve import batch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    build_checkpoint(root / "model")
    write_image(root / "a.png", (90, 70), seed=1)
    return root


@pytest.fixture(scope="module")
def engine(root):
    return Engine.from_pretrained(root / "model")


def request(i, max_tokens=4, **extra):
    return {"id": f"r{i:03d}", "messages": [{"role": "user", "content": f"Question {i}: what about {i % 7}?"}],
            "max_tokens": max_tokens, **extra}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def subprocess_env() -> dict:
    # one thread: a tiny model gains nothing from two, and on a busy machine two threads that wait
    # for each other make every step many times slower
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run_batch(*args) -> subprocess.Popen:
    env = subprocess_env()
    return subprocess.Popen([sys.executable, "-m", "qwen2vl", "batch", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_results_match_engine_and_errors_are_lines(root, engine, tmp_path):
    image = {"type": "image_url", "image_url": {"url": str(root / "a.png")}, "max_pixels": 3136}
    rows = [request(0, max_tokens=6),
            {"id": 7, "messages": [{"role": "user", "content": [image, {"type": "text", "text": "What?"}]}],
             "max_tokens": 5, "temperature": 0.9, "seed": 3},
            {**request(2), "temperature": -1},
            {"id": "bad-image", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert cli_main(["batch", "--input", str(src), "--output", str(out), "--model", str(root / "model"),
                     "--quiet"]) == 0
    results = {r["id"]: r for r in read_jsonl(out)}
    assert sorted(results, key=str) == sorted([r["id"] for r in rows], key=str)
    for row in rows[:2]:
        conversation = [{"role": "user", "content": row["messages"][0]["content"]}]
        if isinstance(conversation[0]["content"], list):
            conversation[0]["content"] = [{"type": "image", "image": str(root / "a.png"), "max_pixels": 3136},
                                          {"type": "text", "text": "What?"}]
        want = engine.generate([conversation], max_new_tokens=row["max_tokens"], temperature=row.get("temperature"),
                               seed=row.get("seed"))[0]
        got = results[row["id"]]["response"]
        assert got["object"] == "chat.completion"
        assert got["choices"][0]["message"]["content"] == want.text
        assert got["usage"]["completion_tokens"] == want.completion_tokens
    assert results["r002"]["status"] == 400 and "temperature" in results["r002"]["error"]["message"]
    assert results["bad-image"]["status"] == 400 and "image 1" in results["bad-image"]["error"]["message"]
    # a second run finds nothing left to do and leaves the file as it was
    before = out.read_text()
    assert cli_main(["batch", "--input", str(src), "--output", str(out), "--model", str(root / "model"),
                     "--quiet"]) == 0
    assert out.read_text() == before


def test_choices_logprobs_and_structured_output(root, engine, tmp_path):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    rows = [{**request(0, max_tokens=6), "n": 2, "temperature": 1.0, "seed": 5},
            {**request(1, max_tokens=3), "logprobs": True, "top_logprobs": 2},
            {**request(2, max_tokens=24), "response_format": {"type": "json_schema",
                                                                "json_schema": {"name": "x", "schema": schema}}}]
    out = tmp_path / "out.jsonl"
    assert cli_main(["batch", "--input", str(write_jsonl(tmp_path / "in.jsonl", rows)), "--output", str(out),
                     "--model", str(root / "model"), "--quiet"]) == 0
    results = {r["id"]: r["response"] for r in read_jsonl(out)}
    conversation = [{"role": "user", "content": rows[0]["messages"][0]["content"]}]
    choices = results["r000"]["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for choice, seed in zip(choices, (5, 6)):  # choice i samples with seed + i
        want = engine.generate([conversation], max_new_tokens=6, temperature=1.0, seed=seed,
                               skip_special_tokens=True)[0]
        assert choice["message"]["content"] == want.text
    assert results["r000"]["usage"]["completion_tokens"] == 12
    content = results["r001"]["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in content)
    answer = json.loads(results["r002"]["choices"][0]["message"]["content"])
    assert set(answer) == {"ok"} and isinstance(answer["ok"], bool)


@pytest.mark.parametrize("lines,phrase", [
    (['{"id": "a", "messages": []}', "{oops"], "in.jsonl:2: not valid JSON"),
    (['{"messages": []}'], "in.jsonl:1: the request needs an \"id\""),
    (['{"id": "a", "messages": []}', '{"id": "a", "messages": []}'], "id 'a' already appears on line 1"),
])
def test_bad_input_files_are_one_line_errors(root, tmp_path, capsys, lines, phrase):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    assert cli_main(["batch", "--input", str(src), "--output", str(tmp_path / "o.jsonl"),
                     "--model", str(root / "model")]) == 2
    assert phrase in capsys.readouterr().err


def test_sigkill_then_resume_gives_each_id_exactly_once(root, tmp_path):
    rows = [request(i, max_tokens=12, ignore_eos=True) for i in range(200)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    args = ["--input", src, "--output", out, "--model", root / "model", "--max-batch", "8", "--quiet"]
    proc = run_batch(*args)
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_text().count("\n") >= 20):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = read_jsonl(out)
    assert 20 <= len(written) < 200
    with out.open("a") as f:  # as if the kill had torn the last line in the middle of a write
        f.write('{"id": "r199", "response": {"trunc')

    resumed = run_batch(*args)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    ids = [r["id"] for r in read_jsonl(out)]
    assert sorted(ids) == [r["id"] for r in rows]  # every id, each exactly once
    assert ids[:len(written)] == [r["id"] for r in written]  # the first run's lines were kept, not redone
    assert all(r["response"]["usage"]["completion_tokens"] == 12 for r in read_jsonl(out))


def test_torchrun_shards_and_merges(root, tmp_path):
    rows = [request(i) for i in range(24)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = subprocess_env()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "qwen2vl", "batch",
                           "--input", str(src), "--output", str(out), "--model", str(root / "model"), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(r["id"] for r in read_jsonl(out)) == [r["id"] for r in rows]
    assert batch.part_files(out) == []


def test_leftover_part_files_count_as_done_and_are_merged(root, tmp_path):
    """A sharded run killed before its merge: the next run (one process) keeps the parts' results."""
    rows = [request(i) for i in range(6)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    marker = {"id": "r001", "response": {"marker": "from part 0"}}
    (tmp_path / "out.jsonl.part-0").write_text(json.dumps(marker) + "\n" + '{"id": "r003", "resp')
    (tmp_path / "out.jsonl.part-1").write_text(json.dumps({"id": "r004", "response": {"marker": 1}}) + "\n")
    assert cli_main(["batch", "--input", str(src), "--output", str(out), "--model", str(root / "model"),
                     "--quiet"]) == 0
    results = read_jsonl(out)
    assert sorted(r["id"] for r in results) == [r["id"] for r in rows]
    by_id = {r["id"]: r for r in results}
    assert by_id["r001"] == marker and by_id["r004"]["response"] == {"marker": 1}  # not redone
    assert by_id["r003"]["response"]["object"] == "chat.completion"  # its torn line did not count
    assert batch.part_files(out) == []
