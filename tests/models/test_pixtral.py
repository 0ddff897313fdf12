"""LLaVA with a Pixtral tower (pixtral-12b's layout) against transformers on a tiny random model (float32, CPU):
text only, one image, images of different sizes in one packed tower call (two adjacent, one a single row of
patches), the [IMG_BREAK] / [IMG_END] rows inside each image's span, chunked prefill ending between an image's rows,
the prefix cache over a repeated image, chat through the hub's template, and the Pixtral rotary itself."""

from __future__ import annotations

import pytest
import torch
from vl_helpers import GREEDY, assert_same, check_chunked_prefill, hf_generate, image_data_url, picture

from mmserve import Engine

IMAGE = "[IMG]"



@pytest.fixture(scope="module")
def hf(tiny_pixtral_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_pixtral_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_pixtral_dir)


@pytest.fixture(scope="module")
def engine(tiny_pixtral_dir):
    with Engine(model_path=str(tiny_pixtral_dir), dtype="float32") as e:
        yield e


CASES = {
    # 4x6 patches
    "one image": (f"[INST]Look {IMAGE} and describe it.[/INST]", [picture(75, 50, 0)]),
    # 6x2 and 6x6 patches adjacent, then 1x6 (its only row closed by [IMG_END])
    "three images of different sizes": (f"[INST]{IMAGE}{IMAGE} compare them with {IMAGE} now.[/INST]",
                                        [picture(20, 70, 1), picture(64, 64, 2), picture(200, 20, 3)]),
    "text only": ("[INST]Just some text without pictures.[/INST]", []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case, engine, hf):
    prompt, images = CASES[case]
    ours = engine.generate(prompt, GREEDY, return_logits=True, image_data=images if images else None)
    assert_same(ours, hf_generate(hf, prompt, images))


def test_an_item_covers_the_whole_span(engine, hf):
    """Each item starts at its image's first [IMG] and ends after its [IMG_END], breaks included."""
    _, processor = hf
    prompt, images = CASES["three images of different sizes"]
    ids, mm = engine.processor.process(prompt, [("image", img) for img in images])
    expected = processor(text=[prompt], images=images, return_tensors="pt")["input_ids"][0].tolist()
    assert ids == expected
    end_id = processor.tokenizer.convert_tokens_to_ids("[IMG_END]")
    assert [it.length for it in mm.items] == [6 * 3, 6 * 7, 1 * 7]
    assert mm.items[0].end == mm.items[1].offset  # adjacent images: two items, cut at the [IMG_END]
    for item in mm.items:
        assert ids[item.offset] == processor.image_token_id and ids[item.end - 1] == end_id


def test_chunked_prefill_smaller_than_an_image(tiny_pixtral_dir, hf):
    prompt, images = CASES["three images of different sizes"]
    check_chunked_prefill(tiny_pixtral_dir, hf, prompt, images)


def test_a_repeated_image_reuses_the_prefix_cache(engine):
    img, other = picture(75, 50, 5), picture(75, 50, 6)
    prompt = f"[INST]Look: {IMAGE} and tell me.[/INST]"
    first = engine.generate(prompt, GREEDY, image_data=[img])
    again = engine.generate(prompt, GREEDY, image_data=[img])
    changed = engine.generate(prompt, GREEDY, image_data=[other])
    assert again["meta_info"]["cached_tokens"] == again["meta_info"]["prompt_tokens"] - 1
    assert again["output_ids"] == first["output_ids"]
    assert changed["meta_info"]["cached_tokens"] < 8  # only the text before the image is shared


def test_chat_with_the_hub_template(tiny_pixtral_dir, hf):
    """pixtral-12b's template ([INST] turns, each part in place) renders OpenAI image_url parts as transformers'
    processor renders its messages, and the answer is transformers'."""
    images = [picture(60, 40, 7), picture(30, 70, 8)]
    _, processor = hf
    parts = [{"type": "text", "text": "What is"}, {"type": "image"}, {"type": "text", "text": "and"},
             {"type": "image"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
    assert prompt.endswith(f"[INST]What is{IMAGE}and{IMAGE}[/INST]")
    urls = iter(images)
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_data_url(next(urls))}} if p["type"] == "image" else p
        for p in parts]}]
    with Engine(model_path=str(tiny_pixtral_dir), dtype="float32") as e:
        from mmserve.tokenizer.chat_template import render_chat

        assert render_chat(e.tokenizer, messages, e.chat_template) == prompt
        chat = e.chat(messages, GREEDY)
        ours = e.generate(prompt, GREEDY, return_logits=True, image_data=images)
    ref = hf_generate(hf, prompt, images)
    assert chat["output_ids"] == ref[0]
    assert_same(ours, ref)


def test_rotary_matches_transformers(hf):
    """The row takes the even frequencies, the column the odd ones (transformers' axial table)."""
    from mmserve.layers.vision import apply_vision_rotary
    from mmserve.models.pixtral import PixtralRotary

    model, _ = hf
    rotary = model.model.vision_tower.patch_positional_embedding
    positions = torch.tensor([[0, 0], [0, 5], [3, 1], [7, 7]])
    x = torch.randn(4, 2, 16)
    cos, sin = rotary(x, positions)
    half = x.shape[-1] // 2
    ref = x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin[:, None]
    ours = apply_vision_rotary(x, *PixtralRotary(16, 10000.0)(positions))
    torch.testing.assert_close(ours, ref)


def test_select_strategy_default_is_refused(tiny_pixtral_dir):
    """pixtral-12b keeps every feature ("full"); "default" would drop a class token the tower does not have."""
    from transformers import AutoConfig

    from mmserve.models.llava import LlavaForConditionalGeneration

    config = AutoConfig.from_pretrained(tiny_pixtral_dir)
    config.vision_feature_select_strategy = "default"
    with pytest.raises(ValueError, match="vision_feature_select_strategy 'default'"):
        LlavaForConditionalGeneration(config)
