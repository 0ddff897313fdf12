"""Helpers shared by the vision-language model tests: random pictures, transformers' greedy reference, the
token-and-logits comparison, and the chunked-prefill check."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

NEW_TOKENS = 8
GREEDY = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def picture(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


def video_data_url(path, frames: int, fps: int, size: tuple[int, int] = (80, 60)) -> str:
    """An H.264 MP4 of `frames` random frames at `fps`, written to `path`, as a data URL."""
    import base64

    import av

    width, height = size
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            pixels = np.random.RandomState(i).randint(0, 255, (height, width, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def sampled_at(fps: float, frames: np.ndarray) -> dict:
    """Video metadata for frames taken as they are, `fps` a second: what mmserve assumes of frame arrays (2 fps)."""
    return {"fps": fps, "total_num_frames": len(frames), "frames_indices": list(range(len(frames)))}


def hf_generate(hf, prompt: str, images: list[Image.Image], videos: list[np.ndarray] | None = None,
                video_metadata: list[dict] | None = None) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy tokens and raw next-token logits; hf = (model, processor). Videos are frames already
    sampled, at 2 fps unless `video_metadata` says otherwise."""
    model, processor = hf
    video_kwargs = {}
    if videos:
        video_kwargs = {"video_metadata": video_metadata or [sampled_at(2.0, v) for v in videos],
                        "do_sample_frames": False}
    enc = processor(text=[prompt], images=images or None, videos=videos or None, return_tensors="pt", **video_kwargs)
    out = model.generate(**enc, do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[0, enc["input_ids"].shape[1]:].tolist(), [lg[0] for lg in out.logits]


def assert_same(ours: dict, ref: tuple[list[int], list[torch.Tensor]]) -> None:
    """Same greedy tokens, and every step's logits within 1e-4 (ours from generate(..., return_logits=True))."""
    ids, logits = ref
    assert ours["output_ids"] == ids
    for step, (a, b) in enumerate(zip(ours["meta_info"]["logits"], logits, strict=True)):
        diff = (a - b).abs().max().item()
        assert diff < 1e-4, f"step {step}: max abs logit diff {diff}"


def check_chunked_prefill(model_dir, hf, prompt: str, images: list[Image.Image]) -> None:
    """Prefill chunks (8 tokens) smaller than an image: the same output as transformers, each image encoded once
    and then sliced for every chunk that holds some of its tokens."""
    from mmserve import Engine

    with Engine(model_path=str(model_dir), dtype="float32", chunked_prefill_size=8, disable_radix_cache=True) as small:
        ours = small.generate(prompt, GREEDY, return_logits=True, image_data=images)
        assert small.scheduler.stats.prefill_steps >= 4
        encoder = small.runner.model.encoder_cache
        assert encoder.stores == len(images) and encoder.hits >= 4
    assert_same(ours, hf_generate(hf, prompt, images))
