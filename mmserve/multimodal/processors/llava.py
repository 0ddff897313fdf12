"""LLaVA 1.5, and LLaVA with a Pixtral tower (pixtral-12b): the processor crops every CLIP image to the tower's
size, so each is a fixed number of tokens; a Pixtral image is its own size, its span broken into rows
(`processors/pixtral.py`)."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from mmserve.multimodal.inputs import MultimodalInputs, fixed_size_image_items
from mmserve.multimodal.processors import ProcessorSpec
from mmserve.multimodal.processors.pixtral import pixtral_image_inputs


def llava_inputs(hf_config: PretrainedConfig, processed: dict[str, Any]) -> MultimodalInputs:
    """One item per image. Adjacent images make one run of placeholders, cut by the fixed tokens per image."""
    ids = processed["input_ids"][0]
    pixels = processed.get("pixel_values")
    if pixels is None:
        return MultimodalInputs(items=[])
    patch = hf_config.vision_config.patch_size
    if hf_config.vision_config.model_type == "pixtral":
        return pixtral_image_inputs(hf_config, processed, patch)
    per_image = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)
    per_image += hf_config.vision_feature_select_strategy == "full"  # the class token's feature is kept
    return fixed_size_image_items(ids, hf_config.image_token_id, pixels, per_image)


PROCESSORS = {"LlavaForConditionalGeneration": ProcessorSpec(llava_inputs)}
