"""Mistral 3 (Mistral-Small-3.1): Pixtral's image spans (`processors/pixtral.py`), one token per
`spatial_merge_size` x `spatial_merge_size` block of patches."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from mmserve.multimodal.inputs import MultimodalInputs
from mmserve.multimodal.processors import ProcessorSpec
from mmserve.multimodal.processors.pixtral import pixtral_image_inputs


def mistral3_inputs(hf_config: PretrainedConfig, processed: dict[str, Any]) -> MultimodalInputs:
    return pixtral_image_inputs(hf_config, processed, hf_config.vision_config.patch_size * hf_config.spatial_merge_size)


PROCESSORS = {"Mistral3ForConditionalGeneration": ProcessorSpec(mistral3_inputs)}
