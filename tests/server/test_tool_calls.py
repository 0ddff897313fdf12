"""Tool calling through the HTTP server with the real SmolLM2-135M-Instruct (`--tool-call-parser hermes`, the
`qwen` template, which renders tools and tool results): tool_choice "required" and a named function give calls
that parse and fit the tools' parameters (whole and streamed); "auto" reads the model's <tool_call> blocks (the
model made to write one with a regex); a tool result sent back is answered."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 20}},
                                                "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now.",
                                         "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def client(start_server, smollm2_dir):
    server = start_server(str(smollm2_dir), "--tool-call-parser", "hermes", "--chat-template", "qwen")
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)


def check_calls(calls) -> list[tuple[str, dict]]:
    out = []
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, PARAMS[call.function.name])
        out.append((call.function.name, args))
    return out


def test_required(client):
    resp = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, tool_choice="required",
                                          temperature=0, max_tokens=80)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = check_calls(choice.message.tool_calls)
    assert calls
    stream = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, tool_choice="required",
                                            temperature=0, max_tokens=80, stream=True)
    chunks = [c for c in stream if c.choices]
    assert streamed_calls(chunks) == calls
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def streamed_calls(chunks) -> list[tuple[str, dict]]:
    """Each call from its deltas, as the openai client's users join them: the first names it (with its id), the
    rest append to its arguments; more than one delta per call, so the arguments came in pieces."""
    calls: dict[int, list] = {}
    pieces = 0
    for chunk in chunks:
        for d in chunk.choices[0].delta.tool_calls or []:
            pieces += 1
            if d.index not in calls:
                assert d.id.startswith("call_") and d.type == "function"
                calls[d.index] = [d.function.name, ""]
            calls[d.index][1] += d.function.arguments or ""
    assert list(calls) == list(range(len(calls))) and pieces > len(calls)
    return [(name, json.loads(args)) for name, args in calls.values()]


def test_named_function(client):
    resp = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, temperature=0, max_tokens=40,
                                          tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"  # as OpenAI answers a named tool_choice
    [(name, args)] = check_calls(choice.message.tool_calls)
    assert name == "get_weather" and "city" in args
    stream = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, temperature=0, max_tokens=40,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            stream=True)
    chunks = [c for c in stream if c.choices]
    assert streamed_calls(chunks) == [(name, args)] and chunks[-1].choices[0].finish_reason == "stop"


def test_auto_reads_the_models_calls(client):
    pattern = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)"\}\}\n</tool_call>'
    resp = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, temperature=0, max_tokens=60,
                                          extra_body={"regex": pattern})
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [(name, args)] = check_calls(choice.message.tool_calls)
    assert name == "get_weather" and args["city"] in ("Paris", "Rome")
    plain = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, temperature=0, max_tokens=16)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content


def test_tool_result_is_answered(client):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": json.dumps({"city": "Paris"})}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 degrees."}]
    resp = client.chat.completions.create(model="default", messages=messages, tools=TOOLS, temperature=0,
                                          max_tokens=16, tool_choice="none")
    assert resp.choices[0].message.content


def test_bad_tool_choices(client):
    for choice, words in (({"type": "function", "function": {"name": "nope"}}, "not among the tools"),
                          ("sometimes", "tool_choice must be")):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, tool_choice=choice,
                                           max_tokens=4)
        assert info.value.body["param"] == "tool_choice" and words in info.value.body["message"]
