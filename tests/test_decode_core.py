"""The one decode core: streaming per step, batch-independent seeded sampling, stops within a step,
chunked prefill interleaved with decoding, packed vision at admission, cancellation, logprobs, bounds.

Every test runs both ways the loop can step: narrowed to the rows and slots in use (CPU default) and
with fixed shapes over the whole cache (``static=True``, the CUDA-graph path run as is on CPU)."""

import queue
import threading
import time

import httpx
import pytest
import torch
from engine_helpers import build_checkpoint, write_image
from serve_helpers import ServerThread

from qwen2vl.generation.engine import Engine
from qwen2vl.generation.loop import DecodeLoop
from qwen2vl.generation.sampling import SamplingParams
from qwen2vl.serve.app import ServeSettings, create_app
from qwen2vl.serve.scheduler import Job, Scheduler

PATHS = [False, True]  # static


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("core")
    build_checkpoint(root / "model")
    write_image(root / "a.png", (90, 70), seed=1)
    write_image(root / "b.png", (60, 120), seed=2)
    write_image(root / "c.png", (112, 56), seed=3)
    return root


@pytest.fixture(scope="module")
def base(root):
    return Engine.from_pretrained(root / "model")


def fresh(base, static, **kwargs):
    """An engine over the same model and processor, with a loop (and step counters) of its own."""
    return Engine(base.model, base.processor, base.generation_config, static=static, **kwargs)


def user(text, image=None):
    content = ([{"type": "image", "image": str(image)}] if image else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize("static", PATHS)
def test_stream_delivers_each_delta_before_the_next_steps(base, root, static):
    engine = fresh(base, static)
    seen = []
    stream = engine.stream(user("Describe it.", root / "a.png"), max_new_tokens=24, ignore_eos=True)
    for k, delta in enumerate(stream, start=1):
        assert delta
        seen.append(engine._loop.counters["decode_steps"])
        assert seen[-1] <= k + 1, f"delta {k} arrived after decode step {seen[-1]}"
    assert len(seen) >= 10 and seen[-1] >= 10  # many deltas, one per step or so


class SlowEngine(Engine):
    """Each loop step waits ``pause`` seconds after its work (events cross the socket meanwhile)."""

    pause = 0.05

    def new_loop(self, rows, capacity, chunk_size=None):
        loop = super().new_loop(rows, capacity, chunk_size)
        step = loop.step

        def slow_step():
            events = step()
            time.sleep(self.pause)
            return events
        loop.step = slow_step
        return loop


@pytest.mark.parametrize("static", PATHS)
def test_server_stream_delivers_each_delta_before_the_next_steps(base, static):
    slow = SlowEngine(base.model, base.processor, base.generation_config, static=static)
    scheduler = Scheduler(slow, max_batch=2)
    body = {"messages": user("Tell a story."), "max_tokens": 16, "stream": True, "ignore_eos": True}
    with ServerThread(create_app(slow, ServeSettings(model_name="tiny"), scheduler)) as server:
        k = 0
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if '"content":"' in line.replace(" ", "") and '"content":""' not in line.replace(" ", ""):
                    k += 1
                    steps = scheduler._loop.counters["decode_steps"]
                    assert steps <= k + 1, f"delta {k} arrived after decode step {steps}"
    assert k >= 8


@pytest.mark.parametrize("static", PATHS)
def test_a_seeded_row_does_not_depend_on_its_batch_mates(base, root, static):
    engine = fresh(base, static)
    target = SamplingParams(max_new_tokens=20, temperature=1.2, top_p=0.9, top_k=60, seed=11)
    mates = [SamplingParams(max_new_tokens=7, temperature=0.7, seed=3, repetition_penalty=1.3),
             SamplingParams(max_new_tokens=30, min_p=0.05, temperature=1.0, seed=99)]
    conversations = [user("First?", root / "b.png"), user("A seeded question."), user("Third one.", root / "c.png")]
    alone = engine.generate_batch(engine.prepare([conversations[1]], 20), [target])[0]
    batch = engine.prepare(conversations, 30)
    together = engine.generate_batch(batch, [mates[0], target, mates[1]])
    assert together[1].token_ids == alone.token_ids
    assert len(set(alone.token_ids)) > 5
    assert engine.generate_batch(batch, [mates[0], target, mates[1]])[0].token_ids == together[0].token_ids
    # and through the scheduler, beside other requests
    got = run_jobs(fresh(base, static), [(conversations[0], mates[0]), (conversations[1], target),
                                         (conversations[2], mates[1])])
    assert got[1].token_ids == alone.token_ids


def run_jobs(engine, requests, max_batch=3, **scheduler_options):
    """Submit every request before the scheduler starts (so they are admitted together); results in order."""
    scheduler = Scheduler(engine, max_batch=max_batch, **scheduler_options)
    done: queue.Queue = queue.Queue()
    for i, (conversation, params) in enumerate(requests):
        scheduler.reserve()
        batch = engine.prepare([conversation], params.max_new_tokens)
        scheduler.submit(Job(batch, params, lambda e, i=i: e[0] != "delta" and done.put((i, e))))
    scheduler.start()
    try:
        results = dict(done.get(timeout=120) for _ in requests)
    finally:
        scheduler.stop()
    assert all(kind == "done" for kind, _ in results.values()), results
    return [results[i][1] for i in range(len(requests))]


@pytest.mark.parametrize("static", PATHS)
def test_stop_strings_and_ids_end_the_row_in_the_step_that_completes_them(base, static):
    conversation = user("Say something long.")
    free = fresh(base, static).generate([conversation], max_new_tokens=30, ignore_eos=True)[0]
    word = free.text[6:9]
    assert word and free.completion_tokens == 30
    engine = fresh(base, static)
    stopped = engine.generate([conversation], max_new_tokens=30, ignore_eos=True, stop=[word])[0]
    assert stopped.text == free.text[: free.text.index(word)] and stopped.finish_reason == "stop"
    # the first token comes from the prefill; each later one from one decode step, and none after the stop
    assert engine._loop.counters["decode_steps"] == stopped.completion_tokens - 1 < 29
    engine = fresh(base, static)
    stop_id = free.token_ids[4]
    by_id = engine.generate([conversation], max_new_tokens=30, stop_token_ids=[stop_id], ignore_eos=True)[0]
    assert by_id.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]
    assert engine._loop.counters["decode_steps"] == by_id.completion_tokens - 1


@pytest.mark.parametrize("static", PATHS)
def test_a_long_prefill_is_chunked_between_decode_steps(base, root, static):
    engine = fresh(base, static)
    short = engine.prepare([user("Hi.")], 40)
    long = engine.prepare([user("word " * 60, root / "a.png")], 8)
    params = SamplingParams(max_new_tokens=40, stop_token_ids=[])
    expected_long = engine.generate_batch(long, [SamplingParams(max_new_tokens=8)])[0].token_ids
    loop = DecodeLoop(engine.model, rows=2, capacity=1024, chunk_size=16, fixed=static)
    a, b = engine.prompts([short, long])
    seq_a = engine.new_sequence(params, len(a))
    loop.admit(a, seq_a)
    while not seq_a.tokens:
        loop.step()
    seq_b = engine.new_sequence(SamplingParams(max_new_tokens=8, stop_token_ids=engine.end_token_ids()), len(b))
    loop.admit(b, seq_b)
    chunks = -(-len(b) // 16)
    assert chunks >= 8
    for _ in range(chunks):
        before = len(seq_a.tokens)
        loop.step()
        assert len(seq_a.tokens) == before + 1  # the running row got its token in every step
    assert seq_b.tokens  # its prefill completed in exactly `chunks` steps
    while not seq_b.done:
        loop.step()
    assert seq_b.tokens == expected_long


def test_admission_packs_the_media_of_waiting_requests_into_one_vision_call(base, root):
    engine = fresh(base, False, vision_cache_items=0)
    calls = []
    encode = engine.model.encode_vision

    def counted(pixels, grid):
        calls.append(grid.shape[0])
        return encode(pixels, grid)
    requests = [(user(f"Picture {i}?", root / name), SamplingParams(max_new_tokens=6))
                for i, name in enumerate(["a.png", "b.png", "c.png"])]
    engine.model.encode_vision = counted
    try:
        got = run_jobs(engine, requests)
    finally:
        del engine.model.encode_vision
    assert calls == [3]  # three images, one call
    for (conversation, _), result in zip(requests, got):
        assert result.token_ids == base.generate([conversation], max_new_tokens=6)[0].token_ids
    calls.clear()
    engine.model.encode_vision = counted
    try:
        run_jobs(engine, requests, vision_patches=1)  # a budget below one image: one job per call
    finally:
        del engine.model.encode_vision
    assert calls == [1, 1, 1]


def test_a_cancelled_row_stops_before_the_next_step(base):
    engine = fresh(base, False)
    scheduler = Scheduler(engine, max_batch=2)
    events: queue.Queue = queue.Queue()
    params = SamplingParams(max_new_tokens=200, stop_token_ids=[])
    job = None

    def sink(event):
        events.put(event)
        if event[0] == "delta":
            scheduler.cancel(job)  # from the scheduler thread, right after a token
    scheduler.reserve()
    job = Job(engine.prepare([user("Go on and on.")], 200), params, sink)
    scheduler.submit(job)
    scheduler.start()
    try:
        first = events.get(timeout=60)
        assert first[0] == "delta"
        deadline = time.monotonic() + 30
        while scheduler.stats()["cancelled"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = scheduler.stats()
    finally:
        scheduler.stop()
    assert stats["cancelled"] == 1 and stats["active"] == 0
    assert len(job.seq.tokens) <= 2  # the step that produced the first delta, and nothing after it


def test_logprobs_are_the_models_distribution(base):
    engine = fresh(base, False)
    conversation = user("Numbers?")
    result = engine.generate([conversation], max_new_tokens=6, logprobs=3, ignore_eos=True)[0]
    batch = engine.prepare([conversation], 6)
    ids = torch.cat([batch["input_ids"], torch.tensor([result.token_ids[:-1]])], 1)
    with torch.inference_mode():
        logp = engine.model(ids)[0, batch["input_ids"].shape[1] - 1:].float().log_softmax(-1)
    assert len(result.logprobs) == 6
    for k, entry in enumerate(result.logprobs):
        assert entry["token_id"] == result.token_ids[k]
        assert entry["logprob"] == pytest.approx(float(logp[k, entry["token_id"]]), abs=1e-4)
        top = entry["top"]
        assert len(top) == 3 and top[0][0] == entry["token_id"]  # greedy: the chosen token is the most likely
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)


def test_min_tokens_ignore_eos_and_greedy_rows_draw_nothing(base):
    engine = fresh(base, False)
    conversation = user("Short?")
    free = engine.generate([conversation], max_new_tokens=12, ignore_eos=True)[0]
    stop_id = free.token_ids[1]
    held = engine.generate([conversation], max_new_tokens=12, stop_token_ids=[stop_id], min_tokens=5,
                           ignore_eos=True)[0]
    assert stop_id not in held.token_ids[:5] and len(held.token_ids) >= 5
    eos = engine.end_token_ids()
    assert not set(eos) & set(engine.sampling_params(ignore_eos=True).stop_token_ids)
    assert set(eos) <= set(engine.sampling_params().stop_token_ids)
    loop = engine.engine_loop(1, 64)
    prompt = engine.prompts([engine.prepare([conversation], 4)])[0]
    row = loop.admit(prompt, engine.new_sequence(SamplingParams(max_new_tokens=4), len(prompt)))
    assert loop.sampler.generators[row] is None
    loop.release(row)


def test_the_engine_keeps_one_bounded_cache(base):
    engine = fresh(base, False)
    engine.generate([user("One.")], max_new_tokens=4)
    first = engine._loop
    engine.generate([user("Two, a little longer.")] * 2, max_new_tokens=4)
    second = engine._loop
    assert second is not first and len(second.rows) == 2  # more rows needed: replaced, not added
    engine.generate([user("Three.")], max_new_tokens=4)
    assert engine._loop is second and not second.busy  # big enough: reused
    stream = engine.stream(user("Four."), max_new_tokens=30, ignore_eos=True)
    next(stream)
    stream.close()  # a consumer that stops early frees its row
    assert not engine._loop.busy


def test_a_prefix_from_a_chat_turn_is_copied_not_recomputed(base, root):
    from qwen2vl.generation.chat import ChatSession
    for static in PATHS:
        engine = fresh(base, static)
        chat = ChatSession(engine, max_new_tokens=10)
        chat.ask([{"type": "image", "image": str(root / "a.png")}, {"type": "text", "text": "What?"}])
        chunks = engine._loop.counters["prefill_chunks"]
        second = chat.ask("And?")
        assert second.timings["reused_prefix_tokens"] > 10
        assert engine._loop.counters["prefill_chunks"] == chunks + 1  # only the new tokens, one chunk
        assert second.token_ids == fresh(base, static).generate([chat.messages[:-1]], max_new_tokens=10)[0].token_ids


def test_scheduler_counters_are_consistent_under_threads(base):
    """Several submitters at once: every job gets exactly one final event."""
    engine = fresh(base, False)
    scheduler = Scheduler(engine, max_batch=3, max_queue=16)
    finals: queue.Queue = queue.Queue()
    scheduler.start()

    def submit(i):
        scheduler.reserve()
        params = SamplingParams(max_new_tokens=3 + i, stop_token_ids=[])
        scheduler.submit(Job(engine.prepare([user(f"Q{i}")], params.max_new_tokens), params,
                             lambda e: e[0] != "delta" and finals.put(e)))
    try:
        threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        results = [finals.get(timeout=60) for _ in range(8)]
    finally:
        scheduler.stop()
    assert all(kind == "done" for kind, _ in results)
    assert sorted(r.completion_tokens for _, r in results) == list(range(3, 11))


def test_a_non_streaming_client_that_goes_away_stops_its_row(base):
    engine = SlowEngine(base.model, base.processor, base.generation_config)
    engine.pause = 0.01  # 400 tokens take over 4 s: the client's 0.5 s are up long before
    scheduler = Scheduler(engine, max_batch=2)
    body = {"messages": user("Talk for a long time."), "max_tokens": 400, "ignore_eos": True}
    with ServerThread(create_app(engine, ServeSettings(model_name="tiny"), scheduler)) as server:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=0.5)  # the client gives up
        health = server.wait_for(lambda h: h["cancelled"] == 1, timeout=30)
        tokens = health["generated_tokens"]
        time.sleep(0.3)
        later = server.health()
    assert later["active"] == 0 and later["completed"] == 0
    assert later["generated_tokens"] <= tokens + 1  # at most the step that was running when it went
    assert tokens < 400
