"""Phi-4-multimodal through the HTTP server: a chat completion with an `image_url` part and an `input_audio` part
gives transformers' greedy answer, prompt length and log-probabilities, rendered by the folder's hub-style template."""

from __future__ import annotations

import base64

import openai
import pytest
import torch
from audio_helpers import hf_generate, tone, wav_bytes
from vl_helpers import image_data_url, picture


@pytest.fixture(scope="module")
def hf(tiny_phi4_multimodal_dir):
    from transformers import AutoProcessor, Phi4MultimodalForCausalLM

    # eager: transformers' SDPA path makes the vision tower causal for unpadded crops (test_phi4_multimodal.py)
    model = Phi4MultimodalForCausalLM.from_pretrained(tiny_phi4_multimodal_dir, dtype=torch.float32,
                                                      attn_implementation="eager").eval()
    return model, AutoProcessor.from_pretrained(tiny_phi4_multimodal_dir)


def test_image_and_audio_chat_matches_transformers(start_server, tiny_phi4_multimodal_dir, hf):
    server = start_server(str(tiny_phi4_multimodal_dir))
    client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
    image, clip = picture(140, 110, 8), tone(520, 1.0)
    audio = {"data": base64.b64encode(wav_bytes(clip)).decode(), "format": "wav"}
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_url(image)}},
                                             {"type": "input_audio", "input_audio": audio},
                                             {"type": "text", "text": "Describe both."}]}]
    resp = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=8, logprobs=True)
    model, processor = hf
    prompt = "<|user|><|image|><|audio|>Describe both.<|end|><|assistant|>"
    ids, logits = hf_generate(hf, prompt, [image], [clip])
    prompt_len = processor(text=[prompt], images=[image], audio=[clip], return_tensors="pt")["input_ids"].shape[1]
    assert resp.usage.prompt_tokens == prompt_len
    assert resp.choices[0].message.content == processor.tokenizer.decode(ids)
    for got, token, step in zip(resp.choices[0].logprobs.content, ids, logits, strict=True):
        assert abs(got.logprob - step.log_softmax(-1)[token].item()) < 1e-4
