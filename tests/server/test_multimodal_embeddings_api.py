"""/v1/embeddings with multimodal items on one server (the tiny Qwen2-VL as gme-Qwen2-VL: --is-embedding,
--chat-template gme-qwen2-vl): a batch of text and image items equals transformers' last-token states of the
rendered prompts, base64 and `dimensions` apply to items too, and what is not served is a 400."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from vl_helpers import image_data_url, picture

from mmserve.tokenizer.chat_template import render_chat
from mmserve.tokenizer.embedding_input import item_conversation

IMAGES = [picture(64, 48, 1), picture(40, 90, 2)]
ITEMS = [{"text": "a cat asleep on a red mat"}, {"image": IMAGES[0]}, {"text": "what is this?", "image": IMAGES[1]}]


@pytest.fixture(scope="module")
def gme_server(start_server, tiny_qwen2_vl_dir):
    return start_server(str(tiny_qwen2_vl_dir), "--is-embedding", "--chat-template", "gme-qwen2-vl")


def wire(item: dict) -> dict:
    return {**item, "image": image_data_url(item["image"])} if "image" in item else item


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def test_items_batched_match_transformers(gme_server, tiny_qwen2_vl_dir):
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    r = post(gme_server, "/v1/embeddings", {"input": [wire(it) for it in ITEMS], "model": "gme"})
    assert r.status_code == 200, r.text
    body = r.json()
    processor = AutoProcessor.from_pretrained(tiny_qwen2_vl_dir)
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_qwen2_vl_dir, dtype=torch.float32).eval()
    lengths = []
    for item, got in zip(ITEMS, body["data"], strict=True):
        text = render_chat(processor.tokenizer, item_conversation(item), "gme-qwen2-vl")
        enc = processor(text=[text], images=[item["image"]] if "image" in item else None, return_tensors="pt")
        with torch.no_grad():
            ref = F.normalize(model.model(**enc).last_hidden_state[0, -1], dim=0)
        assert F.cosine_similarity(torch.tensor(got["embedding"]), ref, dim=0).item() >= 1 - 1e-5
        lengths.append(enc["input_ids"].shape[1])
    assert body["usage"]["prompt_tokens"] == sum(lengths)
    one = post(gme_server, "/v1/embeddings", {"input": wire(ITEMS[2]), "encoding_format": "base64", "dimensions": 8})
    decoded = np.frombuffer(base64.b64decode(one.json()["data"][0]["embedding"]), dtype="<f4")
    expected = F.normalize(torch.tensor(body["data"][2]["embedding"][:8]), dim=0).numpy()
    assert np.allclose(decoded, expected, atol=1e-5)


@pytest.mark.parametrize("path, body, words", [
    ("/v1/embeddings", {"input": [{"text": "a", "video": "x.mp4"}]}, "input[0] has 'video'"),
    ("/v1/embeddings", {"input": {"image": 5}}, "input[0].image must be a URL"),
    ("/v1/embeddings", {"input": {"text": ""}}, "neither text nor an image"),
    ("/v1/embeddings", {"input": {"image": "data:image/png;base64,AAAA"}}, "image"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "embedding model"),
])
def test_refusals_are_400(gme_server, path, body, words):
    r = post(gme_server, path, body)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]
