"""LLaVA-NeXT-Video against transformers on a tiny random model (float32, CPU): LLaVA-NeXT's anyres images (two of
different sizes), video frames average-pooled 2x2 before the projector (as arrays, with an image, and as an MP4
data URL), max pooling, text only, a repeated image from the prefix cache, chunked prefill smaller than an image,
and chat through the hub's template."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vl_helpers import GREEDY, assert_same, check_chunked_prefill, hf_generate, image_data_url, picture, video_data_url

from mmserve import Engine

IMAGE, VIDEO = "<image>", "<video>"


def user(text: str) -> str:
    return f"USER: {text} ASSISTANT:"


def reference(folder):
    from transformers import AutoProcessor, LlavaNextVideoForConditionalGeneration

    model = LlavaNextVideoForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(folder)



@pytest.fixture(scope="module")
def hf(tiny_llava_next_video_dir):
    return reference(tiny_llava_next_video_dir)


@pytest.fixture(scope="module")
def engine(tiny_llava_next_video_dir):
    with Engine(model_path=str(tiny_llava_next_video_dir), dtype="float32") as e:
        yield e


CASES = {
    "one image": (user(f"{IMAGE}\nDescribe it briefly."), [picture(200, 60, 0)]),  # 1x2 tiles
    # 2x2 tiles with padded columns cut, then 2x2 tiles with padded rows cut; adjacent
    "two images of different sizes": (user(f"{IMAGE}\n{IMAGE}\nCompare them."),
                                      [picture(100, 150, 1), picture(150, 100, 3)]),
    "text only": (user("Just some text without pictures."), []),
}
FRAMES = np.random.RandomState(9).randint(0, 255, (4, 60, 80, 3), dtype=np.uint8)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case, engine, hf):
    prompt, images = CASES[case]
    ours = engine.generate(prompt, GREEDY, return_logits=True, image_data=images if images else None)
    assert_same(ours, hf_generate(hf, prompt, images))


def test_video_matches_transformers(engine, hf):
    prompt, image = user(f"{IMAGE}\n{VIDEO}\nWhat happens?"), picture(70, 50, 10)
    ours = engine.generate(prompt, GREEDY, return_logits=True, image_data=[image], video_data=[FRAMES])
    assert_same(ours, hf_generate(hf, prompt, [image], [FRAMES]))


def test_max_pooling_matches_transformers(tokenizer_dir, tmp_path):
    from tiny_models import build_tiny_llava_next_video

    folder = build_tiny_llava_next_video(tokenizer_dir, tmp_path / "max", pool_mode="max")
    prompt = user(f"{VIDEO}\nWhat happens?")
    with Engine(model_path=str(folder), dtype="float32") as e:
        ours = e.generate(prompt, GREEDY, return_logits=True, video_data=[FRAMES])
    assert_same(ours, hf_generate(reference(folder), prompt, [], [FRAMES]))


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
    prompt = user(f"{VIDEO}\nWhat happens?")
    ref = hf_generate(hf, prompt, [], [sampled])
    assert engine.chat(messages, GREEDY)["output_ids"] == ref[0]
    assert_same(engine.generate(prompt, GREEDY, return_logits=True, video_data=[url]), ref)


def test_repeated_image_hits_the_prefix_cache(engine, hf):
    prompt, images = CASES["one image"]
    engine.generate(prompt, GREEDY, image_data=images)
    again = engine.generate(prompt, GREEDY, return_logits=True, image_data=[images[0].copy()])
    assert again["meta_info"]["cached_tokens"] == again["meta_info"]["prompt_tokens"] - 1
    assert_same(again, hf_generate(hf, prompt, images))
    other = picture(*images[0].size, seed=99)  # same size, other pixels: only the text before the image is shared
    changed = engine.generate(prompt, GREEDY, image_data=[other])
    assert changed["meta_info"]["cached_tokens"] <= len(engine.tokenizer(prompt[:prompt.index(IMAGE)])["input_ids"])


def test_chunked_prefill_smaller_than_an_image(tiny_llava_next_video_dir, hf):
    prompt, images = CASES["two images of different sizes"]
    check_chunked_prefill(tiny_llava_next_video_dir, hf, prompt, images)


def test_chat_with_the_hub_template(engine, hf):
    """The hub's template (LLaVA 1.5's, each turn's images then videos first) renders OpenAI image parts as
    transformers' processor renders its messages, with transformers' answer."""
    from mmserve.tokenizer.chat_template import render_chat

    images = [picture(100, 150, 7), picture(200, 60, 8)]
    _, processor = hf
    prompt = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image"}, {"type": "image"}]}], add_generation_prompt=True)
    assert prompt == f"USER: {IMAGE}\n{IMAGE}\nWhat is this? ASSISTANT:"
    parts = [{"type": "image_url", "image_url": {"url": image_data_url(img)}} for img in images]
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, *parts]}]
    assert render_chat(engine.tokenizer, messages, engine.chat_template) == prompt
    ref = hf_generate(hf, prompt, images)
    assert engine.chat(messages, GREEDY)["output_ids"] == ref[0]
    assert_same(engine.generate(prompt, GREEDY, return_logits=True, image_data=images), ref)


def test_token_counts_match_the_processor(hf):
    from mmserve.multimodal.processors.llava_next import image_tokens
    from mmserve.multimodal.processors.llava_next_video import video_tokens

    model, processor = hf
    for w, h in ((300, 60), (60, 300), (200, 60), (100, 150), (150, 100), (56, 56)):
        ids = processor(text=[IMAGE], images=[picture(w, h, 0)], return_tensors="pt")["input_ids"][0]
        assert image_tokens(model.config, [h, w]) == int((ids == model.config.image_token_id).sum()), (w, h)
    ids = processor(text=[VIDEO], videos=[FRAMES[:3]], return_tensors="pt")["input_ids"][0]
    assert video_tokens(model.config, 3) == int((ids == model.config.video_token_id).sum())


def test_conv_pooling_is_refused(tiny_llava_next_video_dir):
    from transformers import AutoConfig

    from mmserve.models.llava_next_video import LlavaNextVideoForConditionalGeneration as Ours

    config = AutoConfig.from_pretrained(tiny_llava_next_video_dir)
    config.spatial_pool_mode = "conv"
    with pytest.raises(ValueError, match="spatial_pool_mode 'conv'"):
        Ours(config)
