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


def assert_chat_matches_transformers(resp, hf, prompt: str, images: list[Image.Image]) -> None:
    """A server's greedy chat completion (with log-probs) against transformers on the prompt the family's processor
    renders from the hub template: the same prompt length, the same text, every step's log-probability within 1e-4."""
    processor = hf[1]
    ids, logits = hf_generate(hf, prompt, images)
    prompt_len = processor(text=[prompt], images=images, return_tensors="pt")["input_ids"].shape[1]
    assert resp.usage.prompt_tokens == prompt_len
    assert resp.choices[0].message.content == processor.tokenizer.decode(ids)
    for got, token, step in zip(resp.choices[0].logprobs.content, ids, logits, strict=True):
        assert abs(got.logprob - step.log_softmax(-1)[token].item()) < 1e-4


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


def check_prefix_cache_keyed_by_image(engine, image_token: str) -> None:
    """The same image again reuses the whole prompt but its last token, with the same answer; another image of the
    same size shares only the text before it, and answers otherwise."""
    img, other = picture(150, 100, 5), picture(150, 100, 6)
    prompt = f"Look: {image_token} and tell me."
    first = engine.generate(prompt, GREEDY, image_data=[img])
    again = engine.generate(prompt, GREEDY, image_data=[img])
    changed = engine.generate(prompt, GREEDY, image_data=[other])
    assert again["meta_info"]["cached_tokens"] == again["meta_info"]["prompt_tokens"] - 1
    assert again["output_ids"] == first["output_ids"]
    assert changed["meta_info"]["cached_tokens"] < changed["meta_info"]["prompt_tokens"] - 1
    assert changed["output_ids"] != first["output_ids"]


def solid_png(width: int, height: int, rgb: tuple[int, int, int] = (200, 30, 60)) -> bytes:
    """A valid RGB PNG of one colour, built row by row: 8192x8192 is about 200 KB that decode to 192 MiB."""
    import struct
    import zlib

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    row = b"\x00" + bytes(rgb) * width
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


# Qwen2-VL-Instruct / Qwen2.5-VL-Instruct: a loop over the parts that recognises images by `type == 'image'` or an
# `image`/`image_url` key, but videos only by `type == 'video'` or a `video` key: OpenAI's `video_url` part matches
# neither.
QWEN2_VL_STYLE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def image_data_url(image: Image.Image) -> str:
    """A PIL image as a PNG data URL, as a client sends it in an `image_url` part."""
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
