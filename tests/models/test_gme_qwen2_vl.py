"""gme-Qwen2-VL: Qwen2-VL served with --is-embedding and the `gme-qwen2-vl` template, on the tiny random Qwen2-VL
(float32, CPU). Each item {"text", "image"} is one user turn rendered by the template; its embedding is the last
token's final hidden state, L2-normalised, within cosine 1e-5 of transformers' on the same rendered prompt, whether
the items run batched, alone, or in prefill chunks that cut through the image's tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from vl_helpers import picture

from mmserve import Engine
from mmserve.tokenizer.chat_template import render_chat
from mmserve.tokenizer.embedding_input import item_conversation

ITEMS = [
    {"text": "a cat asleep on a red mat"},
    {"image": picture(64, 48, 1)},
    {"text": "what is in this picture?", "image": picture(40, 90, 2)},
]


def gme_engine(path, **kwargs) -> Engine:
    return Engine(model_path=str(path), dtype="float32", is_embedding=True, chat_template="gme-qwen2-vl", **kwargs)


def hf_embeddings(path, items: list[dict]) -> list[tuple[torch.Tensor, int]]:
    """transformers' last-token hidden state (normalised) and prompt length of each item's rendered prompt."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path)
    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for item in items:
        text = render_chat(processor.tokenizer, item_conversation(item), "gme-qwen2-vl")
        assert text.endswith("<|im_start|>assistant\n<|endoftext|>")
        enc = processor(text=[text], images=[item["image"]] if "image" in item else None, return_tensors="pt")
        with torch.no_grad():
            hidden = model.model(**enc).last_hidden_state[0, -1]
        out.append((F.normalize(hidden, dim=0), enc["input_ids"].shape[1]))
    return out


def assert_matches(got: dict, ref: tuple[torch.Tensor, int], what: str) -> None:
    vector, length = ref
    ours = torch.tensor(got["embedding"])
    assert got["meta_info"]["prompt_tokens"] == length, what
    assert F.cosine_similarity(ours, vector, dim=0).item() >= 1 - 1e-5, what
    assert abs(ours.norm().item() - 1) < 1e-5, what


def test_items_match_transformers_batched_alone_and_chunked(tiny_qwen2_vl_dir):
    """Also: items that are not served are refused by name."""
    with gme_engine(tiny_qwen2_vl_dir) as engine:
        batched = engine.encode(ITEMS)
        alone = [engine.encode(item) for item in ITEMS]
        assert engine.runner.model.encoder_cache.hits >= 2  # the images' second time: their features reused
        with pytest.raises(ValueError, match=r"input\[1\] has 'video'"):
            engine.encode([ITEMS[0], {"text": "x", "video": "clip.mp4"}])
        with pytest.raises(ValueError, match=r"input\[0\] has neither text nor an image"):
            engine.encode({"text": ""})
    with gme_engine(tiny_qwen2_vl_dir, chunked_prefill_size=8, disable_radix_cache=True) as engine:
        chunked = engine.encode(ITEMS)
        assert engine.scheduler.stats.prefill_steps >= 8  # 26-32 token prompts in 8-token chunks
    refs = hf_embeddings(tiny_qwen2_vl_dir, ITEMS)
    for i, ref in enumerate(refs):
        assert_matches(batched[i], ref, f"batched {i}")
        assert_matches(alone[i], ref, f"alone {i}")
        assert_matches(chunked[i], ref, f"chunked {i}")
    # text and image land in one space: the three differ from each other
    assert max(F.cosine_similarity(refs[0][0], r[0], dim=0).item() for r in refs[1:]) < 0.999
