"""Mistral 3 (Mistral-Small-3.1's layout) against transformers on a tiny random model (float32, CPU): text only, one
image, images of different sizes in one packed tower call (two adjacent, one a single row of merged tokens), the 2x2
patch merger in transformers' feature order, chunked prefill ending between an image's rows, the prefix cache over a
repeated image, chat through the hub's template and through the named `mistral` template."""

from __future__ import annotations

import pytest
import torch
from vl_helpers import GREEDY, assert_same, check_chunked_prefill, hf_generate, image_data_url, picture

from mmserve import Engine

IMAGE = "[IMG]"



@pytest.fixture(scope="module")
def hf(tiny_mistral3_dir):
    from transformers import AutoProcessor, Mistral3ForConditionalGeneration

    model = Mistral3ForConditionalGeneration.from_pretrained(tiny_mistral3_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_mistral3_dir)


@pytest.fixture(scope="module")
def engine(tiny_mistral3_dir):
    with Engine(model_path=str(tiny_mistral3_dir), dtype="float32") as e:
        yield e


CASES = {
    # 2x4 merged tokens (4x8 patches)
    "one image": (f"[INST]Look {IMAGE} and describe it.[/INST]", [picture(75, 40, 0)]),
    # 4x2 and 4x4 tokens adjacent, then 1x4 (its only row closed by [IMG_END])
    "three images of different sizes": (f"[INST]{IMAGE}{IMAGE} compare them with {IMAGE} now.[/INST]",
                                        [picture(30, 70, 1), picture(64, 64, 2), picture(200, 30, 3)]),
    "text only": ("[INST]Just some text without pictures.[/INST]", []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case, engine, hf):
    prompt, images = CASES[case]
    ours = engine.generate(prompt, GREEDY, return_logits=True, image_data=images if images else None)
    assert_same(ours, hf_generate(hf, prompt, images))


def test_items_cover_the_spans(engine, hf):
    _, processor = hf
    prompt, images = CASES["three images of different sizes"]
    ids, mm = engine.processor.process(prompt, [("image", img) for img in images])
    assert ids == processor(text=[prompt], images=images, return_tensors="pt")["input_ids"][0].tolist()
    assert [it.length for it in mm.items] == [4 * 3, 4 * 5, 1 * 5]
    assert mm.items[0].end == mm.items[1].offset


def test_chunked_prefill_smaller_than_an_image(tiny_mistral3_dir, hf):
    prompt, images = CASES["three images of different sizes"]
    check_chunked_prefill(tiny_mistral3_dir, hf, prompt, images)


def test_a_repeated_image_reuses_the_prefix_cache(engine):
    img, other = picture(75, 40, 5), picture(75, 40, 6)
    prompt = f"[INST]Look: {IMAGE} and tell me.[/INST]"
    first = engine.generate(prompt, GREEDY, image_data=[img])
    again = engine.generate(prompt, GREEDY, image_data=[img])
    changed = engine.generate(prompt, GREEDY, image_data=[other])
    assert again["meta_info"]["cached_tokens"] == again["meta_info"]["prompt_tokens"] - 1
    assert again["output_ids"] == first["output_ids"]
    assert changed["meta_info"]["cached_tokens"] < 8  # only the text before the image is shared


def test_patch_merger_matches_transformers(hf):
    from mmserve.models.mistral3 import Mistral3PatchMerger

    model, _ = hf
    ref = model.model.multi_modal_projector.patch_merger
    merger = Mistral3PatchMerger(32, 2)
    merger.merging_layer.weight.data.copy_(ref.merging_layer.weight)
    grids = [(4, 6), (2, 2)]
    x = torch.randn(sum(r * c for r, c in grids), 32)
    ours = torch.cat([m.flatten(0, 1) for m in merger(x, grids)])
    with torch.no_grad():
        torch.testing.assert_close(ours, ref(x, torch.tensor([[r * 8, c * 8] for r, c in grids])))


def chat_parts() -> list[dict]:
    return [{"type": "text", "text": "What is"}, {"type": "image"}, {"type": "text", "text": "and"},
            {"type": "image"}]


def openai_messages(images) -> list[dict]:
    urls = iter(images)
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_data_url(next(urls))}} if p["type"] == "image" else p
        for p in chat_parts()]}]


def test_chat_with_the_hub_template(tiny_mistral3_dir, hf):
    """Mistral-Small-3.1's template (a [SYSTEM_PROMPT] block, [INST] turns with image parts in place) renders OpenAI
    image_url parts as transformers' processor renders its messages, and the answer is transformers'."""
    images = [picture(60, 40, 7), picture(30, 70, 8)]
    _, processor = hf
    prompt = processor.apply_chat_template([{"role": "user", "content": chat_parts()}], add_generation_prompt=True)
    assert prompt.endswith(f"[/SYSTEM_PROMPT][INST]What is{IMAGE}and{IMAGE}[/INST]")
    messages = openai_messages(images)
    with Engine(model_path=str(tiny_mistral3_dir), dtype="float32") as e:
        from mmserve.tokenizer.chat_template import render_chat

        assert render_chat(e.tokenizer, messages, e.chat_template) == prompt
        chat = e.chat(messages, GREEDY)
        ours = e.generate(prompt, GREEDY, return_logits=True, image_data=images)
    ref = hf_generate(hf, prompt, images)
    assert chat["output_ids"] == ref[0]
    assert_same(ours, ref)


def test_named_mistral_template_places_images_inside_the_instruction(engine):
    """`--chat-template mistral` (SGLang's Mistral format) puts each image part as [IMG] where it stands, inside
    [INST] ... [/INST], as the hub's template does."""
    from mmserve.tokenizer.chat_template import render_chat

    prompt = render_chat(engine.tokenizer, openai_messages([picture(8, 8, 0)] * 2), "mistral")
    assert prompt == f"<s>[INST] What is{IMAGE}and{IMAGE} [/INST]"


def test_several_feature_layers_are_refused(tiny_mistral3_dir):
    from transformers import AutoConfig

    from mmserve.models.mistral3 import Mistral3ForConditionalGeneration

    config = AutoConfig.from_pretrained(tiny_mistral3_dir)
    config.vision_feature_layer = [-2, -1]
    with pytest.raises(ValueError, match="vision_feature_layer"):
        Mistral3ForConditionalGeneration(config)
