"""Tool-call parsers on fixed model outputs: each format's calls read back (several, with text before them), an
answer that only looks like a call stays content, and streamed pieces, cut anywhere, give the same content and
calls; the schemas for tool_choice "required" and a named function."""

from __future__ import annotations

import json

import pytest

from mmserve.server.tool_parser import (
    PARSERS,
    ToolStream,
    named_schema,
    parse_required,
    required_schema,
)

WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "time"}}

CASES = [
    # (parser, answer, content, [(name, arguments)])
    ("hermes", '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>', None,
     [("weather", {"city": "Paris"})]),
    ("hermes", 'Let me check.\n<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
               '<tool_call>{"name": "time", "arguments": {}}</tool_call>', "Let me check.\n",
     [("weather", {"city": "Oslo"}), ("time", {})]),
    ("hermes", "Plain answer, no calls.", "Plain answer, no calls.", []),
    ("hermes", '<tool_call>{"name": "weather", "arguments": {"city": </tool_call>',
     '<tool_call>{"name": "weather", "arguments": {"city": </tool_call>', []),
    ("qwen25", '<tool_call>{"name": "time", "arguments": "{}"}</tool_call>', None, [("time", {})]),
    ("llama3", '{"name": "weather", "parameters": {"city": "Rome"}}', None, [("weather", {"city": "Rome"})]),
    ("llama3", '<|python_tag|>{"name": "weather", "parameters": {"city": "A"}}; {"name": "time", "parameters": {}}',
     None, [("weather", {"city": "A"}), ("time", {})]),
    ("llama3", "{not json at all", "{not json at all", []),
    ("llama3", "The answer is 4.", "The answer is 4.", []),
    ("mistral", '[TOOL_CALLS][{"name": "weather", "arguments": {"city": "Nice"}}]', None,
     [("weather", {"city": "Nice"})]),
    ("mistral", 'Sure.[TOOL_CALLS]weather[ARGS]{"city": "Lyon"}[TOOL_CALLS]time[ARGS]{}', "Sure.",
     [("weather", {"city": "Lyon"}), ("time", {})]),
]


def calls_of(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("name, answer, content, calls", CASES)
def test_parse(name, answer, content, calls):
    got_content, got_calls = PARSERS[name]().parse(answer)
    assert got_content == content
    assert calls_of(got_calls) == calls


def joined(deltas):
    """(name, arguments) per call from OpenAI-shaped deltas: a call's first delta names it, the rest add text."""
    calls: dict[int, list] = {}
    for d in deltas:
        if d["index"] not in calls:
            assert d["type"] == "function" and d["id"].startswith("call_") and d["function"]["name"]
            calls[d["index"]] = [d["function"]["name"], ""]
        calls[d["index"]][1] += d["function"].get("arguments", "")
    assert list(calls) == list(range(len(calls)))
    return [(name, json.loads(args)) for name, args in calls.values()]


# streamed cut after the call's name and its arguments' opening: the stream has sent that call (see below)
BROKEN_AFTER_OPENING = {'<tool_call>{"name": "weather", "arguments": {"city": </tool_call>'}


@pytest.mark.parametrize("name, answer, content, calls", CASES)
def test_streamed(name, answer, content, calls):
    for size in (1, 3, 7):
        stream = ToolStream(PARSERS[name]())
        pieces = [answer[i:i + size] for i in range(0, len(answer), size)]
        out = [stream.feed(p, final=False) for p in pieces] + [stream.feed("", final=True)]
        deltas = [d for _, ds in out for d in ds]
        if answer in BROKEN_AFTER_OPENING:
            # a call goes out once its name and the opening of its arguments are written, and cannot be taken back:
            # the client has what the model wrote, and the choice does not finish with tool_calls
            assert not stream.called and "".join(t for t, _ in out) == ""
            assert deltas[0]["function"]["name"] == "weather"
            continue
        assert "".join(t for t, _ in out) == (content or "")
        assert joined(deltas) == calls and stream.called == bool(calls)
        if calls and name != "qwen25":  # arguments written as an object stream before the answer ends
            assert any(ds for _, ds in out[:-1])


def test_arguments_stream_as_the_model_writes_them():
    """The fragments join to the model's own text of the arguments, and each call's name comes first, alone."""
    answer = '<tool_call>{"name": "weather", "arguments": {"city": "O\\"slo {x}", "days": [1, 2]}}</tool_call>'
    stream = ToolStream(PARSERS["hermes"]())
    deltas = [d for i in range(0, len(answer), 4) for d in stream.feed(answer[i:i + 4], final=False)[1]]
    deltas += stream.feed("", final=True)[1]
    assert deltas[0]["function"] == {"name": "weather", "arguments": ""}
    assert "".join(d["function"].get("arguments", "") for d in deltas) == '{"city": "O\\"slo {x}", "days": [1, 2]}'
    assert len(deltas) > 5


def test_required_and_named_schemas():
    import jsonschema

    schema = required_schema([WEATHER, TIME])
    good = [{"name": "weather", "parameters": {"city": "Paris"}}, {"name": "time", "parameters": {}}]
    jsonschema.validate(good, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "weather", "parameters": {}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], schema)
    assert calls_of(parse_required(json.dumps(good))) == [("weather", {"city": "Paris"}), ("time", {})]
    assert named_schema([WEATHER, TIME], "weather") == WEATHER["function"]["parameters"]
    with pytest.raises(ValueError, match="not among the tools"):
        named_schema([WEATHER], "time")
