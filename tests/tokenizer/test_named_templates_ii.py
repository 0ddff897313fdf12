"""The named templates of GLM-4.1V (`glm-4v`), GLM-4.5V (`glm-4.5v`), Phi-4-multimodal (`phi-4-mm`) and Qwen3-Omni
(`qwen3-omni`) render exactly what the hub-style templates of the tiny checkpoints (tests/tiny_models.py) render:
ours from OpenAI-style parts through `render_chat`, theirs from Hugging Face's parts through transformers. Media a
family cannot take, and roles it has no place for, are refused by name; an engine started with the name answers with
the tokens the checkpoint's own template gives."""

from __future__ import annotations

import base64

import pytest
from audio_helpers import tone, wav_bytes
from tiny_models import GLM4V_STYLE, GLM45V_STYLE, PHI4_MM_STYLE, QWEN3_OMNI_STYLE
from vl_helpers import GREEDY, image_data_url, picture

from mmserve import Engine
from mmserve.tokenizer.chat_template import NAMED_TEMPLATES, TEMPLATE_ALIASES, render_chat

IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
VIDEO = {"type": "video_url", "video_url": {"url": "https://example.com/b.mp4"}}
AUDIO = {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}
AUDIO_URL = {"type": "audio_url", "audio_url": {"url": "https://example.com/c.wav"}}
SYSTEM = {"role": "system", "content": "Be brief."}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def user(content) -> dict:
    return {"role": "user", "content": content}


CONVERSATIONS = {
    "text only": [user([text("Hi there.")])],
    "string content": [user("Hi there.")],
    "one image": [user([IMAGE, text("Describe it.")])],
    "two images": [user([text("Compare "), IMAGE, text(" with "), {"type": "image"}, text(".")])],
    "video": [user([VIDEO, text("What happens?")])],
    "audio": [user([AUDIO, text("Transcribe.")])],
    "image and audio": [user([IMAGE, text("Look, then hear "), AUDIO_URL])],
    "system": [SYSTEM, user("Hi")],
    "multi-turn": [SYSTEM, user([IMAGE, text("What is it?")]), {"role": "assistant", "content": "A square."},
                   user("And its colour?")],
}
WITHOUT = {"glm-4v": {"audio", "image and audio"}, "glm-4.5v": {"audio", "image and audio"}, "phi-4-mm": {"video"},
           "qwen3-omni": set()}
HUB = {"glm-4v": GLM4V_STYLE, "glm-4.5v": GLM45V_STYLE, "phi-4-mm": PHI4_MM_STYLE, "qwen3-omni": QWEN3_OMNI_STYLE}
# OpenAI part type -> the type Hugging Face's templates check for (written out here, not taken from the module)
HF_TYPES = {"image_url": "image", "video_url": "video", "input_audio": "audio", "audio_url": "audio"}


def hf_parts(messages: list[dict]) -> list[dict]:
    """`messages` as a transformers user writes them for a hub template: media parts as `{"type": "image"}` etc."""
    return [{**m, "content": m["content"] if isinstance(m["content"], str) else
             [{"type": HF_TYPES[p["type"]]} if p["type"] in HF_TYPES else p for p in m["content"]]} for m in messages]


def hub_render(tokenizer, hub: str, messages: list[dict], add_generation_prompt: bool, **kwargs) -> str:
    # Phi-4-multimodal's end of text, which its hub template writes as `eos_token` after a conversation without a
    # generation prompt (SmolLM2's tokenizer, under the tiny checkpoints, has another)
    return tokenizer.apply_chat_template(hf_parts(messages), chat_template=hub, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, eos_token="<|endoftext|>",
                                         **kwargs)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize(("name", "case"), [(name, case) for name in HUB for case in CONVERSATIONS
                                            if case not in WITHOUT[name]])
def test_renders_as_the_hub_template(tokenizer, name: str, case: str, add_generation_prompt: bool) -> None:
    messages = CONVERSATIONS[case]
    ours = render_chat(tokenizer, messages, name, add_generation_prompt=add_generation_prompt)
    assert ours == hub_render(tokenizer, HUB[name], messages, add_generation_prompt)


@pytest.mark.parametrize("thinking", [{}, {"enable_thinking": False}, {"enable_thinking": True}])
@pytest.mark.parametrize("case", ["one image", "multi-turn"])
def test_glm45v_thinking_switch_as_the_hub_template(tokenizer, case: str, thinking: dict) -> None:
    messages = CONVERSATIONS[case]
    ours = render_chat(tokenizer, messages, "glm-4.5v", **thinking)
    assert ours == hub_render(tokenizer, GLM45V_STYLE, messages, True, **thinking)
    if thinking == {"enable_thinking": False}:
        assert ours.endswith("/nothink<|assistant|>\n<think></think>")
    else:
        assert ours.endswith("<|assistant|>") and "/nothink" not in ours


def test_exact_renderings(tokenizer) -> None:
    conversation = CONVERSATIONS["multi-turn"]
    assert render_chat(tokenizer, conversation, "glm-4v") == (
        "[gMASK]<sop><|system|>\nBe brief.<|user|>\n<|begin_of_image|><|image|><|end_of_image|>What is it?"
        "<|assistant|>\nA square.<|user|>\nAnd its colour?<|assistant|>\n")
    assert render_chat(tokenizer, CONVERSATIONS["video"], "glm-4.1v") == (
        "[gMASK]<sop><|user|>\n<|begin_of_video|><|video|><|end_of_video|>What happens?<|assistant|>\n")
    assert render_chat(tokenizer, conversation, "phi-4-mm", add_generation_prompt=False) == (
        "<|system|>Be brief.<|end|><|user|><|image|>What is it?<|end|><|assistant|>A square.<|end|>"
        "<|user|>And its colour?<|end|><|endoftext|>")
    assert render_chat(tokenizer, CONVERSATIONS["image and audio"], "phi4-mm") == (
        "<|user|><|image|>Look, then hear <|audio|><|end|><|assistant|>")
    # unlike Qwen2-VL's, Qwen3-Omni's template writes no default system prompt
    assert render_chat(tokenizer, CONVERSATIONS["image and audio"], "qwen3-omni") == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Look, then hear "
        "<|audio_start|><|audio_pad|><|audio_end|><|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(tokenizer, CONVERSATIONS["text only"], "qwen2-vl").startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


def test_aliases() -> None:
    expected = {"glm4v": "glm-4v", "glm-4.1v": "glm-4v", "glm4.5v": "glm-4.5v", "phi4-mm": "phi-4-mm",
                "phi-4-multimodal": "phi-4-mm", "qwen3-omni-moe": "qwen3-omni"}
    for alias, name in expected.items():
        assert TEMPLATE_ALIASES[alias] == name
        assert NAMED_TEMPLATES[alias] == NAMED_TEMPLATES[name]


@pytest.mark.parametrize(("name", "messages", "match"), [
    ("glm-4v", CONVERSATIONS["audio"], "the glm-4v chat template has no audio placeholder"),
    ("glm-4.5v", [user([AUDIO_URL])], "the glm-4.5v chat template has no audio placeholder"),
    ("glm-4v", [user("Weather?"), {"role": "tool", "content": "18C"}], "the glm-4v chat template has no tool role"),
    ("phi-4-mm", CONVERSATIONS["video"], "the phi-4-mm chat template has no video placeholder"),
    ("phi-4-mm", [user("Weather?"), {"role": "tool", "content": "18C"}], "the phi-4-mm chat template has no tool"),
    ("qwen3-omni", [user([{"type": "pdf"}])], "unsupported content part type: pdf"),
])
def test_refusals_name_the_cause(tokenizer, name: str, messages: list[dict], match: str) -> None:
    with pytest.raises(ValueError, match=f"chat template failed to render: {match}"):
        render_chat(tokenizer, messages, name)


def test_developer_message_is_a_system_one(tokenizer) -> None:
    developer = [{"role": "developer", "content": "Be brief."}, user("Hi")]
    for name in HUB:
        assert render_chat(tokenizer, developer, name) == render_chat(tokenizer, CONVERSATIONS["system"], name)


# One engine per family, started with the named template: its chat answer is the one the checkpoint's own
# (hub-style) template gives for the same conversation, media included.
@pytest.mark.parametrize(("name", "model_dir", "with_audio"), [
    ("glm-4v", "tiny_glm4v_dir", False),
    ("phi-4-mm", "tiny_phi4_multimodal_dir", True),
    ("qwen3-omni", "tiny_qwen3_omni_dir", True),
])
def test_engine_with_the_named_template_answers_as_with_its_own(request, name: str, model_dir: str,
                                                                  with_audio: bool) -> None:
    image, clip = picture(120, 90, 11), tone(520, 0.9)
    parts = [{"type": "image_url", "image_url": {"url": image_data_url(image)}}, text("What is here?")]
    if with_audio:
        parts.insert(1, {"type": "input_audio", "input_audio": {
            "data": base64.b64encode(wav_bytes(clip)).decode(), "format": "wav"}})
    messages = [SYSTEM, user(parts)]
    path = request.getfixturevalue(model_dir)
    with Engine(model_path=str(path), dtype="float32", chat_template=name) as engine:
        own = hub_render(engine.tokenizer, HUB[name], messages, True)
        assert render_chat(engine.tokenizer, messages, engine.chat_template) == own
        named = engine.chat(messages, GREEDY)["output_ids"]
        reference = engine.generate(own, GREEDY, image_data=[image], audio_data=[clip] if with_audio else None)
    assert len(named) == GREEDY["max_new_tokens"]
    assert named == reference["output_ids"]
