"""LLaVA-OneVision against transformers on a tiny random model (float32, CPU): anyres tiles with the tile map
shrunk to `anyres_max_N` (2x2 grids) or not (1x2 grids), unpadding of either axis, image_newline, two images of
different sizes, video frames pooled to half size (7x7 -> 4x4) with one newline after the video, as arrays and as an
MP4 data URL, text only, a repeated image from the prefix cache, chunked prefill smaller than an image, and chat
through the hub's template."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vl_helpers import GREEDY, assert_same, check_chunked_prefill, hf_generate, image_data_url, picture, video_data_url

from mmserve import Engine

IMAGE, VIDEO = "<image>", "<video>"


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"



@pytest.fixture(scope="module")
def hf(tiny_llava_onevision_dir):
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_llava_onevision_dir,
                                                                   dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_llava_onevision_dir)


@pytest.fixture(scope="module")
def engine(tiny_llava_onevision_dir):
    with Engine(model_path=str(tiny_llava_onevision_dir), dtype="float32") as e:
        yield e


CASES = {
    # 2x2 tiles, padded columns cut, the map shrunk
    "one image": (chat(f"{IMAGE}\nDescribe it briefly."), [picture(100, 150, 1)]),
    # 1x2 tiles kept whole, then 2x2 tiles with padded rows cut and shrunk; adjacent
    "two images of different sizes": (chat(f"{IMAGE}\n{IMAGE}\nCompare them."),
                                      [picture(200, 60, 2), picture(150, 100, 3)]),
    "text only": (chat("Just some text without pictures."), []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case, engine, hf):
    prompt, images = CASES[case]
    ours = engine.generate(prompt, GREEDY, return_logits=True, image_data=images if images else None)
    assert_same(ours, hf_generate(hf, prompt, images))


def test_video_matches_transformers(engine, hf):
    frames = np.random.RandomState(9).randint(0, 255, (4, 60, 80, 3), dtype=np.uint8)
    prompt, image = chat(f"{IMAGE}\n{VIDEO}\nWhat happens?"), picture(70, 50, 10)
    ours = engine.generate(prompt, GREEDY, return_logits=True, image_data=[image], video_data=[frames])
    assert_same(ours, hf_generate(hf, prompt, [image], [frames]))


def test_video_url_matches_transformers_on_the_sampled_frames(engine, hf, tmp_path):
    """An MP4 is decoded and sampled at 2 frames a second (at least 4, an even count); transformers gets the same
    frames."""
    from mmserve.multimodal.media import MediaPolicy, load_video_frames
    from mmserve.multimodal.processor import sample_frame_indices

    url = video_data_url(tmp_path / "clip.mp4", frames=30, fps=10)  # 3 s: 6 frames
    frames, fps = load_video_frames(url, MediaPolicy())
    sampled = frames[sample_frame_indices(len(frames), fps, 2.0, 4, 768)]
    assert len(sampled) == 6
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": "What happens?"}]}]
    prompt = chat(f"{VIDEO}\nWhat happens?")
    ref = hf_generate(hf, prompt, [], [sampled])
    assert engine.chat(messages, GREEDY)["output_ids"] == ref[0]
    assert_same(engine.generate(prompt, GREEDY, return_logits=True, video_data=[url]), ref)
    # mmserve's frame sampling takes a request's frame settings (the processor gets frames sampled already)
    four = frames[sample_frame_indices(len(frames), fps, 2.0, 4, 4)]
    ours = engine.chat(messages, GREEDY, mm_processor_kwargs={"num_frames": 4})
    assert ours["output_ids"] == hf_generate(hf, prompt, [], [four])[0]


def test_repeated_image_hits_the_prefix_cache(engine, hf):
    prompt, images = CASES["one image"]
    engine.generate(prompt, GREEDY, image_data=images)
    again = engine.generate(prompt, GREEDY, return_logits=True, image_data=[images[0].copy()])
    assert again["meta_info"]["cached_tokens"] == again["meta_info"]["prompt_tokens"] - 1
    assert_same(again, hf_generate(hf, prompt, images))
    other = picture(*images[0].size, seed=99)  # same size, other pixels: only the text before the image is shared
    changed = engine.generate(prompt, GREEDY, image_data=[other])
    assert changed["meta_info"]["cached_tokens"] <= len(engine.tokenizer(prompt[:prompt.index(IMAGE)])["input_ids"])


def test_chunked_prefill_smaller_than_an_image(tiny_llava_onevision_dir, hf):
    prompt, images = CASES["two images of different sizes"]
    check_chunked_prefill(tiny_llava_onevision_dir, hf, prompt, images)


def test_chat_with_the_hub_template(engine, hf):
    """The hub's template (ChatML, each turn's images first) renders OpenAI image parts as transformers' processor
    renders its messages; SGLang's `chatml-llava` renders images-first messages the same."""
    from mmserve.tokenizer.chat_template import render_chat

    images = [picture(100, 150, 7), picture(200, 60, 8)]
    _, processor = hf
    prompt = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image"}, {"type": "image"}]}], add_generation_prompt=True)
    assert prompt == chat(f"{IMAGE}\n{IMAGE}\nWhat is this?")
    parts = [{"type": "image_url", "image_url": {"url": image_data_url(img)}} for img in images]
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, *parts]}]
    assert render_chat(engine.tokenizer, messages, engine.chat_template) == prompt
    images_first = [{"role": "user", "content": [*parts, {"type": "text", "text": "What is this?"}]}]
    assert render_chat(engine.tokenizer, images_first, "chatml-llava") == prompt
    video = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "clip.mp4"}},
                                          {"type": "text", "text": "And this?"}]}]
    assert render_chat(engine.tokenizer, video, "chatml-llava") == processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "And this?"}]}],
        add_generation_prompt=True) == chat(f"{VIDEO}\nAnd this?")
    ref = hf_generate(hf, prompt, images)
    assert engine.chat(messages, GREEDY)["output_ids"] == ref[0]
    assert_same(engine.generate(prompt, GREEDY, return_logits=True, image_data=images), ref)


def test_token_counts_match_the_processor(hf):
    from mmserve.multimodal.processors.llava_onevision import image_tokens, video_tokens

    model, processor = hf
    for w, h in ((300, 60), (60, 300), (200, 60), (100, 150), (150, 100), (90, 120), (56, 56), (28, 28)):
        ids = processor(text=[IMAGE], images=[picture(w, h, 0)], return_tensors="pt")["input_ids"][0]
        assert image_tokens(model.config, [h, w]) == int((ids == model.config.image_token_id).sum()), (w, h)
    frames = np.zeros((3, 20, 20, 3), dtype=np.uint8)
    ids = processor(text=[VIDEO], videos=[frames], return_tensors="pt")["input_ids"][0]
    assert video_tokens(model.config, 3) == int((ids == model.config.video_token_id).sum())
