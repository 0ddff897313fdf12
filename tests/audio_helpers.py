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


def video_with_sound(frames: np.ndarray, fps: int, samples: np.ndarray | None, rate: int = RATE) -> bytes:
    """A Matroska video of `frames` [T, H, W, 3] (lossless RGB H.264: they decode as given) at `fps`, with `samples` as
    its 16-bit PCM sound track (decoded exactly; None: no sound track)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as out:
        video = out.add_stream("libx264rgb", rate=fps, options={"qp": "0"})
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "rgb24"
        sound = None if samples is None else out.add_stream("pcm_s16le", rate=rate, layout="mono")
        for pixels in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        if sound is not None:
            frame = av.AudioFrame.from_ndarray(np.round(samples * 32768).astype(np.int16)[None], format="s16",
                                               layout="mono")
            frame.sample_rate, frame.pts = rate, 0
            for packet in [*sound.encode(frame), *sound.encode()]:
                out.mux(packet)
    return buf.getvalue()


def hf_video_with_sound(processor, prompt: str, frames: np.ndarray, fps: float, sound: np.ndarray,
                        clips: list[np.ndarray] = ()) -> dict:
    """transformers' processor output for a prompt with standalone audio `clips` and then one video (its frames taken
    as sampled at `fps`) with its sound interleaved: 5.24's processor takes the sound per audio slot
    (`audio_from_video_indices`), 5.17's takes every clip in prompt order with `use_audio_in_video`."""
    metadata = {"fps": fps, "total_num_frames": len(frames), "frames_indices": list(range(len(frames)))}
    if hasattr(type(processor), "_resolve_audio_from_video"):  # transformers >= 5.24
        slots = dict(load_audio_from_video=True, audio_from_video_indices=[None] * len(clips) + [0])
    else:
        slots = dict(use_audio_in_video=True)
    return processor(text=[prompt], videos=[frames], audio=[*clips, sound], video_metadata=[metadata],
                     do_sample_frames=False, return_tensors="pt", **slots)
