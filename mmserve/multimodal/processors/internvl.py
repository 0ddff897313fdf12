"""InternVL: an image is its tower-sized tiles, each `tokens_per_tile` context tokens; a video frame is one tile.

`as_pair`, `shuffle_factor` and `tokens_per_tile` are also the model's (`models/internvl.py`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from transformers import PretrainedConfig

from mmserve.multimodal.inputs import MultimodalInputs, MultimodalItem
from mmserve.multimodal.processors import ProcessorSpec


def as_pair(value: int | Iterable[int]) -> tuple[int, int]:
    """(height, width) of a size given as one side or as both."""
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


def shuffle_factor(config: PretrainedConfig) -> int:
    """k of the k x k blocks pixel shuffle folds into one token (1 / `downsample_ratio`)."""
    factor = round(1 / config.downsample_ratio)
    if abs(factor * config.downsample_ratio - 1) > 1e-6:
        raise ValueError(f"InternVL with downsample_ratio {config.downsample_ratio} is not supported (1 / k only)")
    return factor


def tokens_per_tile(config: PretrainedConfig) -> int:
    """Placeholder tokens (rows of projected features) of one tower-sized tile."""
    (height, width), (ph, pw) = as_pair(config.vision_config.image_size), as_pair(config.vision_config.patch_size)
    return (height // ph) * (width // pw) // shuffle_factor(config) ** 2


def internvl_inputs(hf_config: PretrainedConfig, processed: dict[str, Any]) -> MultimodalInputs:
    """One item per run of context tokens (an image's tiles, or one video frame), in order, each with its tiles:
    the run's length over the tokens per tile."""
    ids = processed["input_ids"][0]
    pixels = processed.get("pixel_values")
    if pixels is None:
        return MultimodalInputs(items=[])
    if isinstance(pixels, list):
        pixels = torch.cat(pixels)
    tile = as_pair(hf_config.vision_config.image_size)
    if tuple(pixels.shape[-2:]) != tile:
        raise ValueError(f"InternVL with {tuple(pixels.shape[-2:])} px tiles from the processor is not supported: "
                         f"the tower's image_size is {tile} (position interpolation is not implemented)")
    per_tile = tokens_per_tile(hf_config)
    positions = (ids == hf_config.image_token_id).nonzero().flatten().tolist()
    runs: list[tuple[int, int]] = []  # (start, length)
    for p in positions:
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    if any(length % per_tile for _, length in runs) or len(positions) != per_tile * len(pixels):
        raise ValueError(f"the prompt has {len(positions)} image context tokens in runs of "
                         f"{[length for _, length in runs]} for {len(pixels)} tiles of {per_tile} tokens")
    items, seen = [], 0
    for start, length in runs:
        count = length // per_tile
        items.append(MultimodalItem("image", {"pixel_values": pixels[seen:seen + count]}, start, length))
        seen += count
    return MultimodalInputs(items=items)


PROCESSORS = {
    # An image's expansion is `<img>`, its context tokens, `</img>`; a video's is "Frame1: <img>...</img>\nFrame2:
    # ...". That text merges with the prompt's around it when transformers tokenises the expanded prompt.
    "InternVLForConditionalGeneration": ProcessorSpec(internvl_inputs, expand_placeholders_in_text=True),
}
