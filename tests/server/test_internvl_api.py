"""InternVL 3 through the HTTP server's chat completions with the model's own (InternVL3-*-hf style) template: images
of different tile counts as data URLs give transformers' greedy answer, prompt length and log-probabilities."""

from __future__ import annotations

import openai
import torch
from vl_helpers import assert_chat_matches_transformers, image_data_url, picture


def test_chat_completion_matches_transformers(start_server, tiny_internvl_dir):
    from transformers import AutoProcessor, InternVLForConditionalGeneration

    server = start_server(str(tiny_internvl_dir))
    client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
    images = [picture(120, 40, 7), picture(60, 80, 8)]  # 4 and 7 tiles, thumbnails included
    parts = [{"type": "image_url", "image_url": {"url": image_data_url(img)}} for img in images]
    messages = [{"role": "user", "content": [parts[0], {"type": "text", "text": "What is this?"}, parts[1]]}]
    resp = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=8, logprobs=True)

    processor = AutoProcessor.from_pretrained(tiny_internvl_dir)
    model = InternVLForConditionalGeneration.from_pretrained(tiny_internvl_dir, dtype=torch.float32).eval()
    prompt = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What is this?"}, {"type": "image"}]}], add_generation_prompt=True)
    assert_chat_matches_transformers(resp, (model, processor), prompt, images)
