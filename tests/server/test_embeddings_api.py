"""The pooling routes over HTTP: /v1/embeddings (OpenAI's shapes, base64, dimensions, usage), /classify and
/v1/rerank on a one-label score head, checked against transformers; bad inputs and the wrong kind of server are
400s."""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

TEXTS = ["The capital of France is", "Once upon a time, in a land far away, there lived a"]


@pytest.fixture(scope="module")
def embed_server(start_server, tiny_pooling_dir):
    return start_server(str(tiny_pooling_dir("qwen2_embed")))


@pytest.fixture(scope="module")
def reward_server(start_server, tiny_pooling_dir):
    return start_server(str(tiny_pooling_dir("qwen3_reward")))


def reference_embedding(path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return F.normalize(model(torch.tensor([ids])).last_hidden_state[0, -1], dim=0)


def reference_score(path, ids: list[int]) -> float:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, 0].item()


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def test_embeddings_shapes_match_transformers(embed_server, tiny_pooling_dir, tokenizer):
    path = tiny_pooling_dir("qwen2_embed")
    ids = [tokenizer.encode(t) for t in TEXTS]
    refs = [reference_embedding(path, i) for i in ids]
    for body_input, expected in [(TEXTS[0], refs[:1]), (TEXTS, refs), (ids[1], refs[1:]), (ids, refs)]:
        r = post(embed_server, "/v1/embeddings", {"input": body_input, "model": "x"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and [d["index"] for d in body["data"]] == list(range(len(expected)))
        for d, ref in zip(body["data"], expected, strict=True):
            assert d["object"] == "embedding"
            assert F.cosine_similarity(torch.tensor(d["embedding"]), ref, dim=0).item() >= 1 - 1e-5
        n = sum(len(i) for i, ref in zip(ids, refs, strict=True) if any(ref is e for e in expected))
        assert body["usage"] == {"prompt_tokens": n, "total_tokens": n}


def test_base64_and_dimensions(embed_server):
    floats = post(embed_server, "/v1/embeddings", {"input": TEXTS[0]}).json()["data"][0]["embedding"]
    r = post(embed_server, "/v1/embeddings", {"input": TEXTS[0], "encoding_format": "base64"})
    decoded = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, np.asarray(floats, dtype=np.float32), atol=1e-6)
    short = post(embed_server, "/v1/embeddings", {"input": TEXTS[0], "dimensions": 8}).json()["data"][0]["embedding"]
    expected = F.normalize(torch.tensor(floats[:8]), dim=0)
    assert len(short) == 8 and torch.allclose(torch.tensor(short), expected, atol=1e-6)


@pytest.mark.parametrize("body, words", [
    ({"input": ""}, "input[0] is empty"),
    ({"input": []}, "must not be empty"),
    ({"input": [[]]}, "input[0] is empty"),
    ({"input": [5, -1]}, "input_ids must be in"),
    ({"input": TEXTS[0], "dimensions": 0}, "dimensions must be in [1, 64]"),
    ({"input": TEXTS[0], "dimensions": 65}, "dimensions must be in [1, 64]"),
    ({"input": TEXTS[0], "encoding_format": "int8"}, "encoding_format"),
    ({"input": [1.5]}, "input"),
    ({"input": "word " * 1100}, "too long"),
])
def test_bad_inputs_are_400(embed_server, body, words):
    r = post(embed_server, "/v1/embeddings", body)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"] + str(r.json()["error"]["param"])


def test_embeddings_on_a_generative_server_are_400():
    """The check every pooling route makes first (a generative server's manager says it is not an embedding one);
    the engine refuses such a request too (tests/models/test_embeddings.py)."""
    from types import SimpleNamespace

    from mmserve.server.embeddings_api import EmbeddingServing
    from mmserve.server.errors import APIError
    from mmserve.server.protocol import EmbeddingRequest

    config = SimpleNamespace(architectures=["Qwen2ForCausalLM"], hidden_size=64)
    manager = SimpleNamespace(is_embedding=False, hf_config=config, args=SimpleNamespace(model_path="tiny"))
    serving = EmbeddingServing(manager, "tiny")
    with pytest.raises(APIError, match="--is-embedding") as info:
        asyncio.run(serving.embeddings(EmbeddingRequest(input="hi")))
    assert info.value.status == 400


def test_generation_on_an_embedding_server_is_400(embed_server):
    for route, body in [("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                        ("/generate", {"text": "hi"})]:
        r = post(embed_server, route, body)
        assert r.status_code == 400 and "embedding model" in r.json()["error"]["message"], (route, r.text)
    r = post(embed_server, "/classify", {"input": "hi"})
    assert r.status_code == 400 and "not a classifier" in r.json()["error"]["message"]
    assert httpx.get(embed_server.url + "/model_info").json()["is_generation"] is False
    # still serving
    assert post(embed_server, "/v1/embeddings", {"input": "hi"}).status_code == 200


def test_classify_and_rerank_match_transformers(reward_server, tiny_pooling_dir, tokenizer):
    path = tiny_pooling_dir("qwen3_reward")
    scores = [reference_score(path, tokenizer.encode(t)) for t in TEXTS]
    for route, key in [("/classify", "text"), ("/v1/classify", "input")]:
        r = post(reward_server, route, {key: TEXTS})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        for d, score in zip(data, scores, strict=True):
            assert abs(d["logits"][0] - score) < 1e-4
            assert d["num_classes"] == 1 and d["label"] == "label_0"
            assert d["probs"][0] == pytest.approx(1 / (1 + np.exp(-score)), abs=1e-5)
    conversations = [[{"role": "user", "content": "What is the capital of France?"},
                      {"role": "assistant", "content": "Paris."}],
                     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bananas."}]]
    r = post(reward_server, "/classify", {"messages": conversations})
    assert r.status_code == 200, r.text
    for d, conversation in zip(r.json()["data"], conversations, strict=True):
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
        assert abs(d["logits"][0] - reference_score(path, tokenizer.encode(text, add_special_tokens=False))) < 1e-4
    one = post(reward_server, "/classify", {"messages": conversations[0]}).json()["data"]
    assert len(one) == 1 and one[0]["logits"] == pytest.approx(r.json()["data"][0]["logits"], abs=1e-5)
    docs = ["Paris is the capital.", "Bananas are yellow.", "The sky is blue."]
    r = post(reward_server, "/v1/rerank", {"query": "capital of France?", "documents": docs, "top_n": 2})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    pairs = [reference_score(path, tokenizer("capital of France?", d)["input_ids"]) for d in docs]
    expected = sorted(range(3), key=lambda i: -pairs[i])[:2]
    assert [x["index"] for x in results] == expected
    for x in results:
        assert x["relevance_score"] == pytest.approx(1 / (1 + np.exp(-pairs[x["index"]])), abs=1e-5)
        assert x["document"] == {"text": docs[x["index"]]}
    r = post(reward_server, "/v1/rerank", {"query": "q", "documents": []})
    assert r.status_code == 400
    r = post(reward_server, "/classify", {"input": "a", "text": "b"})
    assert r.status_code == 400 and "exactly one" in r.json()["error"]["message"]
    r = post(reward_server, "/classify", {"messages": [[]]})
    assert r.status_code == 400 and "empty conversation" in r.json()["error"]["message"]
