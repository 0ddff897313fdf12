"""LLaVA-OneVision: LLaVA-NeXT's anyres images (`processors/llava_next.py`) with the tile map shrunk to at most
"anyres_max_N" views' worth of tokens, and videos of pooled frames.

`max_tile_views` and `shrunk_size` are also the model's (`models/llava_onevision.py` shrinks the map with them).
"""

from __future__ import annotations

import math
from typing import Any

from transformers import PretrainedConfig

from mmserve.multimodal.inputs import MultimodalInputs
from mmserve.multimodal.processors import ProcessorSpec
from mmserve.multimodal.processors.llava_next import anyres_inputs, unpadded_map_size


def max_tile_views(config: PretrainedConfig) -> int:
    """N of `vision_aspect_ratio` "anyres_max_N"."""
    aspect = getattr(config, "vision_aspect_ratio", "anyres_max_9")
    if not aspect.startswith("anyres_max_") or not aspect.removeprefix("anyres_max_").isdigit():
        raise ValueError(f"LLaVA-OneVision with vision_aspect_ratio {aspect!r} is not supported (anyres_max_N only)")
    return int(aspect.removeprefix("anyres_max_"))


def shrunk_size(height: int, width: int, side: int, max_views: int) -> tuple[int, int]:
    """The size an unpadded tile map of height x width is interpolated to: unchanged unless its area is more than
    1.1^2 times `max_views` views of side x side (transformers' rounding)."""
    ratio = math.sqrt(height * width / (max_views * side**2))
    if ratio > 1.1:
        return int(height // ratio), int(width // ratio)
    return height, width


def image_tokens(hf_config: PretrainedConfig, image_size: list[int]) -> int:
    """The base view's tokens, then each row of the shrunk tile map and its newline."""
    side = hf_config.vision_config.image_size // hf_config.vision_config.patch_size
    height, width = shrunk_size(*unpadded_map_size(hf_config, image_size), side, max_tile_views(hf_config))
    return side * side + height * (width + 1)


def video_tokens(hf_config: PretrainedConfig, frames: int) -> int:
    """Each frame's map halved (rounding up), then one newline after the whole video."""
    pooled = math.ceil(hf_config.vision_config.image_size // hf_config.vision_config.patch_size / 2)
    return frames * pooled * pooled + 1


def llava_onevision_inputs(hf_config: PretrainedConfig, processed: dict[str, Any]) -> MultimodalInputs:
    return anyres_inputs(hf_config, processed, image_tokens, video_tokens)


PROCESSORS = {"LlavaOnevisionForConditionalGeneration": ProcessorSpec(llava_onevision_inputs)}
