"""LLaVA-NeXT against transformers on a tiny random model (float32, CPU): anyres tiles of different grids (1x2, 2x1,
2x2), unpadding of either axis, image_newline, several images in one prompt (two adjacent), text only, chunked
prefill smaller than an image, a Qwen2 decoder, and chat through the hub's Mistral template."""

from __future__ import annotations

import pytest
import torch
from vl_helpers import GREEDY, assert_same, check_chunked_prefill, hf_generate, picture

from mmserve import Engine

IMAGE = "<image>"


@pytest.fixture(scope="module")
def hf(tiny_llava_next_dir):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_llava_next_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_llava_next_dir)


@pytest.fixture(scope="module")
def engine(tiny_llava_next_dir):
    with Engine(model_path=str(tiny_llava_next_dir), dtype="float32") as e:
        yield e


CASES = {
    # 1x2 tiles
    "one wide image": (f"USER: {IMAGE}\nDescribe it briefly. ASSISTANT:", [picture(200, 60, 0)]),
    # 2x2 tiles with padded columns cut, 2x1 tiles, 2x2 tiles with padded rows cut
    "three images, two adjacent": (f"USER: {IMAGE}{IMAGE}\nCompare them with {IMAGE} now. ASSISTANT:",
                                   [picture(100, 150, 1), picture(60, 200, 2), picture(150, 100, 3)]),
    "text only": ("USER: Just some text without pictures. ASSISTANT:", []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case, engine, hf):
    prompt, images = CASES[case]
    ours = engine.generate(prompt, GREEDY, return_logits=True, image_data=images if images else None)
    assert_same(ours, hf_generate(hf, prompt, images))


def test_chunked_prefill_smaller_than_an_image(tiny_llava_next_dir, hf):
    prompt, images = CASES["three images, two adjacent"]
    check_chunked_prefill(tiny_llava_next_dir, hf, prompt, images)


def test_qwen2_backbone_matches_transformers(tiny_llava_next_qwen2_dir):
    """The decoder follows the text config's model_type: Qwen2's q/k/v biases."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_llava_next_qwen2_dir, dtype=torch.float32).eval()
    ref = (model, AutoProcessor.from_pretrained(tiny_llava_next_qwen2_dir))
    prompt, images = CASES["one wide image"]
    with Engine(model_path=str(tiny_llava_next_qwen2_dir), dtype="float32") as e:
        ours = e.generate(prompt, GREEDY, return_logits=True, image_data=images)
    assert_same(ours, hf_generate(ref, prompt, images))


def test_chat_with_the_hub_template(tiny_llava_next_dir, hf):
    images = [picture(100, 150, 7), picture(200, 60, 8)]
    _, processor = hf
    prompt = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image"}, {"type": "image"}]}])
    assert prompt == f"[INST] {IMAGE}\n{IMAGE}\nWhat is this? [/INST]"
    parts = [{"type": "image", "image": img} for img in images]
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, *parts]}]
    with Engine(model_path=str(tiny_llava_next_dir), dtype="float32") as e:
        from mmserve.tokenizer.chat_template import render_chat

        assert render_chat(e.tokenizer, messages, e.chat_template) == prompt
        chat = e.chat(messages, GREEDY)
    assert chat["output_ids"] == hf_generate(hf, prompt, images)[0]


def test_token_counts_match_the_processor(hf):
    from mmserve.multimodal.processors.llava_next import image_tokens

    model, processor = hf
    # (300, 60): the unpadded map keeps no row at all, as transformers rounds it
    for w, h in ((300, 60), (60, 300), (200, 60), (100, 150), (150, 100), (90, 120), (56, 56)):
        ids = processor(text=[IMAGE], images=[picture(w, h, 0)], return_tensors="pt")["input_ids"][0]
        count = int((ids == model.config.image_token_id).sum())
        assert image_tokens(model.config, [h, w]) == count, (w, h)
