"""Janus-Pro (image understanding) against transformers on a tiny random model (float32, CPU): text only, one
image, two images of different input sizes (the processor resizes and pads each to the tower's size), a repeated
image through the prefix cache, chunked prefill smaller than an image, chat through the hub-style template and
through `janus-pro` (the processor's default system prompt), and what is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from vl_helpers import GREEDY, assert_same, check_chunked_prefill, hf_generate, image_data_url, picture

from mmserve import Engine
from mmserve.tokenizer.chat_template import JANUS_SYSTEM_PROMPT, render_chat

IMAGE = "<image_placeholder>"



@pytest.fixture(scope="module")
def hf(tiny_janus_dir):
    from transformers import AutoProcessor, JanusForConditionalGeneration

    model = JanusForConditionalGeneration.from_pretrained(tiny_janus_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_janus_dir)


@pytest.fixture(scope="module")
def engine(tiny_janus_dir):
    with Engine(model_path=str(tiny_janus_dir), dtype="float32") as e:
        yield e


CASES = {
    "text only": ("<|User|>: Just some text without pictures.\n\n<|Assistant|>:", []),
    "one image": (f"<|User|>: {IMAGE}\nDescribe it briefly.\n\n<|Assistant|>:", [picture(50, 30, 0)]),
    "two images of different sizes": (f"<|User|>: {IMAGE}\n{IMAGE}\nCompare them.\n\n<|Assistant|>:",
                                      [picture(20, 64, 1), picture(90, 45, 2)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case, engine, hf):
    prompt, images = CASES[case]
    ours = engine.generate(prompt, GREEDY, return_logits=True, image_data=images if images else None)
    assert_same(ours, hf_generate(hf, prompt, images))


def test_image_tokens_are_wrapped_as_transformers_does(engine, hf):
    """Each image is <begin_of_image>, 16 placeholders, <end_of_image>, as the processor expands it."""
    prompt, images = CASES["two images of different sizes"]
    _, processor = hf
    ids, _ = engine.processor.process(prompt, [("image", img) for img in images])
    assert ids == processor(text=[prompt], images=images, return_tensors="pt")["input_ids"][0].tolist()


def test_repeated_image_hits_the_prefix_cache(engine, hf):
    prompt, images = CASES["one image"]
    engine.generate(prompt, GREEDY, image_data=images)
    again = engine.generate(prompt, GREEDY, return_logits=True, image_data=[images[0].copy()])
    assert again["meta_info"]["cached_tokens"] == again["meta_info"]["prompt_tokens"] - 1
    assert_same(again, hf_generate(hf, prompt, images))
    other = picture(*images[0].size, seed=99)  # same size, other pixels: only the text before the image is shared
    changed = engine.generate(prompt, GREEDY, image_data=[other])
    before = len(engine.tokenizer(prompt[:prompt.index(IMAGE)])["input_ids"]) + 1  # and <begin_of_image>
    assert changed["meta_info"]["cached_tokens"] <= before


def test_chunked_prefill_smaller_than_an_image(tiny_janus_dir, hf):
    prompt, images = CASES["two images of different sizes"]
    check_chunked_prefill(tiny_janus_dir, hf, prompt, images)


def chat_messages(*parts: dict) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, *parts,
                                         {"type": "text", "text": "  Be brief. "}]}]


def test_chat_with_the_hub_template(tiny_janus_dir, engine, hf):
    """The model's own template renders OpenAI image parts as transformers' processor renders its messages, and the
    answer is transformers'."""
    images = [picture(40, 30, 7), picture(30, 50, 8)]
    _, processor = hf
    prompt = processor.apply_chat_template(chat_messages({"type": "image"}, {"type": "image"}),
                                           add_generation_prompt=True)
    assert prompt == f"<|User|>: What is this?\n{IMAGE}\n\n{IMAGE}\n  Be brief.\n\n<|Assistant|>:"
    messages = chat_messages(*({"type": "image_url", "image_url": {"url": image_data_url(img)}} for img in images))
    assert render_chat(engine.tokenizer, messages, engine.chat_template) == prompt
    ref = hf_generate(hf, prompt, images)
    assert engine.chat(messages, GREEDY)["output_ids"] == ref[0]
    assert_same(engine.generate(prompt, GREEDY, return_logits=True, image_data=images), ref)


CONVERSATIONS = {
    "one turn": chat_messages({"type": "image"}),
    "text only": [{"role": "user", "content": [{"type": "text", "text": " Hello there "}]}],
    "multi turn": [
        {"role": "system", "content": [{"type": "text", "text": "Be kind."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A picture."}]},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}, {"type": "text", "text": "Really?"}]}],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_janus_pro_template_is_the_processor_system_prompt_and_the_hub_template(name, engine, hf):
    from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

    _, processor = hf
    messages = CONVERSATIONS[name]
    assert JANUS_SYSTEM_PROMPT == DEFAULT_SYSTEM_PROMPT
    for generation_prompt in (True, False):
        hub = processor.apply_chat_template(messages, add_generation_prompt=generation_prompt)
        ours = render_chat(engine.tokenizer, messages, "janus-pro", add_generation_prompt=generation_prompt)
        assert ours == DEFAULT_SYSTEM_PROMPT + hub


@pytest.fixture(scope="module")
def system_prompt_dir(tiny_janus_dir, tmp_path_factory):
    """The tiny model with the converted checkpoints' `use_default_system_prompt: true`."""
    out = tmp_path_factory.mktemp("tiny_janus_system")
    shutil.copytree(tiny_janus_dir, out, dirs_exist_ok=True)
    config_path = out / "processor_config.json"
    config = json.loads(config_path.read_text())
    config["use_default_system_prompt"] = True
    config_path.write_text(json.dumps(config))
    return out


def test_default_system_prompt_needs_the_janus_pro_template(system_prompt_dir, hf):
    """transformers' processor then puts its system prompt before every prompt: mmserve does not add text to
    prompts, so it refuses to start unless the chat template writes it; with `janus-pro` the chat is
    transformers'."""
    from transformers import AutoProcessor

    with pytest.raises(ValueError, match="use_default_system_prompt"):
        Engine(model_path=str(system_prompt_dir), dtype="float32")
    processor = AutoProcessor.from_pretrained(system_prompt_dir)
    assert processor.use_default_system_prompt
    images = [picture(40, 30, 7)]
    prompt = processor.apply_chat_template(chat_messages({"type": "image"}), add_generation_prompt=True)
    text_prompt = processor.apply_chat_template(CONVERSATIONS["text only"], add_generation_prompt=True)
    ref = hf_generate((hf[0], processor), prompt, images)
    ref_text = hf_generate((hf[0], processor), text_prompt, [])
    messages = chat_messages({"type": "image_url", "image_url": {"url": image_data_url(images[0])}})
    with Engine(model_path=str(system_prompt_dir), dtype="float32", chat_template="janus-pro") as e:
        assert e.chat(messages, GREEDY)["output_ids"] == ref[0]
        assert e.chat(CONVERSATIONS["text only"], GREEDY)["output_ids"] == ref_text[0]


def test_generation_is_not_offered(engine):
    """Image generation is the processor's `generation_mode`, not a request option; its weights are not loaded."""
    with pytest.raises(ValueError, match="generation_mode"):
        engine.generate("<|User|>: Draw a cat.\n\n<|Assistant|>:", GREEDY,
                        mm_processor_kwargs={"generation_mode": "image"})
    names = [name for name, _ in engine.runner.model.named_parameters()]
    assert not any("vq" in name or "generation" in name for name in names)


@pytest.mark.parametrize("head", ["own head", "no head"])
def test_tied_config_ties_only_without_a_head_of_its_own(head, tiny_janus_dir, tmp_path):
    """`tie_word_embeddings: true` (JanusConfig's default, kept by the converted checkpoints): transformers ties the
    head to the embeddings only where the checkpoint has no `lm_head.weight` (or the same values)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoProcessor, JanusForConditionalGeneration

    shutil.copytree(tiny_janus_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    if head == "no head":
        weights = load_file(tmp_path / "model.safetensors")
        del weights["lm_head.weight"]
        save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = JanusForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tied = model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert tied == (head == "no head")
    prompt, images = CASES["one image"]
    with Engine(model_path=str(tmp_path), dtype="float32") as e:
        assert e.runner.model.tied == tied
        ours = e.generate(prompt, GREEDY, return_logits=True, image_data=images)
    assert_same(ours, hf_generate((model, AutoProcessor.from_pretrained(tmp_path)), prompt, images))
