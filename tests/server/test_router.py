"""Two mmserve workers behind sglang-router (PyPI's `sglang_router.launch_router`, as a multi-machine deployment
runs it): the router finds both (their /health, /server_info and /model_info), and chat completions, streamed
ones and /generate through it answer as a worker does directly, spread over both workers."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
from conftest import ServerHandle, free_port

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def router(smollm2_server, start_server, smollm2_dir, tmp_path_factory):
    workers = [smollm2_server, start_server(str(smollm2_dir))]
    port = free_port()
    log_path = os.path.join(str(tmp_path_factory.mktemp("router_logs")), "router.log")
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
           "--worker-urls", *(w.url for w in workers), "--policy", "round_robin", "--log-level", "warn",
           "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    handle = ServerHandle(proc, port, log_path)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, handle.log()
        try:
            if httpx.get(handle.url + "/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, handle.log()
        time.sleep(0.5)
    yield handle, workers
    handle.stop()


def test_model_info_as_sglang_gives_it(router):
    _, workers = router
    info = httpx.get(workers[0].url + "/model_info", timeout=10).json()
    assert info["is_generation"] is True and info["served_model_name"] == "SmolLM2-135M-Instruct"
    assert info["architectures"] == ["LlamaForCausalLM"]
    assert httpx.get(workers[0].url + "/server_info", timeout=10).json()["dp_size"] == 1


def test_requests_through_the_router(router):
    handle, workers = router
    direct = openai.OpenAI(base_url=workers[0].base_url, api_key="none", max_retries=0)
    routed = openai.OpenAI(base_url=handle.base_url, api_key="none", max_retries=0)
    expected = direct.chat.completions.create(model="default", messages=QUESTION, temperature=0, max_tokens=16)
    assert "Paris" in expected.choices[0].message.content
    before = [w.log().count("POST /v1/chat/completions") for w in workers]
    for _ in range(4):
        resp = routed.chat.completions.create(model="default", messages=QUESTION, temperature=0, max_tokens=16)
        assert resp.choices[0].message.content == expected.choices[0].message.content
    after = [w.log().count("POST /v1/chat/completions") for w in workers]
    assert all(a - b >= 1 for a, b in zip(after, before, strict=True)), (before, after)  # both workers served
    stream = routed.chat.completions.create(model="default", messages=QUESTION, temperature=0, max_tokens=16,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected.choices[0].message.content
    out = httpx.post(handle.url + "/generate", json={"text": "The capital of France is", "sampling_params": {
        "temperature": 0, "max_new_tokens": 4}}, timeout=60).json()
    assert "Paris" in out["text"]
