"""Bad requests: each gets OpenAI's error JSON with the right status and a message naming the problem,
and the server goes on answering normal requests."""

import base64
import functools
import http.server
import io
import json
import struct
import threading
import zlib

import httpx
import pytest
from engine_helpers import build_checkpoint, write_image
from PIL import Image
from serve_helpers import ServerThread, data_url

from qwen2vl.cli import main as cli_main
from qwen2vl.generation.engine import Engine
from qwen2vl.serve.app import ServeSettings, create_app

MAX_BODY = 1 << 20


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_errors")
    build_checkpoint(root / "model")
    (root / "media").mkdir()
    write_image(root / "media" / "ok.png", (64, 48))
    write_image(root / "secret.png", (64, 48))
    (root / "media" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x17" * 300)
    return root


@pytest.fixture(scope="module")
def server(root):
    engine = Engine.from_pretrained(root / "model")
    settings = ServeSettings(model_name="tiny", max_batch=4, max_media_items=3, max_request_bytes=MAX_BODY,
                             allowed_media_dir=str(root / "media"), max_image_pixels=1_000_000)
    with ServerThread(create_app(engine, settings)) as server:
        yield server


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (never decoded by a careful server)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def b64(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def msg(*parts):
    return {"messages": [{"role": "user", "content": list(parts)}], "max_tokens": 2}


def image(url, **options):
    return {"type": "image_url", "image_url": {"url": url}, **options}


TEXT = {"type": "text", "text": "hi"}
OK = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def with_(**fields):
    return {**OK, **fields}


def png_bytes(size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


# (name, body: dict or raw bytes, status, code, a phrase the message must contain)
CASES = [
    ("not json", b"{not json", 400, "invalid_json", "not valid JSON"),
    ("empty body", b"", 400, "invalid_json", "not valid JSON"),
    ("not utf-8", b"\xff\xfe{", 400, "invalid_json", "not valid JSON"),
    ("json array", b"[1, 2]", 422, "invalid_type", "must be a JSON object"),
    ("missing messages", {"max_tokens": 3}, 422, "missing_field", "messages is required"),
    ("messages not a list", {"messages": "hi"}, 422, "invalid_type", "messages must be a list"),
    ("empty messages", {"messages": []}, 400, "invalid_value", "must not be empty"),
    ("message not an object", {"messages": ["hi"]}, 422, "invalid_type", "messages[0] must be an object"),
    ("missing role", {"messages": [{"content": "hi"}]}, 422, "missing_field", "messages[0].role is required"),
    ("role not a string", {"messages": [{"role": 3, "content": "hi"}]}, 400, "invalid_value", "role must be 'system'"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value", "'wizard'"),
    ("user without content", {"messages": [{"role": "user"}]}, 422, "missing_field", "content is required"),
    ("content a number", {"messages": [{"role": "user", "content": 5}]}, 422, "invalid_type", "content must be"),
    ("part not an object", msg("hi"), 422, "invalid_type", "content[0] must be an object"),
    ("part without type", msg({"text": "hi"}), 422, "missing_field", "content[0].type is required"),
    ("unknown part type", msg({"type": "audio", "audio": "x"}), 400, "unknown_part_type", "unknown type 'audio'"),
    ("text not a string", msg({"type": "text", "text": ["a"]}), 422, "invalid_type", "text must be a string"),
    ("image_url missing", msg({"type": "image_url"}), 422, "missing_field", "content[0].image_url is required"),
    ("image_url without url", msg({"type": "image_url", "image_url": {}}), 422, "missing_field", "url is required"),
    ("url not a string", msg(image(42)), 422, "invalid_type", "must be a string"),
    ("invalid base64", msg(image("data:image/png;base64,@@@not-base64@@@")), 400, "invalid_media", "invalid base64"),
    ("data url without base64", msg(image("data:image/png,abc")), 400, "invalid_media", "data URL must be"),
    ("undecodable image", msg(image(b64(b"this is not an image at all"))), 400, "invalid_media", "cannot decode image"),
    ("truncated png", msg(image(b64(png_bytes()[:40])), TEXT), 400, "invalid_media", "cannot decode image"),
    ("decompression bomb", msg(image(b64(png_bomb()))), 413, "image_too_large", "too large"),
    ("image over the pixel cap", msg(image(b64(png_bomb(2000, 1000)))), 413, "image_too_large",
     "over the limit of 1000000"),
    ("local file outside the media dir", msg({"type": "image", "image": "../secret.png"}), 403, "media_not_allowed",
     "outside the allowed media directory"),
    ("absolute path outside", msg({"type": "image", "image": "/etc/passwd"}), 403, "media_not_allowed",
     "outside the allowed media directory"),
    ("file url outside", msg(image("file:///etc/hostname")), 403, "media_not_allowed", "outside"),
    ("missing local file", msg({"type": "image", "image": "nope.png"}), 400, "media_not_found", "file not found"),
    ("remote url not allowed", msg(image("https://example.com/cat.png")), 403, "remote_media_disabled",
     "--allow-remote-media"),
    ("unsupported scheme", msg(image("ftp://example.com/cat.png")), 400, "invalid_value", "unsupported URL scheme"),
    ("undecodable video", msg({"type": "video", "video": "broken.mp4"}, TEXT), 400, "invalid_media", "video 1"),
    ("empty frame list", msg({"type": "video", "video": []}), 400, "invalid_value", "empty list of frames"),
    ("too many media items", msg(*[{"type": "image", "image": "ok.png"}] * 4), 413, "too_many_media_items",
     "over the limit of 3"),
    ("media option mistyped", msg(image(b64(png_bytes()), max_pixels="big")), 422, "invalid_type",
     "max_pixels must be a number"),
    ("media option negative", msg(image(b64(png_bytes()), max_pixels=-5)), 400, "invalid_value", "max_pixels must be > 0"),
    ("min above max pixels", msg(image(b64(png_bytes()), min_pixels=9000, max_pixels=4000)), 400, "invalid_media",
     "above max_pixels"),
    ("placeholder in text", msg({"type": "text", "text": "<|image_pad|>"}), 400, "invalid_media", "<|image_pad|>"),
    ("prompt over the context", with_(messages=[{"role": "user", "content": "word " * 6000}]), 400,
     "context_length_exceeded", "over the budget"),
    ("max_tokens over the context", with_(max_tokens=5000), 400, "context_length_exceeded", "no room for a prompt"),
    ("max_tokens zero", with_(max_tokens=0), 400, "invalid_value", "max_tokens must be >= 1, got 0"),
    ("max_tokens a string", with_(max_tokens="10"), 422, "invalid_type", "max_tokens must be an integer"),
    ("max_tokens a float", with_(max_tokens=2.5), 422, "invalid_type", "max_tokens must be an integer"),
    ("negative temperature", with_(temperature=-1), 400, "invalid_value", "temperature must be >= 0"),
    ("temperature NaN", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
     "invalid_value", "finite"),
    ("temperature a string", with_(temperature="hot"), 422, "invalid_type", "temperature must be a number"),
    ("top_p zero", with_(top_p=0), 400, "invalid_value", "top_p must be > 0"),
    ("top_p above one", with_(top_p=1.5), 400, "invalid_value", "top_p"),
    ("top_k below -1", with_(top_k=-3), 400, "invalid_value", "top_k"),
    ("top_k a float", with_(top_k=1.5), 422, "invalid_type", "top_k must be an integer"),
    ("repetition_penalty zero", with_(repetition_penalty=0), 400, "invalid_value", "repetition_penalty"),
    ("seed a string", with_(seed="x"), 422, "invalid_type", "seed must be an integer"),
    ("stop a number", with_(stop=5), 422, "invalid_type", "stop must be a string or a list"),
    ("empty stop string", with_(stop=[""]), 400, "invalid_value", "must not be empty"),
    ("n over the limit", with_(n=17), 400, "invalid_value", "n must be <= 16"),
    ("stream not a bool", with_(stream="yes"), 422, "invalid_type", "stream must be true or false"),
    ("tool_choice required without tools", with_(tool_choice="required"), 400, "invalid_value", "needs tools"),
    ("logit_bias unsupported", with_(logit_bias={"5": 1.0}), 400, "unsupported_parameter", "logit_bias"),
    ("frequency penalty", with_(frequency_penalty=0.5), 400, "invalid_value", "use repetition_penalty"),
    ("unknown model", with_(model="gpt-4"), 404, "model_not_found", "'gpt-4'"),
    # the holes of issue 13
    ("100k-deep nested JSON", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "invalid_json",
     "recursion limit"),
    ("deep JSON in an unknown field", b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b', "messages": []}', 400,
     "invalid_json", "recursion limit"),
    ("Infinity in min_pixels", b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": '
     b'{"url": "ok.png"}, "min_pixels": Infinity}]}]}', 400, "invalid_value", "min_pixels must be a finite number"),
    ("NaN in nframes", b'{"messages": [{"role": "user", "content": [{"type": "video", "video": "a.mp4", '
     b'"nframes": NaN}]}]}', 422, "invalid_type", "nframes must be an integer"),
    ("NaN in max_pixels", b'{"messages": [{"role": "user", "content": "hi"}], "max_pixels": NaN}', 400,
     "invalid_value", "max_pixels must be a finite number"),
    ("number too big for a float", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 1e400}', 400,
     "invalid_value", "top_p must be a finite number"),
    ("lone surrogate in text", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "invalid_json",
     "not valid JSON"),
    ("NUL byte in a path", msg({"type": "image", "image": "ok.png\x00.txt"}), 400, "invalid_value",
     "NUL character"),
    ("upper-case remote scheme", msg(image("HTTP://127.0.0.1:9/cat.png")), 403, "remote_media_disabled",
     "--allow-remote-media"),
    ("remote URL on a non-HTTP port", msg(image("http://127.0.0.1:22/x.png")), 403, "remote_media_disabled",
     "--allow-remote-media"),
    ("temperature 1e6", with_(temperature=1e6), 400, "invalid_value", "temperature must be <= 2"),
    ("top_k 1e12", with_(top_k=10 ** 12), 400, "invalid_value", "top_k must be <= 1048576"),
    ("repetition_penalty 1e300", with_(repetition_penalty=1e300), 400, "invalid_value",
     "repetition_penalty must be <= 10"),
    ("seed over int64", with_(seed=2 ** 64), 400, "invalid_value", "seed must be <="),
    ("top_logprobs without logprobs", with_(top_logprobs=3), 400, "invalid_value", "needs logprobs"),
    ("top_logprobs over 20", with_(logprobs=True, top_logprobs=21), 400, "invalid_value", "top_logprobs"),
    ("json_schema without a schema", with_(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
     400, "missing_field", "json_schema.schema is required"),
    ("unknown response_format", with_(response_format={"type": "yaml"}), 400, "invalid_value",
     "response_format.type"),
    ("too many stop strings", with_(stop=["a"] * 17), 400, "invalid_value", "over the limit of 16"),
    ("a stop string too long", with_(stop="x" * 5000), 400, "invalid_value", "longer than 4096 characters"),
    ("stop_token_ids negative", with_(stop_token_ids=[-1]), 400, "invalid_value", "stop_token_ids[0]"),
    ("min_tokens negative", with_(min_tokens=-1), 400, "invalid_value", "min_tokens must be >= 0"),
    ("body too large", {"messages": [{"role": "user", "content": "x" * (MAX_BODY + 10)}]}, 413, "request_too_large",
     "over the limit"),
]


@pytest.mark.parametrize("name,body,status,code,phrase", CASES, ids=[c[0] for c in CASES])
def test_bad_request(server, name, body, status, code, phrase):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert phrase in error["message"]
    assert error["type"] == {403: "permission_error", 404: "not_found_error"}.get(status, "invalid_request_error")


# null means absent; [] and {} mean none; OpenAI's unused fields and vLLM's extras are accepted
ACCEPTED = [
    with_(tools=None, tool_choice=None, response_format=None, top_logprobs=None, logit_bias=None, stop=None,
          seed=None, temperature=None, stream_options=None, user=None, n=None, stream=None, logprobs=None),
    with_(tools=[], logit_bias={}, tool_choice="none", frequency_penalty=0, presence_penalty=0.0),
    with_(min_tokens=1, stop_token_ids=[5], skip_special_tokens=False, ignore_eos=True, top_k=-1,
          chat_template_kwargs={"enable_thinking": False}, add_generation_prompt=True, priority=0,
          store=False, metadata={"a": "b"}, parallel_tool_calls=True, temprature=0.5, best_of=None,
          max_completion_tokens=2),
    with_(messages=[{"role": "system", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "u"},
                    {"role": "assistant", "content": None}, {"role": "user", "content": "again"}]),
]


@pytest.mark.parametrize("body", ACCEPTED, ids=["nulls", "empty tools and logit_bias", "vllm extras", "messages"])
def test_absent_empty_and_extra_fields_are_accepted(server, body):
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_other_routes_and_methods_answer_in_openai_json(server):
    r = httpx.get(f"{server.url}/v1/chat/completions")
    assert r.status_code == 405 and "message" in r.json()["error"]
    r = httpx.get(f"{server.url}/v1/nothing-here")
    assert r.status_code == 404 and "message" in r.json()["error"]


def test_server_still_answers_after_the_bad_requests(root, server):
    health = server.health()
    assert health["status"] == "ok" and health["active"] == health["waiting"] == health["reserved"] == 0
    body = {"messages": [{"role": "user", "content": [image(data_url(root / "media" / "ok.png", "image/png")),
                                                      {"type": "image", "image": "ok.png"}, TEXT]}],
            "max_tokens": 4, "stream": True}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    r = httpx.post(f"{server.url}/v1/chat/completions", json=OK, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_remote_media_when_allowed_with_a_size_cap(root, tmp_path):
    """--allow-remote-media: a small image over http is fetched; one over --max-remote-mb is refused (413)."""
    (tmp_path / "small.png").write_bytes(png_bytes())
    (tmp_path / "big.png").write_bytes(png_bytes((64, 64)) + b"\0" * 4000)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    engine = Engine.from_pretrained(root / "model")
    settings = ServeSettings(model_name="tiny", allow_remote_media=True, max_remote_bytes=3000,
                             allow_private_media_addresses=True)
    try:
        with ServerThread(create_app(engine, settings)) as server:
            r = httpx.post(f"{server.url}/v1/chat/completions", json=msg(image(f"{base}/small.png"), TEXT), timeout=60)
            assert r.status_code == 200, r.text
            r = httpx.post(f"{server.url}/v1/chat/completions", json=msg(image(f"{base}/big.png"), TEXT), timeout=60)
            assert r.status_code == 413 and r.json()["error"]["code"] == "media_too_large"
            r = httpx.post(f"{server.url}/v1/chat/completions", json=msg(image(f"{base}/none.png"), TEXT), timeout=60)
            assert r.status_code == 400 and r.json()["error"]["code"] == "media_unreachable"
    finally:
        files.shutdown()


@pytest.mark.parametrize("args,phrase", [
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--allowed-media-dir", "/no/such/dir"], "is not a directory"),
    (["--port", "eighty"], "invalid int value"),
])
def test_serve_command_line_errors_are_one_line(root, capsys, args, phrase):
    assert cli_main(["serve", "--model", str(root / "model"), *args]) == 2
    assert phrase in capsys.readouterr().err


@pytest.mark.parametrize("name", ["over the budget of 3.png", "decompression bomb.png", "gone-byte limit.png"])
def test_status_comes_from_the_error_kind_not_from_words_in_a_file_name(tmp_path, monkeypatch, name):
    from qwen2vl.processing.sources import MediaAccess, MediaError, read_source
    from qwen2vl.serve.errors import media_error

    monkeypatch.chdir(tmp_path)
    with pytest.raises(MediaError) as caught:
        read_source(name, MediaAccess())
    error = media_error(caught.value)
    assert (error.status, error.code) == (400, "media_not_found")
    assert error.message == f"file not found: {name!r}"
