"""Gemma 3: every image (or pan-and-scan crop) is `mm_tokens_per_image` tokens between its own start and end of
image tokens."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from mmserve.multimodal.inputs import MultimodalInputs, fixed_size_image_items
from mmserve.multimodal.processors import ProcessorSpec


def gemma3_inputs(hf_config: PretrainedConfig, processed: dict[str, Any]) -> MultimodalInputs:
    """One item per run of `mm_tokens_per_image` image tokens, in the order of `pixel_values`."""
    pixels = processed.get("pixel_values")
    if pixels is None:
        return MultimodalInputs(items=[])
    # pan-and-scan crops are rows of pixel_values like whole images, each with its own run of tokens
    return fixed_size_image_items(processed["input_ids"][0], hf_config.image_token_id, pixels,
                                  hf_config.mm_tokens_per_image)


PROCESSORS = {
    # the processor puts "\n\n" around each image, which transformers tokenises together with the prompt's text
    "Gemma3ForConditionalGeneration": ProcessorSpec(gemma3_inputs, expand_placeholders_in_text=True),
}
