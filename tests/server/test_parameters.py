"""Request parameters that used to be accepted and ignored: logit_bias, min_tokens, prompt_logprobs and
truncate_prompt_tokens now work; beam search, media_io_kwargs and image detail are refused with a 400 naming the
parameter, as is tool_choice "auto" on a server without --tool-call-parser; a list of prompts streams (completions
and /generate).

The shared `tiny_text_server` (a tiny random Qwen2 with SmolLM2's tokenizer, context 1024) serves the module."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import torch

EOS = 2  # tests/tiny_models.py
CONTEXT_LEN = 1024
VOCAB_SIZE = 49152
MSGS = [{"role": "user", "content": "Name three colours."}]
PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def model_path(tiny_model_dir):
    return str(tiny_model_dir("qwen2"))


@pytest.fixture(scope="module")
def http(tiny_text_server):
    with httpx.Client(base_url=tiny_text_server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def ok(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    return r.json()


def refused(r: httpx.Response, param: str | None, *words: str) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    for word in words:
        assert word in err["message"], err
    return err


def events(r: httpx.Response) -> list[dict[str, Any]]:
    assert r.status_code == 200, r.text
    lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def complete(http, **body) -> dict[str, Any]:
    return ok(http.post("/v1/completions", json={"model": "m", "temperature": 0, **body}))


# ----- logit_bias -----


def test_logit_bias_steers_chat_completions_and_generate(http, tokenizer):
    token = tokenizer.encode(" blue", add_special_tokens=False)[0]
    bias = {str(token): 100}
    text = complete(http, prompt=PROMPT, max_tokens=4, logit_bias=bias)["choices"][0]["text"]
    assert text == tokenizer.decode([token] * 4)
    chat = ok(http.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 3, "temperature": 0,
                                                      "logit_bias": bias}))
    assert chat["choices"][0]["message"]["content"] == tokenizer.decode([token] * 3)
    gen = ok(http.post("/generate", json={"text": PROMPT, "sampling_params": {
        "temperature": 0, "max_new_tokens": 3, "logit_bias": bias}}))
    assert gen["output_ids"] == [token] * 3
    # a -100 bias keeps the favourite away
    base = ok(http.post("/generate", json={"text": PROMPT, "sampling_params": {
        "temperature": 0, "max_new_tokens": 1}}))["output_ids"][0]
    avoided = ok(http.post("/generate", json={"text": PROMPT, "sampling_params": {
        "temperature": 0, "max_new_tokens": 1, "logit_bias": {str(base): -100}}}))["output_ids"][0]
    assert avoided != base


def test_bad_logit_bias_is_refused_naming_the_key(http):
    for bias, words in [({"abc": 1}, ["'abc'", "not a token id"]),
                        ({str(VOCAB_SIZE): 1}, [f"'{VOCAB_SIZE}'", "outside the vocabulary"]),
                        ({"5": 101}, ["'5'", "[-100, 100]"]),
                        ({"5": "high"}, ["'5'", "must be a number"])]:
        refused(http.post("/v1/completions", json={"prompt": "x", "logit_bias": bias}), "logit_bias", *words)
        refused(http.post("/v1/chat/completions", json={"messages": MSGS, "logit_bias": bias}), "logit_bias", *words)
    refused(http.post("/generate", json={"text": "x", "sampling_params": {"logit_bias": {str(VOCAB_SIZE): 1}}}),
            "sampling_params.logit_bias", "outside the vocabulary")


# ----- min_tokens -----


def test_min_tokens_holds_back_eos(http):
    eos_first = {"prompt": PROMPT, "max_tokens": 10, "logit_bias": {str(EOS): 100}}
    eager = complete(http, **eos_first)
    assert eager["usage"]["completion_tokens"] == 1 and eager["choices"][0]["finish_reason"] == "stop"
    held = complete(http, **eos_first, min_tokens=3)
    assert held["usage"]["completion_tokens"] == 4 and held["choices"][0]["finish_reason"] == "stop"
    chat = ok(http.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 10, "temperature": 0,
                                                      "logit_bias": {str(EOS): 100}, "min_tokens": 2}))
    assert chat["usage"]["completion_tokens"] == 3
    gen = ok(http.post("/generate", json={"text": PROMPT, "sampling_params": {
        "temperature": 0, "max_new_tokens": 10, "logit_bias": {str(EOS): 100}, "min_new_tokens": 5}}))
    assert len(gen["output_ids"]) == 6 and gen["output_ids"][-1] == EOS
    refused(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "min_tokens": 4}), "min_tokens",
            "max_tokens (3)")
    refused(http.post("/v1/completions", json={"prompt": "x", "min_tokens": -1}), "min_tokens")


# ----- prompt_logprobs -----


def test_prompt_logprobs_like_vllm_and_transformers(http, tokenizer, model_path):
    from transformers import AutoModelForCausalLM

    ids = tokenizer.encode(PROMPT)
    resp = complete(http, prompt=PROMPT, max_tokens=2, prompt_logprobs=2, logprobs=1, n=2)
    first, second = (c["prompt_logprobs"] for c in resp["choices"])
    assert first == second and len(first) == len(ids) and first[0] is None
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0], dim=-1)
    for pos in range(1, len(ids)):
        entry = first[pos]
        assert next(iter(entry)) == str(ids[pos])  # the prompt token comes first, as vLLM's
        assert entry[str(ids[pos])]["logprob"] == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=1e-4)
        assert entry[str(ids[pos])]["decoded_token"] == tokenizer.decode([ids[pos]])
        top = ref[pos - 1].topk(2)
        for rank, (lp, tid) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True), 1):
            assert entry[str(tid)]["rank"] == rank and entry[str(tid)]["logprob"] == pytest.approx(lp, abs=1e-4)
        assert len(entry) in (2, 3)
        if str(ids[pos]) not in {str(t) for t in top.indices.tolist()}:
            assert len(entry) == 3
    for c in resp["choices"]:  # output logprobs keep their own top 1
        assert all(len(t) == 1 for t in c["logprobs"]["top_logprobs"])
    chat = ok(http.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 1, "prompt_logprobs": 0}))
    plp = chat["prompt_logprobs"]
    assert len(plp) == chat["usage"]["prompt_tokens"] and plp[0] is None and all(len(e) in (1, 2) for e in plp[1:])
    assert chat["choices"][0]["logprobs"] is None
    assert "prompt_logprobs" not in complete(http, prompt=PROMPT, max_tokens=1)["choices"][0]
    refused(http.post("/v1/completions", json={"prompt": "x", "prompt_logprobs": -1}), "prompt_logprobs", "[0, 20]")
    refused(http.post("/v1/completions", json={"prompt": "x", "prompt_logprobs": 1, "stream": True}),
            "prompt_logprobs", "stream")


# ----- truncate_prompt_tokens -----


def test_truncate_prompt_tokens_keeps_the_last_tokens(http, tokenizer):
    ids = tokenizer.encode(PROMPT)
    cut = complete(http, prompt=PROMPT, max_tokens=4, truncate_prompt_tokens=5, echo=True)
    direct = complete(http, prompt=ids[-5:], max_tokens=4, echo=True)
    assert cut["usage"]["prompt_tokens"] == 5 and cut["choices"][0]["text"] == direct["choices"][0]["text"]
    whole = complete(http, prompt=PROMPT, max_tokens=1, truncate_prompt_tokens=-1)  # the context length
    assert whole["usage"]["prompt_tokens"] == len(ids)
    long_text = "word " * 3000  # past the context: refused untruncated, served truncated
    refused(http.post("/v1/completions", json={"prompt": long_text, "max_tokens": 1}), "prompt")
    assert complete(http, prompt=long_text, max_tokens=1, truncate_prompt_tokens=100)["usage"]["prompt_tokens"] == 100
    chat = ok(http.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 1, "truncate_prompt_tokens": 3}))
    assert chat["usage"]["prompt_tokens"] == 3
    for bad in (0, -2, CONTEXT_LEN + 1):
        refused(http.post("/v1/completions", json={"prompt": "x", "truncate_prompt_tokens": bad}),
                "truncate_prompt_tokens", str(bad))


# ----- refused until their issues land -----


TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}
IMAGE = "data:image/png;base64,iVBORw0KGgo="


@pytest.mark.parametrize("path, extra, param, words", [
    ("/v1/chat/completions", {"functions": [TOOL["function"]]}, "functions", []),
    ("/v1/chat/completions", {"function_call": "auto"}, "function_call", []),
    ("/v1/completions", {"use_beam_search": True}, "use_beam_search", ["beam search"]),
    ("/v1/chat/completions", {"media_io_kwargs": {"video": {"num_frames": 4}}}, "media_io_kwargs", []),
])
def test_unsupported_parameters_are_refused(http, path, extra, param, words):
    body = {"messages": MSGS} if path == "/v1/chat/completions" else {"prompt": "x"}
    refused(http.post(path, json={**body, "max_tokens": 1, **extra}), param, "not supported", *words)


@pytest.mark.parametrize("extra", [{"tools": [TOOL]}, {"tools": [TOOL], "tool_choice": "auto"}])
def test_auto_tool_choice_needs_a_parser(http, extra):
    refused(http.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 1, **extra}), "tool_choice",
            '"auto"', "--tool-call-parser")


def test_harmless_values_of_refused_parameters_pass(http):
    for extra in ({"tools": [TOOL], "tool_choice": "none"}, {"tool_choice": "none"}, {"use_beam_search": False},
                  {"media_io_kwargs": {}}, {"tools": []}):
        ok(http.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 1, **extra}))


def test_image_detail_other_than_auto_is_refused(http):
    def with_detail(detail: str) -> httpx.Response:
        part = {"type": "image_url", "image_url": {"url": IMAGE, "detail": detail}}
        return http.post("/v1/chat/completions", json={"messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is it?"}, part]}], "max_tokens": 1})

    for detail in ("low", "high"):
        refused(with_detail(detail), "messages[0].content[1].image_url.detail", f'"{detail}"', "not supported",
                "change nothing")
    refused(with_detail("auto"), "messages", "text model")  # past the detail check: this model takes no images


# ----- streaming a list of prompts -----


def test_completions_stream_a_list_of_prompts(http):
    body = {"prompt": ["Once upon a time", "The weather today"], "max_tokens": 5, "n": 2, "temperature": 0.9,
            "seed": 7, "echo": True}
    full = complete(http, **body)
    chunks = events(http.post("/v1/completions", json={**body, "stream": True,
                                                        "stream_options": {"include_usage": True}}))
    texts = {i: "" for i in range(4)}
    finishes = {}
    for c in chunks[:-1]:
        [choice] = c["choices"]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    assert texts == {c["index"]: c["text"] for c in full["choices"]}
    assert texts[1].startswith("Once upon a time") and texts[2].startswith("The weather today")
    assert finishes == {c["index"]: c["finish_reason"] for c in full["choices"]}
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # cached_tokens depends on what ran before
    assert {k: chunks[-1]["usage"][k] for k in counts} == {k: full["usage"][k] for k in counts}


def test_generate_streams_a_batch_with_an_index_per_prompt(http):
    params = {"temperature": 0, "max_new_tokens": 5}
    texts = ["Grass is", "The sky is", "Snow is"]
    full = ok(http.post("/generate", json={"text": texts, "sampling_params": params}))
    chunks = events(http.post("/generate", json={"text": texts, "sampling_params": params, "stream": True}))
    assert {c["index"] for c in chunks} == {0, 1, 2}
    for i, result in enumerate(full):
        mine = [c for c in chunks if c["index"] == i]
        assert "".join(c["text"] for c in mine) == result["text"]
        assert sum((c["output_ids"] for c in mine), []) == result["output_ids"]
        assert mine[-1]["finished"] and not any(c["finished"] for c in mine[:-1])
    ids = [[5, 6, 7], [8, 9]]
    by_ids = events(http.post("/generate", json={"input_ids": ids, "sampling_params": params, "stream": True}))
    assert {c["index"] for c in by_ids} == {0, 1}
    single = events(http.post("/generate", json={"text": "Grass is", "sampling_params": params, "stream": True}))
    assert all("index" not in c for c in single) and "".join(c["text"] for c in single) == full[0]["text"]
