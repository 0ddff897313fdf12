"""Structured output through the HTTP server with the real SmolLM2-135M-Instruct: `response_format` with a JSON
schema answers a real question in JSON that validates; `json_object`, streaming, n > 1, vLLM's `guided_choice`, a
regex on completions and on /generate; bad grammars are 400s naming their field."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
SCHEMA = {"type": "object", "properties": {"country": {"type": "string", "maxLength": 20},
                                           "capital": {"type": "string", "maxLength": 20}},
          "required": ["country", "capital"]}
FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def client(smollm2_server):
    return openai.OpenAI(base_url=smollm2_server.base_url, api_key="none", max_retries=0)


def test_json_schema_answer(client):
    resp = client.chat.completions.create(model="default", messages=QUESTION, temperature=0, max_tokens=48,
                                          response_format=FORMAT)
    answer = json.loads(resp.choices[0].message.content)
    jsonschema.validate(answer, SCHEMA)
    assert answer["capital"] == "Paris"
    assert resp.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="default", messages=QUESTION, temperature=0, max_tokens=48,
                                              response_format=FORMAT, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == resp.choices[0].message.content


def test_json_object_and_several_samples(client):
    resp = client.chat.completions.create(model="default", messages=QUESTION, temperature=1.0, max_tokens=64, n=3,
                                          seed=5, response_format={"type": "json_schema", "json_schema": {
                                              "name": "a", "schema": SCHEMA}})
    assert len(resp.choices) == 3
    for choice in resp.choices:
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    resp = client.chat.completions.create(model="default", messages=QUESTION, temperature=0, max_tokens=64,
                                          response_format={"type": "json_object"})
    if resp.choices[0].finish_reason == "stop":  # an open object may run past the budget; a closed one parses
        assert isinstance(json.loads(resp.choices[0].message.content), dict)
    assert resp.choices[0].message.content.startswith("{")


def test_choice_and_regex(client, smollm2_server):
    resp = client.chat.completions.create(model="default", messages=QUESTION, temperature=0, max_tokens=8,
                                          extra_body={"guided_choice": ["Paris", "London", "Rome"]})
    assert resp.choices[0].message.content in ("Paris", "London", "Rome")
    comp = client.completions.create(model="default", prompt="The capital of France is", temperature=0,
                                     max_tokens=10, extra_body={"regex": " [A-Z][a-z]+\\."})
    assert re.fullmatch(r" [A-Z][a-z]+\.", comp.choices[0].text), comp.choices[0].text
    out = httpx.post(f"{smollm2_server.url}/generate", json={"text": "The capital of France is", "sampling_params": {
        "temperature": 0, "max_new_tokens": 10, "regex": " (Paris|Lyon)"}}, timeout=60).json()
    assert out["text"] in (" Paris", " Lyon")


@pytest.mark.parametrize("extra, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "nope"}}}},
     "response_format", ["invalid json_schema", "nope"]),
    ({"response_format": {"type": "yaml"}}, "response_format", ["json_object"]),
    ({"extra_body": {"ebnf": "root ::= foo"}}, "ebnf", ["invalid ebnf", "foo"]),
    ({"response_format": {"type": "json_object"}, "extra_body": {"regex": "a+"}}, "regex", ["one grammar"]),
    ({"extra_body": {"guided_choice": []}}, "guided_choice", ["non-empty"]),
])
def test_bad_grammars_are_400(client, extra, param, words):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="default", messages=QUESTION, max_tokens=4, **extra)
    error = info.value.body
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error
