"""LLaVA-NeXT-Video: LLaVA-NeXT's anyres images (`processors/llava_next.py`) and videos whose frames are pooled
by `spatial_pool_stride`, their tokens one after another with no newline."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from mmserve.multimodal.inputs import MultimodalInputs
from mmserve.multimodal.processors import ProcessorSpec
from mmserve.multimodal.processors.llava_next import anyres_inputs, image_tokens


def video_tokens(hf_config: PretrainedConfig, frames: int) -> int:
    side = hf_config.vision_config.image_size // hf_config.vision_config.patch_size
    return frames * (side // hf_config.spatial_pool_stride) ** 2


def llava_next_video_inputs(hf_config: PretrainedConfig, processed: dict[str, Any]) -> MultimodalInputs:
    return anyres_inputs(hf_config, processed, image_tokens, video_tokens)


PROCESSORS = {"LlavaNextVideoForConditionalGeneration": ProcessorSpec(llava_next_video_inputs)}
