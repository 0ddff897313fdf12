"""Llama 3.2 Vision through the HTTP server's chat completions with the model's own (hub style) template: images as
data URLs, read by the decoder's cross-attention, give transformers' greedy answer, prompt length and
log-probabilities."""

from __future__ import annotations

import openai
import torch
from vl_helpers import assert_chat_matches_transformers, image_data_url, picture


def test_chat_completion_matches_transformers(start_server, tiny_mllama_dir):
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    server = start_server(str(tiny_mllama_dir))
    client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
    images = [picture(60, 30, 7), picture(30, 80, 8)]
    parts = [{"type": "image_url", "image_url": {"url": image_data_url(img)}} for img in images]
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, *parts]}]
    resp = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=8, logprobs=True)

    processor = AutoProcessor.from_pretrained(tiny_mllama_dir)
    model = MllamaForConditionalGeneration.from_pretrained(tiny_mllama_dir, dtype=torch.float32).eval()
    prompt = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image"}, {"type": "image"}]}], add_generation_prompt=True)
    assert_chat_matches_transformers(resp, (model, processor), prompt, images)
