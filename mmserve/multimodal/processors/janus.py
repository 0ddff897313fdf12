"""Janus-Pro (image understanding): every image is the tower's patch count of `<image_placeholder>` tokens between
`<begin_of_image>` and `<end_of_image>`; the processor may put a default system prompt before every prompt."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from mmserve.multimodal.inputs import MultimodalInputs, fixed_size_image_items
from mmserve.multimodal.processors import ProcessorSpec
from mmserve.tokenizer.chat_template import JANUS_SYSTEM_PROMPT

# --chat-template names that write the processor's default system prompt (JANUS_SYSTEM_PROMPT) themselves
SYSTEM_PROMPT_TEMPLATES = ("janus-pro", "janus")


def janus_inputs(hf_config: PretrainedConfig, processed: dict[str, Any]) -> MultimodalInputs:
    """One item per image, each the tower's patch count of placeholders (between its begin/end tokens)."""
    pixels = processed.get("pixel_values")
    if pixels is None:
        return MultimodalInputs(items=[])
    vision = hf_config.vision_config
    per_image = (vision.image_size // vision.patch_size) ** 2
    return fixed_size_image_items(processed["input_ids"][0], hf_config.image_token_id, pixels, per_image)


def janus_text_prefix(hf_processor: Any, chat_template: str | None) -> str:
    """Text transformers' processor puts before every prompt it tokenises: the default system prompt, where the
    processor config sets `use_default_system_prompt` (the converted checkpoints do). mmserve tokenises prompts as
    given, so it is written by the chat template instead: such a checkpoint needs `--chat-template janus-pro`, which
    writes it (otherwise every answer would differ from transformers')."""
    if not getattr(hf_processor, "use_default_system_prompt", False):
        return ""
    if chat_template not in SYSTEM_PROMPT_TEMPLATES:
        raise ValueError("this Janus processor adds a default system prompt to every prompt "
                         "(use_default_system_prompt=true in processor_config.json), which mmserve does not do: "
                         "start with --chat-template janus-pro, which writes it, or set "
                         "use_default_system_prompt to false")
    return JANUS_SYSTEM_PROMPT


PROCESSORS = {"JanusForConditionalGeneration": ProcessorSpec(janus_inputs, text_prefix=janus_text_prefix)}
