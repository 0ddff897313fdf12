"""Qwen2-VL against transformers on a tiny random model (float32, CPU): images one and two at a time, text only,
chunked prefill that cuts an image, and the prefix cache keyed by image content."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vl_helpers import GREEDY, IMAGE, VIDEO, assert_same, check_chunked_prefill, hf_generate, picture, video_data_url

from mmserve import Engine


@pytest.fixture(scope="module")
def hf(tiny_qwen2_vl_dir):
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_qwen2_vl_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_qwen2_vl_dir)


@pytest.fixture(scope="module")
def engine(tiny_qwen2_vl_dir):
    with Engine(model_path=str(tiny_qwen2_vl_dir), dtype="float32") as e:
        yield e


CASES = {
    "one image": (f"Describe {IMAGE} briefly.", [picture(150, 100, 0)]),
    "two images of different sizes": (f"Compare {IMAGE} with {IMAGE} now.", [picture(90, 120, 1), picture(200, 60, 2)]),
    "text only": ("Just some text without pictures.", []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case, engine, hf):
    prompt, images = CASES[case]
    ours = engine.generate(prompt, GREEDY, return_logits=True, image_data=images if images else None)
    assert_same(ours, hf_generate(hf, prompt, images))


def test_chunked_prefill_smaller_than_an_image(tiny_qwen2_vl_dir, hf):
    prompt, images = CASES["two images of different sizes"]
    check_chunked_prefill(tiny_qwen2_vl_dir, hf, prompt, images)


def test_prefix_cache_is_keyed_by_image_content(engine):
    img, other = picture(150, 100, 5), picture(150, 100, 6)
    prompt = f"Look: {IMAGE} and tell me."
    first = engine.generate(prompt, GREEDY, image_data=[img])
    again = engine.generate(prompt, GREEDY, image_data=[img])
    changed = engine.generate(prompt, GREEDY, image_data=[other])
    image_end = prompt.index(IMAGE)  # the text before the image is a handful of tokens
    assert again["meta_info"]["cached_tokens"] == again["meta_info"]["prompt_tokens"] - 1
    assert again["output_ids"] == first["output_ids"]
    assert changed["meta_info"]["cached_tokens"] <= image_end  # only the text before the image is shared
    with Engine(model_path=engine.args.model_path, dtype="float32", disable_radix_cache=True) as plain:
        assert plain.generate(prompt, GREEDY, image_data=[other])["output_ids"] == changed["output_ids"]


def test_chat_with_an_image_part(tiny_qwen2_vl_dir, hf):
    img = picture(120, 90, 7)
    messages = [{"role": "user", "content": [{"type": "image", "image": img},
                                             {"type": "text", "text": "What is this?"}]}]
    with Engine(model_path=str(tiny_qwen2_vl_dir), dtype="float32", chat_template="qwen2-vl") as e:
        ours = e.chat(messages, GREEDY)
        from mmserve.tokenizer.chat_template import render_chat

        prompt = render_chat(e.tokenizer, messages, e.chat_template)
    assert IMAGE in prompt
    assert ours["output_ids"] == hf_generate(hf, prompt, [img])[0]


def test_video_matches_transformers(engine, hf):
    frames = np.random.RandomState(9).randint(0, 255, (8, 60, 80, 3), dtype=np.uint8)
    prompt = f"Watch {VIDEO} and then {IMAGE} too."
    image = picture(70, 50, 10)
    ours = engine.generate(prompt, GREEDY, return_logits=True, image_data=[image], video_data=[frames])
    assert_same(ours, hf_generate(hf, prompt, [image], [frames]))


def test_video_frames_are_sampled_like_qwen():
    from mmserve.multimodal.processor import sample_frame_indices

    picked = sample_frame_indices(300, fps=30.0, target_fps=2.0, min_frames=4, max_frames=768)  # 10 s at 30 fps
    assert len(picked) == 20 and picked[0] == 0 and picked[-1] == 299
    assert np.all(np.diff(picked) >= 15)  # evenly spread, about half a second apart
    assert len(sample_frame_indices(15, 30.0, 2.0, 4, 768)) == 4  # half a second still gives the minimum
    assert len(sample_frame_indices(300, 30.0, 2.0, 4, 9)) == 8  # the cap, rounded down to whole frame pairs


def test_chat_with_a_video_url_decodes_and_samples(tiny_qwen2_vl_dir, tmp_path):
    from mmserve.multimodal.media import MediaPolicy, load_video_frames
    from mmserve.multimodal.processor import sample_frame_indices

    url = video_data_url(tmp_path / "clip.mp4", frames=30, fps=10)  # 3 s: Qwen's 2 fps sampling keeps 6 frames
    frames, fps = load_video_frames(url, MediaPolicy())
    sampled = frames[sample_frame_indices(len(frames), fps, 2.0, 4, 768)]
    assert len(sampled) == 6
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": "What happens?"}]}]
    with Engine(model_path=str(tiny_qwen2_vl_dir), dtype="float32", chat_template="qwen2-vl") as e:
        from mmserve.tokenizer.chat_template import render_chat

        by_url = e.chat(messages, GREEDY)
        prompt = render_chat(e.tokenizer, messages, e.chat_template)
        assert VIDEO in prompt
        by_frames = e.generate(prompt, GREEDY, video_data=[sampled])
    assert by_url["output_ids"] == by_frames["output_ids"]
    assert by_url["meta_info"]["prompt_tokens"] == by_frames["meta_info"]["prompt_tokens"]


def test_repetition_penalty_with_an_image_matches_transformers(engine, hf):
    """The penalty sees the prompt as transformers does: the image placeholder token, not the pad values that carry
    the image's identity in the cache."""
    prompt, images = f"Describe {IMAGE} briefly.", [picture(150, 100, 0)]
    ours = engine.generate(prompt, {**GREEDY, "repetition_penalty": 1.5}, image_data=images)
    model, processor = hf
    enc = processor(text=[prompt], images=images, return_tensors="pt")
    ref = model.generate(**enc, do_sample=False, max_new_tokens=GREEDY["max_new_tokens"], eos_token_id=None,
                         repetition_penalty=1.5)
    assert ours["output_ids"] == ref[0, enc["input_ids"].shape[1]:].tolist()


def test_stop_string_after_a_prompt_ending_in_an_image(engine):
    out = engine.generate(f"Describe {IMAGE}", {**GREEDY, "stop": ["zz"]}, image_data=[picture(64, 64, 1)])
    assert out["meta_info"]["completion_tokens"] >= 1
