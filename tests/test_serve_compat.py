"""OpenAI / vLLM compatibility: the official client on /v1/completions, n, logprobs, min_tokens,
stop_token_ids, ignore_eos, structured output; LangChain (invoke, stream_usage, with_structured_output);
/metrics through prometheus_client's parser; /tokenize, /detokenize, /version, /v1/models/{id}, 429."""

import json
import re

import httpx
import openai
import pytest
from engine_helpers import build_checkpoint
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import ServerThread, sse_payloads

from qwen2vl.generation.engine import Engine
from qwen2vl.serve.app import ServeSettings, create_app

MODEL = "tiny"
# a schema whose every answer is short: the grammar forces the closing brace and then the end token
SCHEMA = {"title": "Pet", "type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99}}}


def valid_pet(value) -> bool:
    return isinstance(value, dict) and set(value) == {"name", "age"} and \
        re.fullmatch("[a-z]{1,6}", value["name"]) is not None and \
        isinstance(value["age"], int) and 0 <= value["age"] <= 99


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_compat")
    build_checkpoint(root / "model")
    return Engine.from_pretrained(root / "model")


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine, ServeSettings(model_name=MODEL, max_batch=4, max_queue=4))) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(text):
    return [{"role": "user", "content": text}]


def test_text_completions_with_the_openai_client(engine, client):
    prompt = "Once upon a time"
    ids = engine.processor.tokenizer.encode(prompt, add_special_tokens=False)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, logprobs=2, echo=True)
    choice = r.choices[0]
    assert r.object == "text_completion" and choice.text.startswith(prompt)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(choice.logprobs.tokens)
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    assert choice.logprobs.text_offset[0] == len(prompt)
    pieces = [c.choices[0].text for c in client.completions.create(model=MODEL, prompt=prompt, max_tokens=6,
                                                                     stream=True) if c.choices]
    assert "".join(pieces) == choice.text[len(prompt):]


def test_n_choices_and_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=chat("Hi"), max_tokens=5, n=3, temperature=1.0,
                                       seed=3, logprobs=True, top_logprobs=2)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    for c in r.choices:
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in c.logprobs.content)
    # seeds seed, seed+1, ...: choice 1 of this request is choice 0 of the request with seed 4
    again = client.chat.completions.create(model=MODEL, messages=chat("Hi"), max_tokens=5, temperature=1.0, seed=4)
    assert again.choices[0].message.content == r.choices[1].message.content
    # streamed: every choice finishes once, usage once at the end
    chunks = list(client.chat.completions.create(model=MODEL, messages=chat("Hi"), max_tokens=4, n=2, stream=True,
                                                 stream_options={"include_usage": True}))
    finishes = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finishes) == [0, 1]
    assert [c.usage is not None for c in chunks].count(True) == 1 and chunks[-1].usage.completion_tokens == 8
    # streamed logprobs: one entry per generated token, on the chunks that carry its text
    chunks = list(client.chat.completions.create(model=MODEL, messages=chat("Hi"), max_tokens=5, stream=True,
                                                 logprobs=True, top_logprobs=1,
                                                 stream_options={"include_usage": True}))
    entries = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert len(entries) == chunks[-1].usage.completion_tokens and all(len(t.top_logprobs) == 1 for t in entries)


def test_min_tokens_stop_token_ids_and_ignore_eos(engine, client):
    ids = engine.generate([chat("Count")], max_new_tokens=8, ignore_eos=True)[0].token_ids  # greedy, server idle
    base = client.chat.completions.create(model=MODEL, messages=chat("Count"), max_tokens=8,
                                          extra_body={"ignore_eos": True})
    assert base.usage.completion_tokens == 8 and base.choices[0].finish_reason == "length"
    stop = client.chat.completions.create(model=MODEL, messages=chat("Count"), max_tokens=8,
                                          extra_body={"ignore_eos": True, "stop_token_ids": [ids[2]]})
    assert stop.choices[0].finish_reason == "stop" and stop.usage.completion_tokens == ids.index(ids[2]) + 1
    late = client.chat.completions.create(model=MODEL, messages=chat("Count"), max_tokens=8,
                                          extra_body={"ignore_eos": True, "stop_token_ids": [ids[2]],
                                                      "min_tokens": 8})
    assert late.usage.completion_tokens == 8


def test_structured_output_is_schema_valid(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=chat("A pet?"), max_tokens=64, temperature=1.0,
                                           seed=seed, response_format=fmt)
        assert r.choices[0].finish_reason == "stop"
        assert valid_pet(json.loads(r.choices[0].message.content))


def test_a_schema_that_cannot_compile_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="not a usable JSON schema"):
        client.chat.completions.create(model=MODEL, messages=chat("x"), max_tokens=4,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "bad", "schema": {"type": 5}}})


def test_langchain_invoke_stream_usage_and_structured_output(server, client):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused", model=MODEL, max_tokens=6, temperature=0,
                     max_retries=0, timeout=120)
    message = llm.invoke("Hello there")
    reference = client.chat.completions.create(model=MODEL, messages=chat("Hello there"), max_tokens=6,
                                               temperature=0)
    assert message.content == reference.choices[0].message.content
    assert message.usage_metadata["input_tokens"] == reference.usage.prompt_tokens
    assert message.usage_metadata["output_tokens"] == reference.usage.completion_tokens
    streamed = None
    for piece in ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused", model=MODEL, max_tokens=6,
                            temperature=0, stream_usage=True, max_retries=0).stream("Hello there"):
        streamed = piece if streamed is None else streamed + piece
    assert streamed.content == message.content
    assert streamed.usage_metadata["output_tokens"] == reference.usage.completion_tokens  # counted once
    assert streamed.usage_metadata["input_tokens"] == reference.usage.prompt_tokens
    structured = ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused", model=MODEL, max_tokens=64,
                            temperature=1.0, max_retries=0).with_structured_output(SCHEMA, method="json_schema")
    assert valid_pet(structured.invoke("Describe a pet"))


def test_metrics_tokenize_detokenize_version_models_and_retry_after(engine, server):
    httpx.post(f"{server.url}/v1/chat/completions", json={"messages": chat("m"), "max_tokens": 3}, timeout=60)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)}
    assert {"qwen2vl_requests", "qwen2vl_prompt_tokens", "qwen2vl_generation_tokens",
            "qwen2vl_time_to_first_token_seconds", "qwen2vl_inter_token_latency_seconds",
            "qwen2vl_num_requests_running", "qwen2vl_num_requests_waiting"} <= set(families)
    ok = [s for s in families["qwen2vl_requests"].samples
          if s.name == "qwen2vl_requests_total" and s.labels == {"route": "/v1/chat/completions", "status": "200"}]
    assert ok and ok[0].value >= 1
    generated = [s.value for s in families["qwen2vl_generation_tokens"].samples if s.name.endswith("_total")]
    assert generated[0] >= 3
    ttft = [s.value for s in families["qwen2vl_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert ttft[0] >= 1

    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": "hello world"}).json()
    assert tokens["tokens"] == engine.processor.tokenizer.encode("hello world")
    assert tokens["count"] == len(tokens["tokens"])
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text == "hello world"
    chat_ids = httpx.post(f"{server.url}/tokenize", json={"messages": chat("hi")}).json()["tokens"]
    assert engine.processor.tokenizer.decode(chat_ids).endswith("<|im_start|>assistant\n")
    long = httpx.post(f"{server.url}/tokenize", json={"prompt": "hello " * 3_495_253})  # refused before tokenizing
    assert long.status_code == 400 and "characters of text" in long.json()["error"]["message"]
    bad = httpx.post(f"{server.url}/detokenize", json={"tokens": [10 ** 9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens[0]"
    assert httpx.get(f"{server.url}/version").json()["version"]
    assert httpx.get(f"{server.url}/v1/models/{MODEL}").json()["id"] == MODEL
    assert httpx.get(f"{server.url}/v1/models/other").status_code == 404

    scheduler = server.server.config.app.state.scheduler
    for _ in range(scheduler.max_queue):
        scheduler.reserve()
    try:
        r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": chat("x"), "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
    finally:
        for _ in range(scheduler.max_queue):
            scheduler.release()
    payloads = sse_payloads(httpx.post(f"{server.url}/v1/completions", json={"prompt": "a", "max_tokens": 2,
                                                                             "stream": True}).text)
    assert payloads[-1] == "[DONE]" and json.loads(payloads[0])["object"] == "text_completion"


def test_special_tokens_hidden_by_default_as_vllm(engine):
    """skip_special_tokens defaults to true on the server (every special token hidden, as vLLM); false keeps
    the grounding tokens (the decode core's tests cover what each setting shows)."""
    from qwen2vl.processing import MediaAccess
    from qwen2vl.serve.protocol import parse_chat_request, prepare

    for body, expected in (({}, True), ({"skip_special_tokens": False}, False), ({"skip_special_tokens": None}, True)):
        request = parse_chat_request({"messages": chat("hi"), **body}, MediaAccess())
        _, params = prepare(engine, request, 256, 8)
        assert params.skip_special_tokens is expected
