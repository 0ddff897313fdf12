"""Helpers shared by the audio tests: tone clips, WAV bytes, and transformers' greedy reference for Qwen3-Omni."""

from __future__ import annotations

import io
import wave

import numpy as np
import torch
from vl_helpers import NEW_TOKENS

AUDIO = "<|audio_start|><|audio_pad|><|audio_end|>"
RATE = 16000


def tone(hz: float, seconds: float, rate: int = RATE) -> np.ndarray:
    """A sine wave as 16-bit PCM carries it (so a WAV of it decodes to exactly these samples)."""
    pcm = (0.5 * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate) * 32767).astype(np.int16)
    return pcm.astype(np.float32) / 32768


def wav_bytes(samples: np.ndarray, rate: int = RATE, channels: int = 1) -> bytes:
    """A 16-bit PCM WAV of mono samples (the same samples in every channel)."""
    pcm = np.round(samples * 32768).astype(np.int16)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.repeat(pcm, channels).tobytes())
    return buf.getvalue()


def hf_generate(hf, prompt: str, images: list, audios: list[np.ndarray]) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy tokens and raw next-token logits; hf = (model, processor)."""
    model, processor = hf
    enc = processor(text=[prompt], images=images or None, audio=audios or None, return_tensors="pt")
    out = model.generate(**enc, do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[0, enc["input_ids"].shape[1]:].tolist(), [lg[0] for lg in out.logits]
