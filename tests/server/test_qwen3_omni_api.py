"""Qwen3-Omni's thinker through the HTTP server (one server): an `input_audio` part and an `audio_url` part (data URL)
in chat completions give transformers' greedy answer, prompt length and log-probabilities with the model's hub-style
template; /generate takes `audio_data`; bad audio is a 400 naming the part, and the server keeps serving. A
`video_url` part with `mm_processor_kwargs` `use_audio_in_video` gives transformers' answer with the video's sound
interleaved; a sound track over --max-audio-seconds, or none, is a 400 naming the video."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
import torch
from audio_helpers import AUDIO, hf_generate, hf_video_with_sound, tone, video_with_sound, wav_bytes

MESSAGES_TEXT = "What is this sound?"


@pytest.fixture(scope="module")
def server(start_server, tiny_qwen3_omni_dir):
    return start_server(str(tiny_qwen3_omni_dir), "--max-audio-seconds", "3")


@pytest.fixture(scope="module")
def hf(tiny_qwen3_omni_dir):
    from transformers import AutoProcessor, Qwen3OmniMoeThinkerForConditionalGeneration

    model = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(tiny_qwen3_omni_dir,
                                                                        dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_qwen3_omni_dir)


def test_audio_parts_match_transformers(server, hf):
    client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
    samples = tone(440, 1.5)
    encoded = base64.b64encode(wav_bytes(samples)).decode()
    parts = {"input_audio": {"type": "input_audio", "input_audio": {"data": encoded, "format": "wav"}},
             "audio_url": {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64," + encoded}}}
    model, processor = hf
    prompt = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "audio"}, {"type": "text", "text": MESSAGES_TEXT}]}], add_generation_prompt=True)
    ids, logits = hf_generate(hf, prompt, [], [samples])
    prompt_len = processor(text=[prompt], audio=[samples], return_tensors="pt")["input_ids"].shape[1]
    for part in parts.values():
        messages = [{"role": "user", "content": [part, {"type": "text", "text": MESSAGES_TEXT}]}]
        resp = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=8,
                                              logprobs=True)
        assert resp.usage.prompt_tokens == prompt_len
        assert resp.choices[0].message.content == processor.tokenizer.decode(ids)
        for got, token, step in zip(resp.choices[0].logprobs.content, ids, logits, strict=True):
            assert abs(got.logprob - step.log_softmax(-1)[token].item()) < 1e-4

    text = f"Hear {AUDIO} {MESSAGES_TEXT}"
    body = {"text": text, "audio_data": "data:audio/wav;base64," + encoded,
            "sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}}
    out = httpx.post(server.url + "/generate", json=body, timeout=60).json()
    assert out["output_ids"] == hf_generate(hf, text, [], [samples])[0]


@pytest.mark.parametrize(("part", "message"), [
    ({"type": "input_audio", "input_audio": {"data": base64.b64encode(b"not audio at all").decode(),
                                             "format": "wav"}}, "audio 0: not a supported audio format"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "aiff"}}, "input_audio.format must be one of"),
    ({"type": "audio_url", "audio_url": {"url": "http://127.0.0.1:9/a.wav"}}, "loopback, private"),
    ({"type": "input_audio", "input_audio": {"data": base64.b64encode(wav_bytes(tone(200, 4.0))).decode(),
                                             "format": "wav"}}, "over the limit of 3 s (--max-audio-seconds)"),
])
def test_bad_audio_is_a_400_and_the_server_keeps_serving(server, part, message):
    messages = [{"role": "user", "content": [part, {"type": "text", "text": "hi"}]}]
    resp = httpx.post(server.base_url + "/chat/completions", timeout=60,
                      json={"model": "m", "messages": messages, "max_tokens": 2})
    assert resp.status_code == 400
    assert message in resp.json()["error"]["message"]
    ok = httpx.post(server.base_url + "/chat/completions", timeout=60,
                    json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200


def video_part(frames: np.ndarray, sound: np.ndarray | None) -> dict:
    data = base64.b64encode(video_with_sound(frames, 2, sound)).decode()
    return {"type": "video_url", "video_url": {"url": "data:video/x-matroska;base64," + data}}


def test_a_video_with_its_sound_matches_transformers(server, hf):
    frames = np.random.RandomState(4).randint(0, 255, (4, 60, 80, 3), dtype=np.uint8)
    sound = tone(300, 2.5)
    client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
    messages = [{"role": "user", "content": [video_part(frames, sound), {"type": "text", "text": "What happens?"}]}]
    resp = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=8, logprobs=True,
                                          extra_body={"mm_processor_kwargs": {"use_audio_in_video": True}})
    model, processor = hf
    prompt = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "video"}, {"type": "text", "text": "What happens?"}]}], add_generation_prompt=True)
    enc = hf_video_with_sound(processor, prompt, frames, 2.0, sound)
    out = model.generate(**enc, use_audio_in_video=True, do_sample=False, max_new_tokens=8, eos_token_id=None,
                         output_logits=True, return_dict_in_generate=True)
    ids = out.sequences[0, enc["input_ids"].shape[1]:].tolist()
    assert resp.usage.prompt_tokens == enc["input_ids"].shape[1]
    assert resp.choices[0].message.content == processor.tokenizer.decode(ids)
    for got, token, step in zip(resp.choices[0].logprobs.content, ids, out.logits, strict=True):
        assert abs(got.logprob - step[0].log_softmax(-1)[token].item()) < 1e-4

    for sound, message in [(tone(300, 4.0), "video 0: the clip is 4.0 s long, over the limit of 3 s "
                                            "(--max-audio-seconds)"),
                           (None, "video 0: no audio track, which use_audio_in_video needs")]:
        messages = [{"role": "user", "content": [video_part(frames, sound), {"type": "text", "text": "hi"}]}]
        bad = httpx.post(server.base_url + "/chat/completions", timeout=60,
                         json={"model": "m", "messages": messages, "max_tokens": 2,
                               "mm_processor_kwargs": {"use_audio_in_video": True}})
        assert bad.status_code == 400
        assert message in bad.json()["error"]["message"]
