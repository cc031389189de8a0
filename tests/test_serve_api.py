"""The OpenAI-compatible server: the official client against Engine.generate, continuous batching under
32 concurrent streams, per-item media options, disconnects, the bounded queue; the scheduler directly."""

import asyncio
import json
import queue
import threading

import httpx
import openai
import pytest
from engine_helpers import build_checkpoint, write_image, write_video
from serve_helpers import ServerThread, data_url, sse_payloads

from qwen2vl.generation.engine import Engine
from qwen2vl.serve.app import ServeSettings, create_app
from qwen2vl.serve.scheduler import Job, Scheduler, SchedulerDown

MODEL = "tiny"
WORDS = ["apple", "river", "cloud", "stone", "violin", "garden", "rocket", "mirror"]


class GatedEngine(Engine):
    """An engine whose prefill waits while its gate is closed, to line requests up deterministically."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.at_gate = threading.Event()  # set once a prefill has reached the gate

    def prompts(self, *args, **kwargs):
        self.at_gate.set()
        assert self.gate.wait(60)
        return super().prompts(*args, **kwargs)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    build_checkpoint(root / "model")
    (root / "media").mkdir()
    write_image(root / "media" / "a.png", (90, 70), seed=1)
    write_image(root / "media" / "b.jpg", (60, 120), seed=2)
    write_video(root / "media" / "clip.mp4")
    return root


@pytest.fixture(scope="module")
def engine(root):
    return GatedEngine.from_pretrained(root / "model")


@pytest.fixture(scope="module")
def server(root, engine):
    settings = ServeSettings(model_name=MODEL, max_batch=16, max_queue=64, allowed_media_dir=str(root / "media"))
    with ServerThread(create_app(engine, settings)) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def text(t):
    return {"type": "text", "text": t}


def reference(engine, conversation, **kwargs):
    """The answer of Engine.generate, taken while the server is idle (the scheduler thread waits); the
    server hides every special token by default (vLLM's skip_special_tokens=true)."""
    kwargs.setdefault("skip_special_tokens", True)
    return engine.generate([conversation], **kwargs)[0]


def ask(client, conversation, stream, **kwargs):
    """(text, finish_reason, usage) from the official client, streaming or not."""
    if not stream:
        r = client.chat.completions.create(model=MODEL, messages=conversation, **kwargs)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(model=MODEL, messages=conversation, stream=True,
                                                stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(pieces), finish, usage


@pytest.mark.parametrize("stream", [False, True])
def test_openai_client_matches_engine_generate(root, engine, client, stream):
    image = data_url(root / "media" / "a.png", "image/png")
    video = data_url(root / "media" / "clip.mp4", "video/mp4")
    cases = [
        # (sent to the server, the same conversation for Engine.generate)
        (user(text("Describe a sunny day.")), user(text("Describe a sunny day."))),
        (user({"type": "image_url", "image_url": {"url": image}}, text("What is in the picture?")),
         user({"type": "image", "image": str(root / "media" / "a.png")}, text("What is in the picture?"))),
        (user({"type": "video_url", "video_url": {"url": video}, "max_frames": 4}, text("What happens?")),
         user({"type": "video", "video": str(root / "media" / "clip.mp4"), "max_frames": 4}, text("What happens?"))),
        (user({"type": "video", "video": "clip.mp4", "fps": 2}, {"type": "image", "image": "a.png"}, text("Both?")),
         user({"type": "video", "video": str(root / "media" / "clip.mp4"), "fps": 2},
              {"type": "image", "image": str(root / "media" / "a.png")}, text("Both?"))),
    ]
    for sent, local in cases:
        expected = reference(engine, local, max_new_tokens=14)
        answer, finish, usage = ask(client, sent, stream, max_tokens=14)
        assert answer == expected.text
        assert finish == expected.finish_reason
        assert (usage.prompt_tokens, usage.completion_tokens) == (expected.prompt_tokens, expected.completion_tokens)
    # sampling values pass through: seeded sampling with a stop string and a repetition penalty
    conversation = user(text("Tell me a story."))
    options = dict(temperature=1.3, top_p=0.9, seed=7, stop=["e"])
    expected = reference(engine, conversation, max_new_tokens=20, top_k=50, repetition_penalty=1.2, **options)
    answer, finish, _ = ask(client, conversation, stream, max_tokens=20,
                            extra_body={"top_k": 50, "repetition_penalty": 1.2}, **options)
    assert (answer, finish) == (expected.text, expected.finish_reason)


def test_per_item_and_per_request_pixel_budgets(root, client):
    image = data_url(root / "media" / "b.jpg", "image/jpeg")

    def prompt_tokens(part_options=None, **request):
        part = {"type": "image_url", "image_url": {"url": image}, **(part_options or {})}
        r = client.chat.completions.create(model=MODEL, messages=user(part, text("Hi")), max_tokens=1,
                                           extra_body=request or None)
        return r.usage.prompt_tokens

    base = prompt_tokens()  # 60x120 -> 56x112 (preprocessor min/max pixels), 8 image tokens
    assert prompt_tokens({"min_pixels": 112 * 224}) == base + 24  # 112x224 -> 32 tokens
    assert prompt_tokens(max_pixels=112 * 224, min_pixels=112 * 224) == base + 24  # request-wide default
    # the item's own value wins over the request's: 56x28 -> 2 tokens
    assert prompt_tokens({"min_pixels": 784, "max_pixels": 3136}, min_pixels=112 * 224, max_pixels=112 * 224) == base - 6


def test_stream_format_and_models(server):
    """Usage exactly once, as OpenAI sends it: only when asked, on a last chunk with no choices (every
    other chunk then says ``"usage": null``); never on the finish chunk."""
    for asked in (False, True):
        body = {"model": MODEL, "messages": user(text("Hello")), "max_tokens": 5, "stream": True}
        if asked:
            body["stream_options"] = {"include_usage": True}
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        payloads = sse_payloads(r.text)
        assert payloads[-1] == "[DONE]"
        chunks = [json.loads(p) for p in payloads[:-1]]
        assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        with_usage = [c for c in chunks if c.get("usage")]
        finish = chunks[-2] if asked else chunks[-1]
        assert finish["choices"][0]["finish_reason"] in ("stop", "length")
        if not asked:
            assert with_usage == [] and all("usage" not in c for c in chunks)
            continue
        assert with_usage == [chunks[-1]] and chunks[-1]["choices"] == []
        assert all(c["usage"] is None for c in chunks[:-1])
        counts = chunks[-1]["usage"]
        assert counts["total_tokens"] == counts["prompt_tokens"] + counts["completion_tokens"]
    models = httpx.get(f"{server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]


def test_32_concurrent_streams_each_equal_to_its_single_answer(engine, server):
    """Continuous batching: 32 streams, 16 rows, prompts and lengths differ so rows join and leave
    between steps; every answer equals the request's answer alone (greedy) and nothing is lost."""
    prompts = [f"Request {i}: say something about the {WORDS[i % 8]} and the number {i * 7}." for i in range(32)]
    lengths = [3 + (i * 5) % 13 for i in range(32)]
    expected = [reference(engine, user(text(p)), max_new_tokens=n, stop_token_ids=[])
                for p, n in zip(prompts, lengths)]
    before = server.health()

    async def one(client, i):
        body = {"model": MODEL, "messages": user(text(prompts[i])), "max_tokens": lengths[i], "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            payloads = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
        assert payloads[-1] == "[DONE]"
        chunks = [json.loads(p) for p in payloads[:-1]]
        pieces = [c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]]
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
        return "".join(pieces), finish, chunks[-1]["usage"]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            engine.gate.clear()  # the first request holds the model in its prefill until all 32 are queued
            streams = [asyncio.create_task(one(client, i)) for i in range(32)]
            try:
                await asyncio.to_thread(server.wait_for, lambda h: h["admitting"] + h["waiting"] == 32)
            finally:
                engine.gate.set()
            return await asyncio.gather(*streams)

    results = asyncio.run(main())
    for (answer, finish, usage), want in zip(results, expected):
        assert answer == want.text
        assert finish == "length" and usage["completion_tokens"] == want.completion_tokens
    after = server.health()
    assert after["completed"] - before["completed"] == 32
    assert after["peak_batch"] == 16  # 1 row, then 15 more joined it between two steps
    assert after["active"] == after["waiting"] == 0


def test_disconnect_frees_the_row_at_once(server):
    before = server.health()
    body = {"messages": user(text("Go on and on.")), "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        seen = [next(lines) for _ in range(6)]  # a few chunks of a 3000-token answer, then hang up
    assert any('"content"' in line for line in seen)
    after = server.wait_for(lambda h: h["active"] == 0 and h["cancelled"] > before["cancelled"])
    assert after["completed"] == before["completed"]  # freed, not run to its 3000 tokens
    assert after["generated_tokens"] - before["generated_tokens"] < 3000
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": user(text("Hi")), "max_tokens": 3},
                   timeout=60)
    assert r.status_code == 200


def test_full_queue_answers_429_and_recovers(root):
    engine = GatedEngine.from_pretrained(root / "model")
    engine.gate.clear()
    settings = ServeSettings(model_name=MODEL, max_batch=1, max_queue=2)
    body = {"messages": user(text("Hi")), "max_tokens": 3}
    with ServerThread(create_app(engine, settings)) as server:
        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                first = asyncio.create_task(client.post("/v1/chat/completions", json=body))
                assert await asyncio.to_thread(engine.at_gate.wait, 60)  # the first request holds the only row
                queued = [asyncio.create_task(client.post("/v1/chat/completions", json=body)) for _ in range(2)]
                await asyncio.to_thread(server.wait_for, lambda h: h["waiting"] == 2)
                refused = await client.post("/v1/chat/completions", json=body)
                engine.gate.set()
                return refused, await asyncio.gather(first, *queued)

        refused, served = asyncio.run(main())
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "queue_full" and "retry" in refused.json()["error"]["message"]
    assert [r.status_code for r in served] == [200, 200, 200]


def test_scheduler_rows_are_independent_of_their_batch_mates(root, engine):
    """Seeded sampling, images and videos (rows with different rope deltas), rows joining and leaving:
    each job's tokens equal Engine.generate's for that request alone."""
    media = root / "media"
    conversations = [
        user({"type": "image", "image": str(media / "a.png")}, text("What is this?")),
        user(text("Tell me a long story about a cat.")),
        user({"type": "video", "video": str(media / "clip.mp4"), "nframes": 4}, text("What happens?")),
        user({"type": "image", "image": str(media / "b.jpg")}, text("Describe it.")),
        user(text("Short.")),
    ]
    settings = [dict(max_new_tokens=5 + 4 * i, temperature=0.8 + 0.1 * i, top_k=40, seed=i) for i in range(5)]
    expected = [reference(engine, c, skip_special_tokens=False, **s) for c, s in zip(conversations, settings)]
    scheduler = Scheduler(engine, max_batch=3, max_queue=8)
    done: queue.Queue = queue.Queue()
    for i, (c, s) in enumerate(zip(conversations, settings)):
        scheduler.reserve()
        params = engine.sampling_params(**s)
        scheduler.submit(Job(engine.prepare([c], params.max_new_tokens), params,
                             lambda event, i=i: event[0] != "delta" and done.put((i, event))))
    scheduler.start()
    try:
        results = dict(done.get(timeout=120) for _ in conversations)
    finally:
        scheduler.stop()
    for i, want in enumerate(expected):
        kind, got = results[i]
        assert kind == "done"
        assert got.token_ids == want.token_ids and got.text == want.text
    assert scheduler.counters["peak_batch"] == 3


def test_a_dead_scheduler_answers_503_not_silence(root, engine):
    scheduler = Scheduler(engine, max_batch=1)
    scheduler.max_len = 1 << 50  # its cache cannot be allocated: the thread stops at once
    with ServerThread(create_app(engine, ServeSettings(model_name=MODEL), scheduler)) as server:
        server.wait_for(lambda h: h["fault"] is not None)
        r = httpx.get(f"{server.url}/health")
        assert r.status_code == 503 and r.json()["status"] == "error"
        r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": user(text("Hi")), "max_tokens": 2})
        assert r.status_code == 503 and "scheduler stopped" in r.json()["error"]["message"]
    with pytest.raises(SchedulerDown):
        scheduler.reserve()
