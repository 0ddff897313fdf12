"""The server through the official `openai` client and raw HTTP, on a tiny model: outputs equal the in-process
engine's, streaming, n/seed/stop/logprobs, echo scoring like lm-eval, concurrency, disconnect-abort, metrics,
a full queue, and graceful shutdown (an engine crash: test_hostile.py)."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import threading
import time

import httpx
import openai
import pytest
import torch

from mmserve import Engine

MSGS = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def model_path(tiny_model_dir):
    return str(tiny_model_dir("qwen2"))


@pytest.fixture(scope="module")
def server(start_server, model_path):
    return start_server(model_path, "--enable-metrics")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused")


@pytest.fixture(scope="module")
def engine(model_path):
    with Engine(model_path=model_path, dtype="float32") as e:
        yield e


def server_info(server) -> dict:
    return httpx.get(server.url + "/get_server_info", timeout=5).json()


def wait_idle(server, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    info = server_info(server)
    while time.monotonic() < deadline:
        info = server_info(server)
        stats = info["stats"]
        if info["in_flight"] == 0 and stats and stats["running"] == 0 and stats["kv_used_tokens"] == 0:
            break
        time.sleep(0.1)
    return info


def test_chat_equals_the_engine(client, engine):
    resp = client.chat.completions.create(model="m", messages=MSGS, max_tokens=12, temperature=0)
    ref = engine.chat(MSGS, {"temperature": 0, "max_new_tokens": 12})
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref["text"]
    assert choice.finish_reason == ref["meta_info"]["finish_reason"]["type"]
    assert resp.usage.prompt_tokens == ref["meta_info"]["prompt_tokens"]
    assert resp.usage.completion_tokens == ref["meta_info"]["completion_tokens"]
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.usage.prompt_tokens_details.cached_tokens >= 0


def test_max_completion_tokens_and_length(client):
    resp = client.chat.completions.create(model="m", messages=MSGS, max_completion_tokens=5, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 5


def test_completions_string_tokens_and_lists(client, engine):
    params = {"temperature": 0, "max_new_tokens": 8}
    ref = engine.generate("The colour of the sky is", params)
    one = client.completions.create(model="m", prompt="The colour of the sky is", max_tokens=8, temperature=0)
    assert one.choices[0].text == ref["text"] and one.object == "text_completion"
    ids = engine.tokenizer.encode("The colour of the sky is")
    by_ids = client.completions.create(model="m", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == ref["text"]
    two = client.completions.create(model="m", prompt=["The colour of the sky is", "Grass is"], max_tokens=8,
                                    temperature=0)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == ref["text"]
    assert two.choices[1].text == engine.generate("Grass is", params)["text"]
    echoed = client.completions.create(model="m", prompt="Grass is", max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("Grass is")


def test_streaming_chat_concatenates_and_ends_with_usage(client):
    full = client.chat.completions.create(model="m", messages=MSGS, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="m", messages=MSGS, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_streaming_completions(client):
    full = client.completions.create(model="m", prompt="Once upon a time", max_tokens=10, temperature=0)
    parts = list(client.completions.create(model="m", prompt="Once upon a time", max_tokens=10, temperature=0,
                                           stream=True))
    assert "".join(p.choices[0].text for p in parts) == full.choices[0].text


def test_n_with_seed_is_reproducible(client):
    kw = dict(model="m", messages=MSGS, max_tokens=8, temperature=1.0, n=3, seed=11)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1
    streamed = list(client.chat.completions.create(**kw, stream=True))
    texts = ["".join(c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == i)
             for i in range(3)]
    assert texts == [c.message.content for c in a.choices]


def test_stop_string_trims(client):
    base = client.chat.completions.create(model="m", messages=MSGS, max_tokens=12, temperature=0)
    text = base.choices[0].message.content
    words = text.split()
    assert len(words) >= 3
    stop = words[2]
    stopped = client.chat.completions.create(model="m", messages=MSGS, max_tokens=12, temperature=0, stop=[stop])
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_chat_logprobs(client):
    resp = client.chat.completions.create(model="m", messages=MSGS, max_tokens=6, temperature=0, logprobs=True,
                                          top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == 6
    assert "".join(c.token for c in content) == resp.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert c.top_logprobs[0].token == c.token and c.logprob == pytest.approx(c.top_logprobs[0].logprob)


def test_echo_logprobs_score_the_prompt_like_transformers(client, model_path, engine):
    """lm-eval's loglikelihood requests: echo=True, logprobs=1, max_tokens=0."""
    from transformers import AutoModelForCausalLM

    prompt = "The quick brown fox jumps over the lazy dog"
    resp = client.completions.create(model="m", prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = resp.choices[0].logprobs
    ids = engine.tokenizer.encode(prompt)
    assert resp.choices[0].text == prompt and len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0], dim=-1)
    expected = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert resp.usage.completion_tokens == 0


def test_32_concurrent_requests(client, engine):
    prompts = [f"Request number {i} says" for i in range(32)]
    refs = engine.generate(prompts, {"temperature": 0, "max_new_tokens": 6})

    def call(p):
        return client.completions.create(model="m", prompt=p, max_tokens=6, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(call, prompts))
    assert texts == [r["text"] for r in refs]


def test_disconnect_mid_stream_aborts_and_frees(server):
    body = {"messages": MSGS, "max_tokens": 800, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data:") for line in got)
        busy = server_info(server)
        assert busy["stats"]["running"] >= 1 and busy["stats"]["kv_used_tokens"] > 0
    info = wait_idle(server)
    assert info["in_flight"] == 0
    assert info["stats"]["running"] == 0 and info["stats"]["kv_used_tokens"] == 0
    assert info["stats"]["generated_tokens"] < 10_000  # it did not run to 800 tokens per earlier request


def test_generate_tokenize_detokenize_models(server, engine):
    r = httpx.post(server.url + "/generate", json={"text": "Grass is", "sampling_params":
                                                    {"temperature": 0, "max_new_tokens": 5}}).json()
    ref = engine.generate("Grass is", {"temperature": 0, "max_new_tokens": 5})
    assert r["text"] == ref["text"] and r["output_ids"] == ref["output_ids"]
    assert r["meta_info"]["prompt_tokens"] == ref["meta_info"]["prompt_tokens"]
    stream = httpx.post(server.url + "/generate", json={"text": "Grass is", "stream": True, "sampling_params":
                                                         {"temperature": 0, "max_new_tokens": 5}}).text
    events = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: {")]
    assert "".join(e["text"] for e in events) == ref["text"] and events[-1]["finished"]
    tok = httpx.post(server.url + "/tokenize", json={"prompt": "hello world"}).json()
    assert tok["tokens"] == engine.tokenizer.encode("hello world") and tok["count"] == len(tok["tokens"])
    detok = httpx.post(server.url + "/detokenize", json={"tokens": tok["tokens"]}).json()
    assert detok["prompt"] == "hello world"
    models = httpx.get(server.url + "/v1/models").json()
    assert models["data"][0]["max_model_len"] == 1024


def test_metrics_are_exported(server, client):
    client.chat.completions.create(model="m", messages=MSGS, max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in ("mmserve_requests_total", "mmserve_time_to_first_token_seconds_count",
                 "mmserve_inter_token_latency_seconds_bucket", "mmserve_num_running_reqs",
                 "mmserve_kv_cache_usage", "mmserve_prefix_cache_hit_rate", "mmserve_generation_tokens_total"):
        assert name in text
    ttft = [line for line in text.splitlines() if line.startswith("mmserve_time_to_first_token_seconds_count")]
    assert float(ttft[0].split()[-1]) >= 1


def test_full_queue_answers_503(start_server, model_path):
    handle = start_server(model_path, "--max-running-requests", "1", "--max-queued-requests", "0")
    # a generation near the context limit keeps the only running slot busy for seconds
    body = {"messages": MSGS, "max_tokens": 950, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", handle.url + "/v1/chat/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()  # keep the iterator: dropping it closes the connection (a disconnect)
        next(lines)
        assert server_info(handle)["in_flight"] == 1
        second = httpx.post(handle.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=30)
        assert second.status_code == 503 and "capacity" in second.json()["error"]["message"]
    # the disconnect reaches the server asynchronously; once it has aborted the stream, there is room again
    assert wait_idle(handle)["in_flight"] == 0
    ok = httpx.post(handle.url + "/v1/chat/completions", json={"messages": MSGS, "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


def test_sigterm_finishes_in_flight_then_exits_zero(start_server, model_path):
    handle = start_server(model_path)
    result = {}

    def call():
        body = {"messages": MSGS, "max_tokens": 60, "ignore_eos": True}
        result["resp"] = httpx.post(handle.url + "/v1/chat/completions", json=body, timeout=60)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.5)
    handle.proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert handle.proc.wait(timeout=60) == 0
    assert result["resp"].status_code == 200 and result["resp"].json()["usage"]["completion_tokens"] == 60
