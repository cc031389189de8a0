"""`qwen2vl generate` and `qwen2vl chat`, run as commands."""

import json
import subprocess
import sys

import pytest
from engine_helpers import build_checkpoint, write_image, write_video

from qwen2vl.generation.cli import EMBEDDED_MODEL


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    build_checkpoint(root / "model")
    write_image(root / "cat.png")
    write_video(root / "clip.mp4")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return root


def qwen2vl(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "qwen2vl", *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=300)


def test_generate_json(files):
    out = qwen2vl("generate", "--model", files / "model", "--image", files / "cat.png", "--video", files / "clip.mp4",
                  "--prompt", "What do you see?", "--max-new-tokens", "8", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) >= {"text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens", "timings"}
    assert 1 <= result["completion_tokens"] == len(result["token_ids"]) <= 8
    assert result["finish_reason"] in ("stop", "length")


def test_generate_streams_the_same_text(files):
    args = ["generate", "--model", files / "model", "--image", files / "cat.png", "--prompt", "Hi",
            "--max-new-tokens", "12", "--temperature", "0.8", "--seed", "5"]
    streamed = qwen2vl(*args)
    as_json = json.loads(qwen2vl(*args, "--json").stdout)
    assert streamed.returncode == 0 and streamed.stdout == as_json["text"] + "\n"


@pytest.mark.parametrize("args, message", [
    (["--image", "missing.png"], "image file not found: missing.png"),
    (["--image", "{root}/broken.png"], "broken.png"),
    (["--image", "{root}/cat.png", "--max-pixels", "100000000", "--min-pixels", "90000000"], "budget"),
    (["--bogus-option"], "unrecognized arguments: --bogus-option"),
    (["--temperature", "-1"], "temperature must be >= 0"),
])
def test_bad_input_is_one_clear_line(files, args, message):
    args = [a.format(root=files) for a in args]
    out = qwen2vl("generate", "--model", files / "model", "--prompt", "Hi", *args)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in out.stderr, out.stderr


def test_missing_model_directory_is_one_line(files):
    out = qwen2vl("generate", "--model", files / "nowhere", "--prompt", "Hi")
    assert out.returncode != 0 and out.stderr.strip().count("\n") == 0 and "not found" in out.stderr


def test_default_model(files):
    out = qwen2vl("generate", "--prompt", "Hi", "--max-new-tokens", "4")
    if (EMBEDDED_MODEL / "config.json").is_file():
        assert out.returncode == 0, out.stderr
    else:
        assert out.returncode == 2 and "pass --model DIR" in out.stderr


def test_chat_session(files):
    script = f"/image {files / 'cat.png'}\nWhat is it?\nAnd now?\n/video {files / 'missing.mp4'}\n/quit\n"
    out = qwen2vl("chat", "--model", files / "model", "--max-new-tokens", "6", stdin=script)
    assert out.returncode == 0, out.stderr
    assert "[image attached" in out.stderr and "video file not found" in out.stderr
    assert len(out.stdout.splitlines()) == 2  # two answers


def test_unknown_verb_and_help():
    assert qwen2vl("frobnicate").returncode == 2
    out = qwen2vl("--help")
    assert out.returncode == 0 and "generate" in out.stdout


@pytest.mark.parametrize("verb", ["generate", "chat", "serve", "batch", "agent"])
def test_every_model_verb_takes_compile(verb):
    out = qwen2vl(verb, "--help")
    assert out.returncode == 0 and "--compile" in out.stdout, out.stderr


def test_load_engine_passes_compile(files):
    from qwen2vl.generation.cli import Parser, add_model_options, load_engine
    parser = Parser()
    add_model_options(parser)
    for flag in ([], ["--compile"]):
        engine = load_engine(parser.parse_args(["--model", str(files / "model"), "--device", "cpu", *flag]))
        assert engine.compile == bool(flag) and engine.static == bool(flag)  # compiled: one static decode shape


@pytest.mark.slow  # one torch.compile of the decode step: about 30 s
def test_compiled_decode_gives_the_same_tokens():
    """The embedded (trained) nano model, greedy: the compiled step picks the eager step's tokens."""
    if not (EMBEDDED_MODEL / "config.json").is_file():
        pytest.skip("embedded model not installed")
    args = ["generate", "--prompt", "Describe a red square.", "--max-new-tokens", "8", "--json"]
    eager = qwen2vl(*args)
    compiled = qwen2vl(*args, "--compile")
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr
    assert json.loads(compiled.stdout)["token_ids"] == json.loads(eager.stdout)["token_ids"]
