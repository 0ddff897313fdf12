"""LLaVA 1.5 against transformers on a tiny random model (float32, CPU): text only, one image, several images (two
of them adjacent), chunked prefill smaller than an image, and chat through the hub-style template."""

from __future__ import annotations

import pytest
import torch
from vl_helpers import GREEDY, assert_same, check_chunked_prefill, hf_generate, image_data_url, picture

from mmserve import Engine

IMAGE = "<image>"



@pytest.fixture(scope="module")
def hf(tiny_llava_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_llava_dir)


@pytest.fixture(scope="module")
def engine(tiny_llava_dir):
    with Engine(model_path=str(tiny_llava_dir), dtype="float32") as e:
        yield e


CASES = {
    "one image": (f"USER: {IMAGE}\nDescribe it briefly. ASSISTANT:", [picture(150, 100, 0)]),
    "three images, two adjacent": (f"USER: {IMAGE}{IMAGE}\nCompare them with {IMAGE} now. ASSISTANT:",
                                   [picture(90, 120, 1), picture(200, 60, 2), picture(64, 64, 3)]),
    "text only": ("USER: Just some text without pictures. ASSISTANT:", []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case, engine, hf):
    prompt, images = CASES[case]
    ours = engine.generate(prompt, GREEDY, return_logits=True, image_data=images if images else None)
    assert_same(ours, hf_generate(hf, prompt, images))


def test_chunked_prefill_smaller_than_an_image(tiny_llava_dir, hf):
    prompt, images = CASES["three images, two adjacent"]
    check_chunked_prefill(tiny_llava_dir, hf, prompt, images)


def chat_messages(*parts: dict) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, *parts]}]


def test_chat_with_the_hub_template(tiny_llava_dir, hf):
    """The model's own template (llava-hf style: images first, roles in capitals) renders OpenAI image parts as
    transformers' processor renders its messages, and the answer is transformers'."""
    images = [picture(120, 90, 7), picture(60, 80, 8)]
    _, processor = hf
    prompt = processor.apply_chat_template(chat_messages({"type": "image"}, {"type": "image"}),
                                           add_generation_prompt=True)
    assert prompt == f"USER: {IMAGE}\n{IMAGE}\nWhat is this? ASSISTANT:"
    messages = chat_messages(*({"type": "image_url", "image_url": {"url": image_data_url(img)}} for img in images))
    with Engine(model_path=str(tiny_llava_dir), dtype="float32") as e:
        from mmserve.tokenizer.chat_template import render_chat

        assert render_chat(e.tokenizer, messages, e.chat_template) == prompt
        chat = e.chat(messages, GREEDY)
        ours = e.generate(prompt, GREEDY, return_logits=True, image_data=images)
    ref = hf_generate(hf, prompt, images)
    assert chat["output_ids"] == ref[0]
    assert_same(ours, ref)


def test_vision_feature_layers_as_transformers_counts_them():
    from mmserve.models.clip import hidden_state_indices

    assert hidden_state_indices(-2, 24) == [23]  # llava-1.5: the penultimate block's output
    assert hidden_state_indices([-2, 0], 3) == [2, 0]
