"""Function calling through the server: a tiny model fine-tuned here with ``qwen2vl train`` to answer one
prompt with one tool call, through the official openai client and LangChain ``bind_tools`` (streaming and
not); the tool result renders as ``<tool_response>``; ``required`` / named choices are valid calls even
from a random model (constrained decoding, both formats, ``qwen2vl batch --tool-format``); ``none`` is
content only; malformed calls are content, never a 500; bad tool requests are 400s naming the field."""

import json
import shutil

import httpx
import openai
import pytest
from engine_helpers import build_checkpoint
from serve_helpers import ServerThread, sse_payloads
from train_helpers import make_config_file, train_args

from qwen2vl.agent.tools import format_call, tools_block
from qwen2vl.cli import main as cli_main
from qwen2vl.generation.cli import EMBEDDED_MODEL
from qwen2vl.generation.engine import Engine
from qwen2vl.processing.chat import DEFAULT_SYSTEM
from qwen2vl.serve.app import ServeSettings, create_app

MODEL = "tiny-tools"
# what LangChain's bind_tools sends for `@tool def get_weather(city: str)` (checked in the LangChain test)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.", "parameters": {
    "properties": {"city": {"type": "string"}}, "required": ["city"], "type": "object"}}}]
QUESTION = "Weather in Paris?"
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
TRAIN_STEPS = 60  # the loss is ~0.01 by then (0.1 at 40): greedy decoding writes the call exactly
# bounded arguments, so a random model's constrained calls always end well inside max_tokens
BOUNDED = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["city", "days"],
        "properties": {"city": {"enum": ["Paris", "Rome", "Tokyo"]},
                       "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["zone"],
        "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}]


def valid_bounded(name: str, arguments: dict) -> bool:
    if name == "get_weather":
        return set(arguments) == {"city", "days"} and arguments["city"] in ("Paris", "Rome", "Tokyo") and \
            type(arguments["days"]) is int and 1 <= arguments["days"] <= 7
    return name == "get_time" and arguments == {"zone": arguments.get("zone")} and arguments["zone"] in ("UTC", "CET")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained from scratch on the rendered prompt (tools in the system turn) -> the call."""
    tmp = tmp_path_factory.mktemp("tools_train")
    (tmp / "tok").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):  # a compact vocabulary
        shutil.copy(EMBEDDED_MODEL / name, tmp / "tok" / name)
    make_config_file(tmp / "tok", tmp / "tiny-config.json")
    system = {"role": "system", "content": DEFAULT_SYSTEM + "\n\n" + tools_block(TOOLS)}
    record = {"messages": [system, {"role": "user", "content": QUESTION},
                           {"role": "assistant", "content": format_call(CALL["name"], CALL["arguments"])}]}
    data = tmp / "calls.jsonl"
    data.write_text(json.dumps(record) + "\n")
    assert cli_main(["train", *train_args(tmp, data, tmp / "run", max_steps=TRAIN_STEPS, seq_len=512, batch_size=1,
                                          lr=1e-2, warmup_steps=3, min_lr_ratio=0.1)]) == 0
    return Engine.from_pretrained(tmp / "run" / "final")


@pytest.fixture(scope="module")
def server(trained):
    with ServerThread(create_app(trained, ServeSettings(model_name=MODEL, max_batch=4))) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def random_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools_random")
    build_checkpoint(root / "model")
    return Engine.from_pretrained(root / "model"), root / "model"


def ask(**extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 80,
            **extra}


def stream_calls(chunks) -> tuple[dict, str, str]:
    """``({index: {"id", "name", "arguments", "pieces"}}, content, finish_reason)`` of a streamed choice,
    checking OpenAI's delta shape: the first delta of a call has id, type, name and empty arguments."""
    calls, content, finish = {}, "", None
    for c in chunks:
        if not c.choices:
            continue
        delta = c.choices[0].delta
        content += delta.content or ""
        finish = c.choices[0].finish_reason or finish
        for d in delta.tool_calls or []:
            if d.index not in calls:
                assert d.id.startswith("call_") and d.type == "function" and d.function.name
                assert d.function.arguments == ""
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": "", "pieces": 0}
            else:
                assert d.id is None and d.function.name is None and d.function.arguments
                calls[d.index]["arguments"] += d.function.arguments
                calls[d.index]["pieces"] += 1
    return calls, content, finish


def test_openai_client_gets_the_call_streaming_and_not(client):
    r = client.chat.completions.create(**ask(tools=TOOLS))
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == CALL["arguments"]

    calls, content, finish = stream_calls(client.chat.completions.create(**ask(tools=TOOLS), stream=True))
    assert finish == "tool_calls" and content == "" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == CALL["arguments"]
    assert calls[0]["pieces"] > 1  # the arguments arrive in pieces as they are decoded


def test_tool_result_renders_as_tool_response(server, client):
    r = client.chat.completions.create(**ask(tools=TOOLS))
    call = r.choices[0].message.tool_calls[0]
    messages = [{"role": "user", "content": QUESTION}, r.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    ids = httpx.post(f"{server.url}/tokenize", json={"messages": messages, "tools": TOOLS}, timeout=60).json()["tokens"]
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": ids}, timeout=60).json()["prompt"]
    assert text == (f"<|im_start|>system\n{DEFAULT_SYSTEM}\n\n{tools_block(TOOLS)}<|im_end|>\n"
                    f"<|im_start|>user\n{QUESTION}<|im_end|>\n"
                    f'<|im_start|>assistant\n<tool_call>\n{json.dumps(CALL)}\n</tool_call><|im_end|>\n'
                    "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    # the same conversation is answered (with none: content only, the tools left out of the prompt)
    again = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none",
                                           max_tokens=8, temperature=0)
    assert again.choices[0].message.tool_calls is None and isinstance(again.choices[0].message.content, str)


def test_tool_choice_none_is_content_only(client):
    r = client.chat.completions.create(**ask(tools=TOOLS, tool_choice="none"))
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(**ask(tools=TOOLS, tool_choice="none"), stream=True))
    assert all(not c.choices or c.choices[0].delta.tool_calls is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content


def test_langchain_bind_tools(server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_core.utils.function_calling import convert_to_openai_tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    assert convert_to_openai_tool(get_weather) == TOOLS[0]  # the prompt the model was trained on
    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=80,
                     max_retries=0).bind_tools([get_weather])
    message = llm.invoke(QUESTION)
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert message.response_metadata["finish_reason"] == "tool_calls"
    gathered = None
    for piece in llm.stream(QUESTION):
        gathered = piece if gathered is None else gathered + piece
    assert [(c["name"], c["args"]) for c in gathered.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert not gathered.invalid_tool_calls
    # the agent loop's second turn: the result goes back and the server answers (200, a message)
    result = ToolMessage(content=get_weather.invoke(message.tool_calls[0]["args"]),
                         tool_call_id=message.tool_calls[0]["id"])
    reply = llm.invoke([HumanMessage(QUESTION), message, result])
    assert reply.response_metadata["finish_reason"] in ("stop", "length", "tool_calls")


def test_malformed_call_is_content_not_a_500(server, client):
    """Cut inside the call (a stop string; max_tokens): the raw text is content, finish stop / length."""
    r = client.chat.completions.create(**ask(tools=TOOLS, stop=["Paris"]))
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "'
    r = client.chat.completions.create(**ask(tools=TOOLS, max_tokens=16))
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content.startswith('<tool_call>\n{"name": "')
    # streamed: the call's first delta went out before it broke; its text follows as content
    calls, content, finish = stream_calls(client.chat.completions.create(**ask(tools=TOOLS, stop=["Paris"]),
                                                                         stream=True))
    assert finish == "stop" and content == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "'
    assert [c["name"] for c in calls.values()] == ["get_weather"]


@pytest.mark.parametrize("tool_format", ["hermes", "qwen"])
def test_required_and_named_choices_are_valid_calls_from_a_random_model(random_engine, tool_format):
    engine, _ = random_engine
    with ServerThread(create_app(engine, ServeSettings(model_name=MODEL, max_batch=4, tool_format=tool_format))) as s:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=120)
        base = ask(tools=BOUNDED, temperature=1.0, seed=5, max_tokens=400)
        one = client.chat.completions.create(**base, tool_choice="required", parallel_tool_calls=False, n=3)
        for choice in one.choices:
            assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
            call = choice.message.tool_calls[0]
            assert valid_bounded(call.function.name, json.loads(call.function.arguments)), call
        # parallel (the default): one or more calls, one per line; a random model may not stop, then the
        # complete calls are still read
        several = client.chat.completions.create(**base, tool_choice="required", n=2)
        for choice in several.choices:
            assert choice.finish_reason in ("tool_calls", "length") and choice.message.tool_calls
            assert all(valid_bounded(c.function.name, json.loads(c.function.arguments))
                       for c in choice.message.tool_calls)
        named = {"type": "function", "function": {"name": "get_time"}}
        r = client.chat.completions.create(**base, tool_choice=named, n=2)
        for choice in r.choices:
            [call] = choice.message.tool_calls
            assert call.function.name == "get_time" and valid_bounded("get_time", json.loads(call.function.arguments))
        calls, content, finish = stream_calls(client.chat.completions.create(**base, tool_choice=named, stream=True))
        assert finish == "tool_calls" and content == "" and [c["name"] for c in calls.values()] == ["get_time"]
        assert valid_bounded("get_time", json.loads(calls[0]["arguments"]))


@pytest.mark.parametrize("tool_format", ["hermes", "qwen"])
def test_the_call_grammar_takes_several_calls_only_when_parallel(random_engine, tool_format):
    from qwen2vl.serve.constraints import ToolCallsConstraint

    tokenizer = random_engine[0].processor.tokenizer
    functions = [t["function"] for t in BOUNDED]
    first, second = format_call("get_weather", {"city": "Rome", "days": 3}, tool_format), \
        format_call("get_time", {"zone": "CET"}, tool_format)
    end = "\n✿RESULT✿" if tool_format == "qwen" else ""

    def accepts(text: str, parallel: bool, names=functions) -> bool:
        constraint = ToolCallsConstraint(tokenizer, names, tool_format, parallel)
        for token in tokenizer.encode(text, add_special_tokens=False) + [tokenizer.im_end_id]:
            if not constraint.allowed(tokenizer.vocab_size)[token]:
                return False
            constraint.advance(token)
        return constraint.finished()

    assert accepts(first + end, parallel=False) and accepts(first + end, parallel=True)
    assert accepts(first + "\n" + second + end, parallel=True)
    assert not accepts(first + "\n" + second + end, parallel=False)
    assert not accepts(format_call("get_weather", {"city": "Oslo", "days": 3}, tool_format) + end, parallel=True)
    assert not accepts(second + end, parallel=True, names=functions[:1])  # a named choice: that function only


def test_batch_with_the_qwen_tool_format(random_engine, tmp_path):
    _, model_dir = random_engine
    rows = [{"id": "forced", **ask(tools=BOUNDED, tool_choice="required", parallel_tool_calls=False, max_tokens=400)},
            {"id": "bad", **ask(tools=BOUNDED, tool_choice={"type": "function", "function": {"name": "nope"}})}]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert cli_main(["batch", "--input", str(src), "--output", str(out), "--model", str(model_dir),
                     "--tool-format", "qwen", "--quiet"]) == 0
    lines = {line["id"]: line for line in map(json.loads, out.read_text().splitlines())}
    choice = lines["forced"]["response"]["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert valid_bounded(call["function"]["name"], json.loads(call["function"]["arguments"]))
    assert lines["bad"]["status"] == 400 and lines["bad"]["error"]["param"] == "tool_choice.function.name"


def test_qwen_format_prompt_and_stop_strings(random_engine):
    """qwen: the parallel prompt by default (parallel_tool_calls defaults to true) and its stop strings."""
    from qwen2vl.processing import MediaAccess
    from qwen2vl.serve.protocol import parse_chat_request, prepare

    engine, _ = random_engine
    request = parse_chat_request(ask(tools=BOUNDED), MediaAccess(), "qwen")
    batch, params = prepare(engine, request, 2048, 8)
    text = engine.processor.tokenizer.decode(batch["input_ids"][0].tolist())
    assert text == engine.processor.apply_chat_template([{"role": "user", "content": QUESTION}], tools=BOUNDED,
                                                        tool_format="qwen", parallel_tool_calls=True)
    assert "✿FUNCTION✿: The name of tool 1" in text
    assert params.stop == ["✿RESULT✿", "✿RETURN✿"]
    none = parse_chat_request(ask(tools=BOUNDED, tool_choice="none"), MediaAccess(), "qwen")
    batch, params = prepare(engine, none, 2048, 8)
    assert "✿FUNCTION✿" not in engine.processor.tokenizer.decode(batch["input_ids"][0].tolist()) and not params.stop


BAD = [
    ("required without tools", {"tool_choice": "required"}, "tool_choice", "needs tools"),
    ("unknown named tool", {"tools": BOUNDED, "tool_choice": {"type": "function", "function": {"name": "f"}}},
     "tool_choice.function.name", "'f' is not one of the tools (get_weather, get_time)"),
    ("unknown choice", {"tools": BOUNDED, "tool_choice": "always"}, "tool_choice", "must be 'none', 'auto' or"),
    ("duplicate names", {"tools": BOUNDED + BOUNDED[:1]}, "tools[2].function.name", "is already tools[0]'s"),
    ("bad function name", {"tools": [{"type": "function", "function": {"name": "get weather"}}]},
     "tools[0].function.name", "must match"),
    ("unusable parameters", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "strng"}}}}}],
        "tool_choice": "required"}, "tools[0].function.parameters", "not a usable JSON schema"),
    ("forced and response_format", {"tools": BOUNDED, "tool_choice": "required",
                                    "response_format": {"type": "json_object"}}, "response_format", "cannot be combined"),
    ("arguments not JSON", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages[1].tool_calls[0].function.arguments", "is not valid JSON"),
    ("tool calls on a user message", {"messages": [{"role": "user", "content": "hi", "tool_calls": [
        {"function": {"name": "f", "arguments": "{}"}}]}]}, "messages[0].tool_calls", "only assistant messages"),
]


@pytest.mark.parametrize("name, body, param, message", BAD, ids=[b[0] for b in BAD])
def test_bad_tool_requests_are_400_naming_the_field(server, name, body, param, message):
    r = httpx.post(f"{server.url}/v1/chat/completions", json={**ask(), **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_qwen_tool_message_must_follow_a_call(random_engine):
    from qwen2vl.processing import MediaAccess
    from qwen2vl.serve.errors import APIError
    from qwen2vl.serve.protocol import parse_chat_request

    body = {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]}
    assert parse_chat_request(body, MediaAccess(), "hermes").conversation[1]["role"] == "tool"
    with pytest.raises(APIError, match="messages\\[1\\] is a tool message that does not follow"):
        parse_chat_request(body, MediaAccess(), "qwen")


def test_raw_stream_shape(server):
    """The wire format itself: the first tool-call delta and the finish chunk, as OpenAI sends them."""
    payloads = sse_payloads(httpx.post(f"{server.url}/v1/chat/completions",
                                       json={**ask(tools=TOOLS), "stream": True}, timeout=60).text)
    chunks = [json.loads(p) for p in payloads[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    first = next(d for d in deltas if d.get("tool_calls"))
    [call] = first["tool_calls"]
    assert set(call) == {"index", "id", "type", "function"} and call["function"] == {"name": "get_weather",
                                                                                     "arguments": ""}
    later = [d["tool_calls"][0] for d in deltas if d.get("tool_calls")][1:]
    assert later and all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"} for c in later)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls" and payloads[-1] == "[DONE]"


def _replay(tool_format: str, text: str, size: int) -> tuple[dict, str, str]:
    """Feed ``text`` to ToolDeltas in ``size``-character pieces; ``({index: (id, name, arguments)}, content, reason)``."""
    from qwen2vl.serve.tool_calls import ToolDeltas

    stream = ToolDeltas(tool_format)
    deltas = [d for i in range(0, len(text), size) for d in stream.feed(text[i:i + size])]
    tail, reason = stream.finish("stop")
    calls, content = {}, ""
    for delta in deltas + tail:
        content += delta.get("content", "")
        for d in delta.get("tool_calls", []):
            if "id" in d:
                assert d["index"] not in calls and d["function"]["arguments"] == ""
                calls[d["index"]] = (d["id"], d["function"]["name"], "")
            else:
                ident, name, args = calls[d["index"]]
                calls[d["index"]] = (ident, name, args + d["function"]["arguments"])
    return calls, content, reason


@pytest.mark.parametrize("size", [1, 3, 1000])
@pytest.mark.parametrize("tool_format, text, arguments", [
    # qwen: the stop string cut the text right after the last call's arguments (they end only at finish)
    ("qwen", 'Checking.\n✿FUNCTION✿: get_weather\n✿ARGS✿: {"city": "Paris", "days": 2}\n'
             '✿FUNCTION✿: get_time\n✿ARGS✿: {"zone":"UTC"}', ['{"city": "Paris", "days": 2}', '{"zone":"UTC"}']),
    # hermes: the answer ended after the JSON, before </tool_call> (its closing brace was held back)
    ("hermes", '<tool_call>\n{"name": "get_time", "arguments": {"zone": {"a": "}"}}}', ['{"zone": {"a": "}"}}']),
    ("hermes", 'Sure.\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\nDone <', ["{}"]),
])
def test_streamed_deltas_end_as_the_whole_answer_parses(tool_format, text, arguments, size):
    """Whatever the parser releases only at the end (the last call's arguments, held-back text) is sent."""
    from qwen2vl.agent.tools import parse_tool_output

    calls, content, reason = _replay(tool_format, text, size)
    parsed = parse_tool_output(text, tool_format)
    assert [args for _, _, args in calls.values()] == arguments  # the model's own argument text
    assert [json.loads(args) for _, _, args in calls.values()] == [c["arguments"] for c in parsed.calls]
    assert [name for _, name, _ in calls.values()] == [c["name"] for c in parsed.calls]
    assert content == parsed.content and reason == "tool_calls"


def test_a_call_found_malformed_after_its_first_delta_keeps_its_index():
    text = ('<tool_call>\n{"name": "get_time", "arguments": {"zone": oops}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
    calls, content, reason = _replay("hermes", text, 2)
    assert sorted(calls) == [0, 1] and calls[1][1:] == ("get_time", '{"zone": "CET"}')
    assert content == '<tool_call>\n{"name": "get_time", "arguments": {"zone": oops}}\n</tool_call>'
    assert reason == "stop"  # a malformed call: the text is content, the finish reason not tool_calls


@pytest.mark.parametrize("verb", [["serve"], ["batch", "--input", "in.jsonl", "--output", "out.jsonl"]])
def test_tool_format_option_names_the_choices(verb, capsys):
    try:
        code = cli_main([*verb, "--tool-format", "xml"])
    except SystemExit as exit:
        code = exit.code
    assert code == 2 and "--tool-format: invalid choice: 'xml' (choose from 'hermes', 'qwen')" in capsys.readouterr().err
