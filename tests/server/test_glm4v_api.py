"""GLM-4.1V through the HTTP server's chat completions with the model's own (hub-style) template: images as data URLs
give transformers' greedy answer, prompt length and log-probabilities."""

from __future__ import annotations

import openai
import torch
from vl_helpers import assert_chat_matches_transformers, image_data_url, picture


def test_chat_completion_matches_transformers(start_server, tiny_glm4v_dir):
    from transformers import AutoProcessor, Glm4vForConditionalGeneration

    server = start_server(str(tiny_glm4v_dir))
    client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
    images = [picture(120, 90, 7), picture(60, 80, 8)]
    parts = [{"type": "image_url", "image_url": {"url": image_data_url(img)}} for img in images]
    messages = [{"role": "user", "content": [parts[0], {"type": "text", "text": "What is this?"}, parts[1]]}]
    resp = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=8, logprobs=True)

    processor = AutoProcessor.from_pretrained(tiny_glm4v_dir)
    model = Glm4vForConditionalGeneration.from_pretrained(tiny_glm4v_dir, dtype=torch.float32).eval()
    hub_messages = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What is this?"}, {"type": "image"}]}]
    prompt = processor.apply_chat_template(hub_messages, add_generation_prompt=True)
    assert_chat_matches_transformers(resp, (model, processor), prompt, images)
