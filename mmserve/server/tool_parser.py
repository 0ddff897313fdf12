"""Tool calls (`--tool-call-parser`): the calls a model writes in its own format, read back into OpenAI's
`tool_calls`, whole or while streaming; and the JSON schemas that make `tool_choice` "required" or a named
function binding.

Formats (the model's own way of writing a call):
- `hermes` (also `qwen25`, `qwen3`): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per
  call, text before the first block is content;
- `llama3`: the answer is a call, `{"name": ..., "parameters": {...}}` (after an optional `<|python_tag|>`), several
  separated by `;`;
- `mistral`: `[TOOL_CALLS]` then a JSON list of `{"name", "arguments"}` (or v11's `name[ARGS]{...}` per call).

An answer that starts a call but does not parse as one stays content: the client sees what the model wrote.

`tool_choice` "required" and a named function do not depend on the format: the answer is constrained by a JSON
schema (a list of calls, each one of the tools with its parameters; or the named function's parameters alone, as
vLLM does) and read as such, so the calls always parse.

Streaming: content streams until a call could be starting (text that could still be a format's opening marker is
held back). From there each call is streamed as OpenAI does: a first delta with its index, id and name once the name
is written and its arguments have begun, then the arguments' JSON text in fragments as the model writes them
(verbatim, so the fragments join to exactly what the model wrote). The whole answer is parsed when it ends: a call
the fragments could not follow (arguments before the name, or given as a JSON string) is then sent whole; an answer
that turns out not to hold calls, and that sent none, is sent as content. Once a call has gone out it cannot be
taken back: if the answer then fails to parse (cut by max_tokens), the client has what was written.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from mmserve.tokenizer.detokenizer import stop_holdback


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def _call(obj: Any, args_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


_DECODER = json.JSONDecoder()


def _json_values(text: str) -> list[Any] | None:
    """The JSON values of `text` in order, separated by whitespace or `;`; None if anything else is there."""
    values, at = [], 0
    while True:
        while at < len(text) and (text[at].isspace() or text[at] == ";"):
            at += 1
        if at == len(text):
            return values
        try:
            value, at = _DECODER.raw_decode(text, at)
        except ValueError:
            return None
        values.append(value)


def _object_prefix(text: str, start: int) -> tuple[str, bool]:
    """The JSON object that opens at text[start] ("{"), as far as `text` goes: (its text so far, whether it closed)."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start : i + 1], True
    return text[start:], False


# a call's name, then its arguments object opening: `"name": "f", "arguments": {` (or "parameters")
_NAME_THEN_ARGS = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')


@dataclass
class PartialCall:
    name: str
    arguments: str  # the arguments' JSON text as far as written
    closed: bool


def _partial_calls(text: str, pattern: re.Pattern, quoted_name: bool = True) -> list[PartialCall]:
    """The calls `text` has begun so far, in order: each whose name is written and whose arguments object has
    opened, with its arguments as far as written; the last may still be open."""
    calls, at = [], 0
    while (m := pattern.search(text, at)) is not None:
        args, closed = _object_prefix(text, m.end())
        try:
            name = json.loads(f'"{m.group(1)}"') if quoted_name else m.group(1).strip()
        except ValueError:
            return calls
        calls.append(PartialCall(name, args, closed))
        if not closed:
            break
        at = m.end() + len(args)
    return calls


class ToolParser:
    name = ""
    markers: tuple[str, ...] = ()  # text that starts a call

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole answer; ([text], []) when it holds no call that parses."""
        raise NotImplementedError

    def partial(self, text: str) -> list[PartialCall]:
        """The calls begun so far in `text` (from where a call starts), for streaming their arguments."""
        return _partial_calls(text, _NAME_THEN_ARGS)

    def call_starts(self, text: str) -> int | None:
        """Where in `text` a call starts, or None."""
        hits = [text.find(m) for m in self.markers if m in text]
        return min(hits) if hits else None


class HermesParser(ToolParser):
    name = "hermes"
    markers = ("<tool_call>",)
    _block = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        start = self.call_starts(text)
        if start is None:
            return text, []
        calls = []
        for body in self._block.findall(text[start:]):
            values = _json_values(body)
            call = _call(values[0], "arguments") if values and len(values) == 1 else None
            if call is None:
                return text, []
            calls.append(call)
        rest = self._block.sub("", text[start:]).strip()
        if not calls or rest:
            return text, []
        return (text[:start] or None), calls


class Llama3Parser(ToolParser):
    name = "llama3"
    markers = ("<|python_tag|>", "{")

    def call_starts(self, text: str) -> int | None:
        stripped = text.lstrip()
        if stripped.startswith(("<|python_tag|>", "{")):
            return len(text) - len(stripped)
        return None

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.call_starts(text) is None:
            return text, []
        values = _json_values(text.strip().removeprefix("<|python_tag|>"))
        calls = [_call(v, "parameters") for v in values or []]
        if not calls or any(c is None for c in calls):
            return text, []
        return None, calls


class MistralParser(ToolParser):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    _v11 = re.compile(r"\[TOOL_CALLS\]\s*([^\[\]{}\"]+?)\[ARGS\](?=\{)")

    def partial(self, text: str) -> list[PartialCall]:
        if self._v11.search(text):
            return _partial_calls(text, self._v11, quoted_name=False)
        return super().partial(text)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        start = self.call_starts(text)
        if start is None:
            return text, []
        body = text[start + len("[TOOL_CALLS]"):].strip()
        calls: list[ToolCall | None] = []
        if body.startswith("["):
            values = _json_values(body)
            if values and len(values) == 1 and isinstance(values[0], list):
                calls = [_call(v, "arguments") for v in values[0]]
        else:  # v11: name[ARGS]{...}, each call after its own [TOOL_CALLS]
            for part in body.split("[TOOL_CALLS]"):
                name, sep, args = part.partition("[ARGS]")
                values = _json_values(args) if sep else None
                ok = values is not None and len(values) == 1 and name.strip()
                calls.append(_call({"name": name.strip(), "arguments": values[0]}, "arguments") if ok else None)
        if not calls or any(c is None for c in calls):
            return text, []
        return (text[:start] or None), calls


PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesParser, "qwen25": HermesParser, "qwen3": HermesParser,
                                        "llama3": Llama3Parser, "mistral": MistralParser}


class ToolStream:
    """One streamed answer: content pieces until a call may be starting, then each call's deltas as it is written
    (see the module's docstring)."""

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.text = ""
        self.sent = 0  # characters of `text` already sent as content
        self.in_call = False
        self.started: list[tuple[str, str]] = []  # per call streamed so far: its name, its arguments sent so far
        self.called = False  # the whole answer parsed as calls (the choice finishes with tool_calls)

    def feed(self, piece: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """(content to send now, tool-call deltas in OpenAI's shape: each with its index; a call's first has its id,
        type and name)."""
        self.text += piece
        out = ""
        if not self.in_call:
            start = self.parser.call_starts(self.text[self.sent:])
            if start is not None:
                self.in_call = True
                start += self.sent
                out, self.sent = self.text[self.sent:start], start
            else:
                keep = 0 if final else stop_holdback(self.text, list(self.parser.markers))
                if isinstance(self.parser, Llama3Parser) and not final and not self.text.strip():
                    keep = len(self.text) - self.sent  # only blanks so far: a call may still open
                end = len(self.text) - keep
                out, self.sent = self.text[self.sent:end], max(self.sent, end)
                return out, []
        deltas = self._follow(self.parser.partial(self.text[self.sent:]))
        if not final:
            return out, deltas
        content, calls = self.parser.parse(self.text)
        self.called = bool(calls)
        if not calls:
            if not self.started:  # what was kept was not a call after all: it is content
                rest, self.sent = self.text[self.sent:], len(self.text)
                return out + rest, deltas
            return out, deltas  # calls went out and the answer ended unparsed (cut short): nothing to add
        for index, call in enumerate(calls[len(self.started):], start=len(self.started)):
            deltas.append(call.to_openai(index))  # a call the fragments could not follow: whole
            self.started.append((call.name, call.arguments))
        return out, deltas

    def _follow(self, partial: list[PartialCall]) -> list[dict[str, Any]]:
        deltas = []
        for index, call in enumerate(partial):
            if index == len(self.started):
                first = ToolCall(call.name, "").to_openai(index)
                deltas.append(first)
                self.started.append((call.name, ""))
            name, sent = self.started[index]
            if len(call.arguments) > len(sent):
                deltas.append({"index": index, "function": {"arguments": call.arguments[len(sent):]}})
                self.started[index] = (name, call.arguments)
        return deltas


# ----- tool_choice "required" and named functions -----

def function_of(tool: Any) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError("each tool must be {\"type\": \"function\", \"function\": {\"name\": ..., ...}}")
    return fn


def required_schema(tools: list[Any]) -> dict[str, Any]:
    """A JSON list of one or more calls, each one of `tools` with its parameters."""
    options = [{"type": "object", "properties": {"name": {"const": fn["name"]},
                                                  "parameters": fn.get("parameters") or {"type": "object"}},
                "required": ["name", "parameters"]} for fn in map(function_of, tools)]
    return {"type": "array", "minItems": 1, "items": {"anyOf": options}}


def named_schema(tools: list[Any], name: str) -> dict[str, Any]:
    for fn in map(function_of, tools):
        if fn["name"] == name:
            return fn.get("parameters") or {"type": "object"}
    raise ValueError(f"tool_choice names {name!r}, which is not among the tools")


def named_partial(name: str, text: str) -> list[PartialCall]:
    """A named function's call as far as written: the answer is its arguments object."""
    start = text.find("{")
    if start < 0:
        return []
    args, closed = _object_prefix(text, start)
    return [PartialCall(name, args, closed)]


def parse_required(text: str) -> list[ToolCall]:
    values = _json_values(text)
    if not values or len(values) != 1 or not isinstance(values[0], list):
        return []
    calls = [_call(v, "parameters") for v in values[0]]
    return [] if any(c is None for c in calls) else calls
