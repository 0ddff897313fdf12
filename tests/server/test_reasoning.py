"""Reasoning parsers: whole answers split into reasoning and content as each format says, and streamed pieces,
cut at every position (tags split across pieces included), join to the same split; through the server, a real
SmolLM2 made to write a think block (with a regex) answers with `reasoning_content`, streamed too."""

from __future__ import annotations

import openai
import pytest

from mmserve.server.reasoning import PARSERS, ReasoningStream, split_reasoning

CASES = [
    # (parser, answer, reasoning, content)
    ("qwen3", "<think>\nfirst, add</think>\n\nIt is 4.", "\nfirst, add", "\n\nIt is 4."),
    ("qwen3", "  <think>hm</think>ok", "hm", "ok"),
    ("qwen3", "No thinking here <think>x</think>", None, "No thinking here <think>x</think>"),
    ("qwen3", "<think>never closed", "never closed", ""),
    ("qwen3", "<thin", None, "<thin"),
    ("deepseek-r1", "weighing it</think>Answer.", "weighing it", "Answer."),
    ("deepseek-r1", "<think>again</think>A", "again", "A"),
    ("deepseek-r1", "all thought, cut off", "all thought, cut off", ""),
    ("qwen3-thinking", "</think>direct", None, "direct"),
]


@pytest.mark.parametrize("name, answer, reasoning, content", CASES)
def test_split(name, answer, reasoning, content):
    assert split_reasoning(PARSERS[name], answer) == (reasoning, content)


@pytest.mark.parametrize("name, answer, reasoning, content", CASES)
def test_streamed_pieces_join_to_the_split(name, answer, reasoning, content):
    for size in (1, 2, 3, 5):
        stream = ReasoningStream(PARSERS[name])
        parts = [stream.feed(answer[i:i + size]) for i in range(0, len(answer), size)] + [stream.feed("", final=True)]
        assert "".join(r for r, _ in parts) == (reasoning or "")
        assert "".join(c for _, c in parts) == content


REGEX = "<think>[a-z]{2,6}</think>[A-Z][a-z]{2,6}"


@pytest.fixture(scope="module")
def client(start_server, smollm2_dir):
    server = start_server(str(smollm2_dir), "--reasoning-parser", "qwen3")
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)


def test_server_separates_reasoning(client):
    question = [{"role": "user", "content": "Think, then name a city."}]
    resp = client.chat.completions.create(model="default", messages=question, temperature=0, max_tokens=40,
                                          extra_body={"regex": REGEX})
    message = resp.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and reasoning.isalpha() and reasoning.islower(), message
    assert message.content[0].isupper() and message.content.isalpha(), message
    streamed = list(client.chat.completions.create(model="default", messages=question, temperature=0, max_tokens=40,
                                                   extra_body={"regex": REGEX}, stream=True))
    deltas = [c.choices[0].delta for c in streamed if c.choices]
    assert "".join(d.content or "" for d in deltas) == message.content
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == reasoning
    plain = client.chat.completions.create(model="default", messages=question, temperature=0, max_tokens=40,
                                           extra_body={"regex": REGEX, "separate_reasoning": False})
    assert plain.choices[0].message.content == f"<think>{reasoning}</think>{message.content}"
