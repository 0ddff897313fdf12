"""CLIP (`CLIPModel`) as an embedding model on a tiny random checkpoint (float32, CPU): texts give the text tower's
projected features, image items the image tower's, normalised, each within cosine 1e-5 of transformers'
`get_text_features` / `get_image_features`, in one mixed batch, alone, and with texts prefilled in chunks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from vl_helpers import image_data_url, picture

from mmserve import Engine

TEXTS = ["a photo of a cat", "two dogs playing in the snow, one brown and one white, near a red fence"]
IMAGES = [picture(48, 40, 5), picture(30, 70, 6)]


def hf_features(path, texts: list[str], images: list) -> list[torch.Tensor]:
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(path, dtype=torch.float32).eval()
    tok, proc = AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt")["input_ids"]
            assert ids[0, 0] == 1 and ids[0, -1] == 0  # framed as CLIP frames a text: the pooled token is last
            out.append(model.get_text_features(input_ids=ids).pooler_output[0])
        for image in images:
            pixels = proc(images=[image], return_tensors="pt")["pixel_values"]
            out.append(model.get_image_features(pixel_values=pixels).pooler_output[0])
    return [F.normalize(v, dim=0) for v in out]


def assert_close(got: dict, ref: torch.Tensor, what: str) -> None:
    ours = torch.tensor(got["embedding"])
    assert ours.shape == ref.shape, what
    assert F.cosine_similarity(ours, ref, dim=0).item() >= 1 - 1e-5, what


def check_api_prepares_as_the_engine(engine: Engine, items: list[dict]) -> None:
    """/v1/embeddings' preparation of CLIP items (server/embeddings_api.py, on a stand-in for the tokenizer
    manager): the same token ids and media as the engine's, so the same embeddings; and its 400s."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from mmserve.server.embeddings_api import EmbeddingServing
    from mmserve.server.errors import APIError

    async def encode_async(text: str, add_special_tokens: bool = True) -> list[int]:
        return engine.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    with ThreadPoolExecutor(1) as pool:
        manager = SimpleNamespace(hf_config=engine.model_config.hf_config, args=engine.args, is_embedding=True,
                                  mm_pool=pool, encode_async=encode_async, chat_template=None, mm_processor=None)
        serving = EmbeddingServing(manager, "clip")
        for i, item in enumerate(items):
            assert asyncio.run(serving._prepare(item, f"input[{i}]")) == engine._embedding_input(item, f"input[{i}]")
        for item, words in [({"text": "a", "image": items[-1]["image"]}, "not both"),
                            ({"image": "data:image/png;base64,AAAA"}, "image"), ({"image": 3}, "must be a URL")]:
            with pytest.raises(APIError, match=words):
                asyncio.run(serving._prepare(item, "input[0]"))


def test_text_and_image_features_match_transformers(tiny_clip_dir):
    inputs = [TEXTS[0], {"image": IMAGES[0]}, {"text": TEXTS[1]}, {"image": image_data_url(IMAGES[1])}]
    with Engine(model_path=str(tiny_clip_dir), dtype="float32") as engine:
        assert engine.model_config.is_embedding  # chosen by the architecture
        batched = engine.encode(inputs)
        alone = [engine.encode(x) for x in inputs]
        again = engine.encode({"image": IMAGES[0]})
        with pytest.raises(ValueError, match="a text or an image, not both"):
            engine.encode({"text": "a cat", "image": IMAGES[0]})
        with pytest.raises(ValueError, match="input\\[0\\]: .*not a supported image"):
            engine.encode({"image": b"not an image"})
        check_api_prepares_as_the_engine(engine, inputs[2:])
    with Engine(model_path=str(tiny_clip_dir), dtype="float32", chunked_prefill_size=8) as engine:
        chunked = engine.encode([TEXTS[1], {"image": IMAGES[1]}])
        assert engine.scheduler.stats.prefill_steps >= 3  # the long text in 8-token chunks
    text_refs = hf_features(tiny_clip_dir, TEXTS, IMAGES)
    refs = [text_refs[0], text_refs[2], text_refs[1], text_refs[3]]
    for i, ref in enumerate(refs):
        assert_close(batched[i], ref, f"batched {i}")
        assert_close(alone[i], ref, f"alone {i}")
    assert_close(again, refs[1], "the same image again")
    assert_close(chunked[0], refs[2], "chunked text")
    assert_close(chunked[1], refs[3], "image after chunks")
    assert batched[1]["meta_info"]["prompt_tokens"] == 1
