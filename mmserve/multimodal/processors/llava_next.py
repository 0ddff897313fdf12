"""LLaVA-NeXT's anyres images, shared by LLaVA-OneVision and LLaVA-NeXT-Video: the processor sends each image as
its base view followed by a grid of tower-sized tiles, and expands its placeholder to the base view's tokens plus
the unpadded tile map's, each row of the map closed by one newline token. The video families add a token count per
video (`anyres_inputs`' `video_tokens`).

`tile_grid` and `unpadded_box` are also the model's (`models/llava_next.py` lays the tiles' features out with them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import PretrainedConfig

from mmserve.multimodal.inputs import MultimodalInputs, MultimodalItem
from mmserve.multimodal.processors import ProcessorSpec

# (hf_config, an image's (height, width)) -> its placeholder tokens
ImageTokens = Callable[[PretrainedConfig, list[int]], int]
# (hf_config, a video's frames) -> its placeholder tokens
VideoTokens = Callable[[PretrainedConfig, int], int]


def tile_grid(image_size: tuple[int, int], config: PretrainedConfig) -> tuple[int, int]:
    """(rows, columns) of tiles the processor cut an image of `image_size` (height, width) into."""
    # imported here: transformers' image utilities import torchvision (~1.7 s), which a text model never needs, and
    # every model and processor module is imported when a registry first resolves a name
    from transformers.image_processing_utils import select_best_resolution

    height, width = select_best_resolution(list(image_size), config.image_grid_pinpoints)
    side = config.vision_config.image_size
    return height // side, width // side


def unpadded_box(image_size: tuple[int, int], map_size: tuple[int, int]) -> tuple[slice, slice]:
    """Rows and columns of a feature map of `map_size` that cover the image itself, not the padding the processor
    added around it to fill the tile grid (as transformers rounds it)."""
    (height, width), (rows, cols) = image_size, map_size
    if width / height > cols / rows:  # wider than the grid: padded above and below
        pad = (rows - int(round(height * (cols / width), 7))) // 2
        return slice(pad, rows - pad), slice(0, cols)
    pad = (cols - int(round(width * (rows / height), 7))) // 2
    return slice(0, rows), slice(pad, cols - pad)


def unpadded_map_size(hf_config: PretrainedConfig, image_size: list[int]) -> tuple[int, int]:
    """(rows, columns) of an image's tile feature map once the padding is cut off."""
    side = hf_config.vision_config.image_size // hf_config.vision_config.patch_size
    rows, cols = tile_grid(image_size, hf_config)
    kept_rows, kept_cols = unpadded_box(image_size, (rows * side, cols * side))
    return kept_rows.stop - kept_rows.start, kept_cols.stop - kept_cols.start


def image_tokens(hf_config: PretrainedConfig, image_size: list[int]) -> int:
    """The base view's tokens, then each row of the unpadded tile map and its newline."""
    side = hf_config.vision_config.image_size // hf_config.vision_config.patch_size
    height, width = unpadded_map_size(hf_config, image_size)
    return side * side + height * (width + 1)


def image_items(hf_config: PretrainedConfig, processed: dict[str, Any], tokens: ImageTokens) -> list[MultimodalItem]:
    """One item per image: its tiles (the processor pads a batch to the most tiles; the padding is dropped) and its
    size. Adjacent images make one run of placeholders, cut by each image's token count."""
    ids = processed["input_ids"][0]
    if processed.get("pixel_values") is None:
        return []
    pixels = processed["pixel_values"]
    pixels = [p for part in (pixels if isinstance(pixels, list) else [pixels]) for p in part]
    sizes = processed["image_sizes"].tolist()
    positions = (ids == hf_config.image_token_id).nonzero().flatten().tolist()
    counts = [tokens(hf_config, size) for size in sizes]
    if len(positions) != sum(counts):
        raise ValueError(f"the prompt has {len(positions)} image placeholder tokens for {len(sizes)} images of "
                         f"{counts} tokens")
    items, seen = [], 0
    for tiles, size, count in zip(pixels, sizes, counts, strict=True):
        start = positions[seen]
        assert positions[seen + count - 1] == start + count - 1, "an image's tokens are contiguous"
        rows, cols = tile_grid(size, hf_config)
        features = {"pixel_values": tiles[:1 + rows * cols], "image_sizes": torch.tensor([size])}
        items.append(MultimodalItem("image", features, start, count))
        seen += count
    return items


def video_items(ids: torch.Tensor, token_id: int, videos: torch.Tensor | list[torch.Tensor],
                tokens_per_video: Callable[[int], int]) -> list[MultimodalItem]:
    """One item per video of the LLaVA video families: its frames [frames, C, H, W] (`pixel_values_videos`, one
    [1, frames, ...] tensor per video, or one tensor for videos of one shape) and its placeholder run, cut by
    `tokens_per_video(frames)`."""
    clips = [clip for part in (videos if isinstance(videos, list) else [videos]) for clip in part]
    positions = (ids == token_id).nonzero().flatten().tolist()
    counts = [tokens_per_video(len(clip)) for clip in clips]
    if len(positions) != sum(counts):
        raise ValueError(f"the prompt has {len(positions)} video placeholder tokens for {len(clips)} videos of "
                         f"{counts} tokens")
    items, seen = [], 0
    for clip, count in zip(clips, counts, strict=True):
        start = positions[seen]
        assert positions[seen + count - 1] == start + count - 1, "a video's tokens are contiguous"
        items.append(MultimodalItem("video", {"pixel_values_videos": clip}, start, count))
        seen += count
    return items


def anyres_inputs(hf_config: PretrainedConfig, processed: dict[str, Any], tokens: ImageTokens,
                  video_tokens: VideoTokens | None = None) -> MultimodalInputs:
    """One item per image and, for the video families (`video_tokens`), per video, in prompt order."""
    items = image_items(hf_config, processed, tokens)
    if processed.get("pixel_values_videos") is not None and video_tokens is not None:
        items += video_items(processed["input_ids"][0], hf_config.video_token_id, processed["pixel_values_videos"],
                             lambda frames: video_tokens(hf_config, frames))
    return MultimodalInputs(items=sorted(items, key=lambda it: it.offset))


def llava_next_inputs(hf_config: PretrainedConfig, processed: dict[str, Any]) -> MultimodalInputs:
    return anyres_inputs(hf_config, processed, image_tokens)


PROCESSORS = {"LlavaNextForConditionalGeneration": ProcessorSpec(llava_next_inputs)}
