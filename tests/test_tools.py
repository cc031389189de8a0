"""Tool prompts (hermes and Qwen-Agent's format) with their literal strings, and the tool-call parser."""

import json

import pytest

from qwen2vl.agent.tools import (
    ContentDelta,
    ToolCallArguments,
    ToolCallStart,
    ToolCallStreamParser,
    parse_tool_calls,
    parse_tool_output,
    stop_strings,
    to_openai_tool_calls,
)
from qwen2vl.generation.cli import EMBEDDED_MODEL
from qwen2vl.processing.chat import render_chat
from qwen2vl.processing.tokenizer import Tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
WEATHER_JSON = json.dumps(WEATHER)
USER = {"role": "user", "content": "Weather in Paris?"}
CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
RESULT = {"role": "tool", "tool_call_id": "call_1",
          "content": [{"type": "text", "text": "sunny"}, {"type": "image_url", "image_url": {"url": "sky.png"}}]}
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"

HERMES_BLOCK = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    f"{WEATHER_JSON}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
    "</tool_call>")
QWEN_BLOCK = (
    "# Tools\n\n## You have access to the following tools:\n\n### get_weather\n\n"
    "get_weather: Get the weather. Parameters: " + json.dumps(WEATHER["function"]["parameters"]) +
    " Format the arguments as a JSON object.\n\n"
    "## When you need to call a tool, please insert the following command in your reply, which can be called "
    "zero or multiple times according to your needs:\n\n"
    "✿FUNCTION✿: The tool to use, should be one of [get_weather]\n✿ARGS✿: The input of the tool\n"
    "✿RESULT✿: Tool results\n✿RETURN✿: Reply based on tool results. Images need to be rendered as ![](url)")


@pytest.mark.parametrize("system", [None, "You are terse."])
def test_hermes_template_literal(system):
    conv = ([{"role": "system", "content": system}] if system else []) + [USER, CALL, RESULT]
    rendered = render_chat(conv, tools=[WEATHER], tool_format="hermes")
    head = system or "You are a helpful assistant."
    assert rendered.text == (
        f"<|im_start|>system\n{head}\n\n{HERMES_BLOCK}<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
        f"<|im_start|>user\n<tool_response>\nsunny{IMAGE}\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")
    assert [p.source for p in rendered.media] == ["sky.png"]
    assert [rendered.text[a:b] for a, b in rendered.train_spans] == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>']


def test_hermes_several_results_share_one_user_turn_and_content_precedes_calls():
    call = {"role": "assistant", "content": "Checking both.", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]}
    conv = [USER, call, {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "rain"},
            {"role": "assistant", "content": "Paris is sunny, Rome rainy."}]
    text = render_chat(conv, add_generation_prompt=False).text
    assert text.endswith(
        "<|im_start|>assistant\nChecking both.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\nParis is sunny, Rome rainy.<|im_end|>\n")
    assert "# Tools" not in text  # no tools given: calls and results render, no tool block


@pytest.mark.parametrize("system", [None, "You are terse."])
def test_qwen_template_literal(system):
    conv = ([{"role": "system", "content": system}] if system else []) + [USER, CALL, RESULT]
    rendered = render_chat(conv, tools=[WEATHER], tool_format="qwen")
    head = system or "You are a helpful assistant."
    # the turn stays open after the results: the model continues from ✿RETURN✿
    assert rendered.text == (
        f"<|im_start|>system\n{head}\n\n{QWEN_BLOCK}<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n✿FUNCTION✿: get_weather\n✿ARGS✿: {"city": "Paris"}\n'
        f"✿RESULT✿: sunny{IMAGE}\n✿RETURN✿")
    assert len(rendered.media) == 1
    full = render_chat(conv + [{"role": "assistant", "content": "Sunny."}], tools=[WEATHER], tool_format="qwen",
                       add_generation_prompt=False)
    assert full.text.endswith(f"✿RESULT✿: sunny{IMAGE}\n✿RETURN✿: Sunny.<|im_end|>\n")
    # trained: the call and its stop string, then the reply; never the result
    assert [full.text[a:b] for a, b in full.train_spans] == [
        '✿FUNCTION✿: get_weather\n✿ARGS✿: {"city": "Paris"}\n✿RESULT✿', ": Sunny.<|im_end|>"]
    assert stop_strings("qwen") == ["✿RESULT✿", "✿RETURN✿"] and stop_strings("hermes") == []


def test_qwen_parallel_calls_and_results():
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]}
    text = render_chat([USER, call, {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "rain"}],
                       tools=[WEATHER], tool_format="qwen", parallel_tool_calls=True).text
    assert "## Insert the following command in your reply when you need to call N tools in parallel:" in text
    assert text.endswith('✿FUNCTION✿: get_weather\n✿ARGS✿: {"city": "Paris"}\n✿FUNCTION✿: get_weather\n'
                         '✿ARGS✿: {"city": "Rome"}\n✿RESULT✿: sunny\n✿RESULT✿: rain\n✿RETURN✿')


@pytest.mark.parametrize("fmt", ["hermes", "qwen"])
@pytest.mark.parametrize("system", [None, "You are terse.", [{"type": "text", "text": "Parts."}]])
def test_fold_tools_renders_like_tools(fmt, system):
    from qwen2vl.processing.chat import fold_tools

    conv = ([{"role": "system", "content": system}] if system else []) + [USER, CALL, RESULT]
    folded = fold_tools(conv, [WEATHER], fmt)
    assert render_chat(folded, tool_format=fmt).text == render_chat(conv, tools=[WEATHER], tool_format=fmt).text
    assert conv[0].get("content") == system or conv[0] is USER  # the input is not changed


def test_bad_tool_input_is_named():
    with pytest.raises(ValueError, match="tool 0"):
        render_chat([USER], tools=[{"type": "function", "function": {"description": "no name"}}])
    bad = {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}
    with pytest.raises(ValueError, match="message 1, tool call 0: arguments are not valid JSON"):
        render_chat([USER, bad])
    with pytest.raises(ValueError, match="message 1: in the qwen tool format a tool message must follow"):
        render_chat([USER, {"role": "tool", "content": "x"}], tool_format="qwen")
    with pytest.raises(ValueError, match="unknown tool format"):
        render_chat([USER], tool_format="xml")


# ------------------------------------------------------------------------------------------ parser

HERMES_ANSWER = ('I will check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                 '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')
QWEN_ANSWER = ('I will check both.\n✿FUNCTION✿: get_weather\n✿ARGS✿: {"city": "Paris"}\n'
               '✿FUNCTION✿: get_weather\n✿ARGS✿: {"city": "Rome"}\n✿RESULT✿: made up')
CALLS = [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_weather", "arguments": {"city": "Rome"}}]


@pytest.mark.parametrize("fmt, answer", [("hermes", HERMES_ANSWER), ("qwen", QWEN_ANSWER)])
def test_parse_complete_several_calls(fmt, answer):
    assert parse_tool_calls(answer, tool_format=fmt) == ("I will check both.", CALLS)
    assert parse_tool_calls("Just text.", tool_format=fmt) == ("Just text.", [])


def _stream(fmt, pieces):
    parser = ToolCallStreamParser(fmt)
    events = [e for piece in pieces for e in parser.feed(piece)]
    return events, parser.finish()


@pytest.mark.parametrize("fmt, answer", [("hermes", HERMES_ANSWER), ("qwen", QWEN_ANSWER)])
def test_stream_token_by_token_equals_complete(fmt, answer):
    tokenizer = Tokenizer.from_pretrained(EMBEDDED_MODEL)
    ids = tokenizer.encode(answer)
    decoder = tokenizer.incremental_decoder()
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == answer and len(pieces) > 20
    for split in (pieces, list(answer)):  # the tokenizer's pieces, then one character at a time
        events, parsed = _stream(fmt, split)
        assert (parsed.content, parsed.calls, parsed.malformed) == ("I will check both.", CALLS, False)
        assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == "I will check both."
        starts = [e for e in events if isinstance(e, ToolCallStart)]
        assert [(s.index, s.name) for s in starts] == [(0, "get_weather"), (1, "get_weather")]
        assert [s.id for s in starts] == parsed.ids and all(i.startswith("call_") for i in parsed.ids)
        for k in (0, 1):
            args = "".join(e.text for e in events if isinstance(e, ToolCallArguments) and e.index == k)
            assert json.loads(args) == CALLS[k]["arguments"]
        # no call text leaks into shown content, and a call starts before its arguments
        order = [type(e).__name__ for e in events]
        assert order.index("ToolCallStart") < order.index("ToolCallArguments")


def test_qwen_streamed_arguments_end_with_their_json():
    """Text the model writes after the ✿ARGS✿ JSON (before the next marker) is content, not arguments."""
    answer = '✿FUNCTION✿: get_weather\n✿ARGS✿: {"city": "Oslo"}\nI will wait.'
    parser = ToolCallStreamParser("qwen")
    events = [e for piece in answer for e in parser.feed(piece)]
    events += parser.flush()  # the end of the answer releases the rest
    parsed = parser.finish()
    args = "".join(e.text for e in events if isinstance(e, ToolCallArguments))
    assert json.loads(args) == {"city": "Oslo"} == parsed.calls[0]["arguments"]
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == parsed.content == "I will wait."


def test_stream_arguments_arrive_before_the_call_closes():
    parser = ToolCallStreamParser("hermes")
    events = parser.feed('<tool_call>\n{"name": "f", "arguments": {"text": "hel')
    assert isinstance(events[0], ToolCallStart) and events[0].name == "f"
    assert "".join(e.text for e in events[1:]) == '{"text": "hel'
    rest = parser.feed('lo"}}\n</tool_call>')
    assert "".join(e.text for e in rest) == 'lo"}'
    assert parser.finish().calls == [{"name": "f", "arguments": {"text": "hello"}}]


@pytest.mark.parametrize("fmt, answer", [
    ("hermes", 'Hi <tool_call>\n{"name": "f", "arguments": {bad json}}\n</tool_call> there'),
    ("hermes", '<tool_call>\n{"arguments": {}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": 1'),  # cut off
    ("qwen", "✿FUNCTION✿: f\n✿ARGS✿: {not json}"),
    ("qwen", "✿FUNCTION✿: f"),
])
def test_malformed_calls_come_back_as_content(fmt, answer):
    for pieces in ([answer], list(answer)):
        events, parsed = _stream(fmt, pieces)
        assert parsed.malformed and parsed.calls == [] and parsed.ids == []
        assert parsed.content == answer.strip()


def test_malformed_call_beside_a_good_one():
    text = ('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>\nnot json\n</tool_call>')
    parsed = parse_tool_output(text)
    assert parsed.calls == [{"name": "f", "arguments": {}}] and parsed.malformed
    assert parsed.content == "<tool_call>\nnot json\n</tool_call>"


def test_unclosed_but_complete_json_call_is_accepted():
    assert parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"a": 1}}') == ("", [
        {"name": "f", "arguments": {"a": 1}}])


def test_qwen_continuation_after_return_drops_the_colon():
    assert parse_tool_calls(": It is sunny.", tool_format="qwen") == ("It is sunny.", [])


def test_openai_tool_calls():
    out = to_openai_tool_calls(CALLS, ids=["call_a", "call_b"])
    assert out[0] == {"id": "call_a", "type": "function",
                      "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    fresh = to_openai_tool_calls(CALLS)
    assert len({c["id"] for c in fresh}) == 2 and all(c["id"].startswith("call_") for c in fresh)
    # the OpenAI shape renders back into the same template text as the parsed calls
    as_openai = {"role": "assistant", "content": None, "tool_calls": out}
    as_parsed = {"role": "assistant", "content": None, "tool_calls": [{"function": c} for c in CALLS]}
    assert render_chat([USER, as_openai]).text == render_chat([USER, as_parsed]).text


# The tools branch of Qwen2.5's chat template (the hermes format's reference), over the Qwen2-VL
# default system prompt, for text-only conversations; transformers renders it as the oracle.
HERMES_JINJA = """{%- if tools %}{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
{{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}
{%- for message in messages %}
{%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
{%- elif message.role == "assistant" %}{{- '<|im_start|>' + message.role }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
{%- endfor %}{{- '<|im_end|>\\n' }}
{%- elif message.role == "tool" %}
{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
{%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

PARITY = {
    "call and result": [USER, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"}],
    "system, two calls, two results, reply": [
        {"role": "system", "content": "Be brief."}, USER,
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
        {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "rain"},
        {"role": "assistant", "content": "Sunny; rain."}, {"role": "user", "content": "Thanks"}],
}


@pytest.mark.hf
@pytest.mark.parametrize("name", sorted(PARITY))
@pytest.mark.parametrize("with_tools", [True, False])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_hermes_matches_the_qwen25_tools_template(name, with_tools, add_generation_prompt):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(EMBEDDED_MODEL / "tokenizer.json"))
    tools = [WEATHER] if with_tools else None
    expected = hf.apply_chat_template(PARITY[name], tools=tools, chat_template=HERMES_JINJA, tokenize=False,
                                      add_generation_prompt=add_generation_prompt)
    assert render_chat(PARITY[name], add_generation_prompt, tools=tools).text == expected
