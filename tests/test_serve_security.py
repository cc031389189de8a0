"""Server security: SSRF (a recording HTTP server of the test's own on loopback), redirects, DNS, slow
senders, video pixel bombs, CSRF (content type, origin), API keys, leaks, and /health while a 20 MB
request is refused. Every case ends with the server still answering a normal request."""

import base64
import http.server
import io
import json
import socket
import threading

import av
import httpx
import numpy as np
import pytest
from engine_helpers import build_checkpoint, write_image, write_video
from PIL import Image
from serve_helpers import ServerThread, data_url

from qwen2vl.generation.engine import Engine
from qwen2vl.serve import protocol
from qwen2vl.serve.app import ServeSettings, create_app
from qwen2vl.serve.errors import UNREACHABLE

OK = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 10)).save(buffer, "PNG")
    return buffer.getvalue()


class Recorder:
    """A loopback HTTP server that records every request path; ``/img.png`` is an image, ``/to?u=URL``
    redirects to URL, ``/drip`` sends a byte every 0.2 s (30 bytes at most), ``/hold`` answers the
    image once ``release`` is set (60 s at most), anything else is 404."""

    def __init__(self):
        self.paths: list[str] = []
        self.dripped = 0
        self.release, self.held = threading.Event(), threading.Event()
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                recorder.paths.append(self.path)
                if self.path == "/hold":
                    recorder.held.set()
                    recorder.release.wait(60)
                    self.path = "/img.png"
                if self.path == "/img.png":
                    body = png()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif self.path.startswith("/to?u="):
                    self.send_response(302)
                    self.send_header("Location", self.path[len("/to?u="):])
                    self.end_headers()
                elif self.path == "/drip":
                    self.send_response(200)
                    self.end_headers()
                    for _ in range(30):
                        try:
                            self.wfile.write(b"x")
                            self.wfile.flush()
                        except OSError:
                            return
                        recorder.dripped += 1
                        threading.Event().wait(0.2)
                else:
                    self.send_error(404)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_security")
    build_checkpoint(root / "model")
    (root / "media").mkdir()
    write_image(root / "media" / "ok.png", (64, 48))
    (root / "media" / "notes.txt").write_text("not an image")
    write_video(root / "media" / "clip.mp4")
    return root


@pytest.fixture(scope="module")
def engine(root):
    return Engine.from_pretrained(root / "model")


@pytest.fixture(scope="module")
def recorder():
    recorder = Recorder()
    yield recorder
    recorder.close()


def serve(engine, **settings):
    return ServerThread(create_app(engine, ServeSettings(model_name="tiny", **settings)))


def image_body(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "hi"}]}], "max_tokens": 2}


def post(server, body, **kwargs):
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60, **kwargs)


def still_answers(server):
    r = post(server, OK)
    assert r.status_code == 200, r.text


def test_ssrf_loopback_in_any_spelling_never_reaches_the_host(engine, recorder):
    """Remote media on, private addresses not allowed: no spelling of loopback gets a request through."""
    spellings = [f"http://127.0.0.1:{recorder.port}/img.png", f"http://localhost:{recorder.port}/img.png",
                 f"http://127.1:{recorder.port}/img.png", f"http://2130706433:{recorder.port}/img.png",
                 f"HTTP://127.0.0.1:{recorder.port}/img.png", f"http://[::ffff:127.0.0.1]:{recorder.port}/img.png",
                 f"http://0x7f.0.0.1:{recorder.port}/img.png"]
    before = len(recorder.paths)
    with serve(engine, allow_remote_media=True) as server:
        messages = set()
        for url in spellings:
            r = post(server, image_body(url))
            assert r.status_code == 400, (url, r.text)
            messages.add(r.json()["error"]["message"])
        # a closed port and a silent host read the same as a refused private address
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        r = post(server, image_body(f"http://127.0.0.1:{port}/x.png"))
        messages.add(r.json()["error"]["message"])
        assert messages == {f"image 1 (message 0, part 0): {UNREACHABLE}"}
        still_answers(server)
    assert len(recorder.paths) == before


def test_private_addresses_when_allowed_and_redirects_rechecked(engine, recorder):
    with serve(engine, allow_remote_media=True, allow_private_media_addresses=True) as server:
        r = post(server, image_body(f"{recorder.url}/img.png"))
        assert r.status_code == 200, r.text
        # a redirect to a non-http scheme is refused (the direct URL is refused too)
        before = list(recorder.paths)
        r = post(server, image_body(f"{recorder.url}/to?u=ftp://127.0.0.1:{recorder.port}/img.png"))
        assert r.status_code == 400 and r.json()["error"]["code"] == "media_unreachable"
        assert recorder.paths[len(before):] == [f"/to?u=ftp://127.0.0.1:{recorder.port}/img.png"]
        # a redirect to an allowed http URL is followed
        r = post(server, image_body(f"{recorder.url}/to?u={recorder.url}/img.png"))
        assert r.status_code == 200, r.text
        still_answers(server)


def test_failed_downloads_read_the_same_whatever_answered(engine, recorder):
    """A closed port, a port that accepts and never answers, an SSH-like banner and a 404: one text."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    banner = socket.socket()
    banner.bind(("127.0.0.1", 0))
    banner.listen(8)

    def ssh():
        for _ in range(4):
            try:
                conn, _ = banner.accept()
            except OSError:
                return
            conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
            conn.close()

    threading.Thread(target=ssh, daemon=True).start()
    urls = [f"http://127.0.0.1:{closed_port}/a.png", f"http://127.0.0.1:{silent.getsockname()[1]}/a.png",
            f"http://127.0.0.1:{banner.getsockname()[1]}/a.png", f"{recorder.url}/missing.png"]
    try:
        with serve(engine, allow_remote_media=True, allow_private_media_addresses=True,
                   remote_timeout_s=1.0) as server:
            answers = [post(server, image_body(url)) for url in urls]
            assert {(r.status_code, r.json()["error"]["message"]) for r in answers} == \
                {(400, f"image 1 (message 0, part 0): {UNREACHABLE}")}
            r = post(server, image_body("http://127.0.0.1:99999/a.png"))
            assert r.status_code == 400 and "invalid port" in r.json()["error"]["message"]
            still_answers(server)
    finally:
        silent.close()
        banner.close()


def test_a_slow_download_does_not_hold_up_text_requests(engine, recorder):
    """The download waits (held by the recorder) on the media pool; a text request is answered meanwhile."""
    recorder.release.clear()
    recorder.held.clear()
    with serve(engine, allow_remote_media=True, allow_private_media_addresses=True, remote_timeout_s=60,
               prepare_workers=1) as server:
        answer = {}
        thread = threading.Thread(target=lambda: answer.update(r=post(server, image_body(f"{recorder.url}/hold"))))
        thread.start()
        try:
            assert recorder.held.wait(60)
            still_answers(server)
            assert not answer  # the download is still held
        finally:
            recorder.release.set()
            thread.join(60)
        assert answer["r"].status_code == 200, answer["r"].text


def test_redirect_and_dns_checked_on_the_address_connected_to(engine, recorder, monkeypatch):
    """``media.example`` is allowed by name, but resolves to loopback: refused. A public name that
    redirects to loopback is refused at the redirect. Nothing reaches the recorder."""
    real = socket.getaddrinfo

    def resolve(host, port, *args, **kwargs):
        if host in ("media.example", "public.example"):
            return real("127.0.0.1", port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    before = len(recorder.paths)
    with serve(engine, allow_remote_media=True, allowed_media_domains=("media.example",)) as server:
        r = post(server, image_body(f"http://media.example:{recorder.port}/img.png"))
        assert r.status_code == 400 and r.json()["error"]["code"] == "media_unreachable"
        r = post(server, image_body(f"http://elsewhere.example:{recorder.port}/img.png"))
        assert r.status_code == 403 and "not in the allowed media domains" in r.json()["error"]["message"]
        still_answers(server)
    assert len(recorder.paths) == before
    # allowed by name and (for this test) private addresses allowed: the redirect to another host is re-checked
    with serve(engine, allow_remote_media=True, allowed_media_domains=("public.example",),
               allow_private_media_addresses=True) as server:
        r = post(server, image_body(f"http://public.example:{recorder.port}/img.png"))
        assert r.status_code == 200, r.text
        r = post(server, image_body(f"http://public.example:{recorder.port}/to?u={recorder.url}/img.png"))
        assert r.status_code == 400 and r.json()["error"]["code"] == "media_unreachable"  # as for any failure
    assert recorder.paths[before:] == ["/img.png", f"/to?u={recorder.url}/img.png"]


def test_one_total_deadline_per_download(engine, recorder):
    """A server sending a byte every 0.2 s is cut off at the 1 s deadline, not after its 30 bytes."""
    with serve(engine, allow_remote_media=True, allow_private_media_addresses=True, remote_timeout_s=1.0) as server:
        r = post(server, image_body(f"{recorder.url}/drip"))
        assert r.status_code == 400 and r.json()["error"]["code"] == "media_unreachable"
        still_answers(server)
    assert recorder.dripped < 30


def bomb_video(size: int = 8192, frames: int = 2) -> bytes:
    """Black 8192x8192 frames in H.264: tens of KB, 200 MB per frame once decoded (the issue's case had 8)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=4)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast"}
        frame = av.VideoFrame.from_ndarray(np.zeros((size, size, 3), np.uint8), format="rgb24")
        for _ in range(frames):
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def test_video_decoded_pixel_budgets(root, engine):
    bomb = "data:video/mp4;base64," + base64.b64encode(bomb_video()).decode()
    clip = data_url(root / "media" / "clip.mp4", "video/mp4")  # 8 frames of 84x56

    def video(url, **options):
        return {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url},
                                                           **options}]}], "max_tokens": 2}

    with serve(engine, max_request_bytes=8 << 20) as server:
        r = post(server, video(bomb))
        assert r.status_code == 413, r.text
        assert "over the limit of 16777216 decoded pixels per frame" in r.json()["error"]["message"]
        still_answers(server)
    with serve(engine, max_video_pixels=4 * 84 * 56 + 1) as server:
        assert post(server, video(clip, nframes=4)).status_code == 200
        r = post(server, video(clip, nframes=6))
        assert r.status_code == 413 and "decoded pixels per video" in r.json()["error"]["message"]
        frames = [data_url(root / "media" / "ok.png", "image/png")] * 7  # 7 x 64x48 pixels
        r = post(server, {"messages": [{"role": "user", "content": [{"type": "video", "video": frames}]}],
                          "max_tokens": 2})
        assert r.status_code == 413 and "decoded pixels per video" in r.json()["error"]["message"]
        still_answers(server)


def test_a_container_with_too_many_frames_is_refused_while_probing(monkeypatch):
    from qwen2vl.processing import video

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
        for _ in range(40):
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    monkeypatch.setattr(video, "MAX_CONTAINER_FRAMES", 32)  # 13 bytes a frame: 64 MB could index 5 million
    with pytest.raises(video.MediaError, match="more than 32 frames") as caught:
        video.probe_video(buffer.getvalue(), "clip")
    assert caught.value.kind == "too_large"


def test_no_server_path_or_object_repr_in_errors(root, engine):
    media = str(root / "media")
    with serve(engine, allowed_media_dir=media) as server:
        for part in ({"type": "image", "image": "notes.txt"},
                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}},
                     {"type": "video", "video": "notes.txt"},
                     {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,aGVsbG8="}}):
            r = post(server, {"messages": [{"role": "user", "content": [part]}], "max_tokens": 2})
            assert r.status_code == 400, r.text
            message = r.json()["error"]["message"]
            assert media not in message and " at 0x" not in message and "BytesIO" not in message, message
        still_answers(server)


def test_csrf_json_only_and_origins(engine):
    with serve(engine) as server:
        url = f"{server.url}/v1/chat/completions"
        raw = json.dumps(OK)
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            headers = {"Content-Type": kind} if kind else {}
            r = httpx.post(url, content=raw, headers=headers, timeout=60)
            assert r.status_code == 415, (kind, r.text)
        evil = {"Origin": "http://evil.example", "Content-Type": "application/json"}
        r = httpx.post(url, content=raw, headers=evil, timeout=60)
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
        # DNS rebinding: same origin by name, but the name is not this server's address
        host = server.url.split("//")[1].replace("127.0.0.1", "rebind.example")
        r = httpx.post(url, content=raw, timeout=60, headers={"Origin": f"http://{host}", "Host": host,
                                                              "Content-Type": "application/json"})
        assert r.status_code == 403
        # the built-in page is same-origin
        r = httpx.post(url, content=raw, timeout=60, headers={"Origin": server.url, "Content-Type": "application/json"})
        assert r.status_code == 200, r.text
    with serve(engine, allowed_origins=("http://app.example:3000",), api_key="k") as server:
        origin = {"Origin": "http://app.example:3000"}
        preflight = httpx.options(f"{server.url}/v1/chat/completions", timeout=60, headers={
            **origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://app.example:3000"
        r = httpx.post(f"{server.url}/v1/chat/completions", json=OK, timeout=60,
                       headers={**origin, "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example:3000"


def test_api_key(engine):
    with serve(engine, api_key="sekrit") as server:
        assert post(server, OK).status_code == 401
        assert post(server, OK, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        r = post(server, OK, headers={"Authorization": "Bearer sekrit"})
        assert r.status_code == 200
        assert httpx.get(f"{server.url}/health").status_code == 200  # health and the page stay open
        assert httpx.get(f"{server.url}/").status_code == 200


def test_health_answers_while_a_20mb_request_is_refused(engine, monkeypatch):
    """The 20 MB prompt is checked on the worker pool; while it is there (held at a gate) /health answers."""
    gate, reached = threading.Event(), threading.Event()
    check = protocol.check_characters

    def gated(*args):
        reached.set()
        assert gate.wait(60)
        return check(*args)

    monkeypatch.setattr(protocol, "check_characters", gated)
    big = {"messages": [{"role": "user", "content": "hello " * 3_495_253}], "max_tokens": 2}
    with serve(engine) as server:
        answer = {}
        thread = threading.Thread(target=lambda: answer.update(r=post(server, big)))
        thread.start()
        assert reached.wait(60)
        health = httpx.get(f"{server.url}/health", timeout=10)
        assert health.status_code == 200 and health.json()["reserved"] == 1
        gate.set()
        thread.join(60)
        r = answer["r"]
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "characters of text" in r.json()["error"]["message"]
        still_answers(server)


def test_300k_one_character_messages_are_refused_by_count(engine):
    with serve(engine) as server:
        r = post(server, {"messages": [{"role": "user", "content": "a"}] * 300_000, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        assert "over the limit of 8192" in r.json()["error"]["message"]
        still_answers(server)


def test_preparation_deadline(engine, monkeypatch):
    with serve(engine, prepare_timeout_s=0.05) as server:
        check = protocol.check_characters
        monkeypatch.setattr(protocol, "check_characters",
                            lambda *args: (threading.Event().wait(0.2), check(*args)))
        r = post(server, OK)
        assert r.status_code == 408 and r.json()["error"]["code"] == "timeout"
        monkeypatch.setattr(protocol, "check_characters", check)
        server.wait_for(lambda h: h["reserved"] == 0)
