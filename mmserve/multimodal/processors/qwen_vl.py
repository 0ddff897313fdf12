"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dense and MoE): the HF processor's output cut into one item per image or
video (per video frame for Qwen3-VL), with the prompt's M-RoPE positions.

Each item is one maximal run of its placeholder token; `pixel_values` / `pixel_values_videos` are the items' patches
one after another, `image_grid_thw` / `video_grid_thw` their (t, h, w) patch grids, which the LLM sees merged by
`spatial_merge_size` on both sides. Images prepared in the engine (--mm-image-prep engine) come as `image_uint8`
instead of `pixel_values`, one resized image [1, 3, H, W] each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import PretrainedConfig

from mmserve.multimodal.inputs import MultimodalInputs, MultimodalItem
from mmserve.multimodal.mrope import mrope_positions
from mmserve.multimodal.processors import ProcessorSpec

# (modality, index of the item among that modality's) -> M-RoPE temporal step between its consecutive frame pairs
TimeInterval = Callable[[str, int], float]


def runs(ids: torch.Tensor, token_id: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of `token_id` in ids."""
    mask = (ids == token_id).tolist()
    found, start = [], None
    for i, m in enumerate([*mask, False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            found.append((start, i - start))
            start = None
    return found


def cut_items(hf_config: PretrainedConfig, processed: dict[str, Any], time_interval: TimeInterval) -> MultimodalInputs:
    """One item per placeholder run, in prompt order, and the prompt's M-RoPE positions."""
    ids = processed["input_ids"][0]
    merge = hf_config.vision_config.spatial_merge_size
    items, grids, intervals = [], [], []
    for modality, token_id, pixels_key, grid_key in (
        ("image", hf_config.image_token_id, "pixel_values", "image_grid_thw"),
        ("video", hf_config.video_token_id, "pixel_values_videos", "video_grid_thw"),
    ):
        if processed.get(grid_key) is None:
            continue
        found = runs(ids, token_id)
        grid_thw = processed[grid_key]
        sizes = grid_thw.prod(-1).tolist()
        if len(found) != len(sizes):
            raise ValueError(f"the prompt has {len(found)} {modality} placeholders for {len(sizes)} {modality}s")
        if modality == "image" and pixels_key not in processed:  # resized images, for the engine to process
            features = [{"image_uint8": image} for image in _each(processed["image_uint8"])]
        else:
            features = [{"pixel_values": pixels} for pixels in processed[pixels_key].split(sizes)]
        for index, ((start, length), feature, grid) in enumerate(zip(found, features, grid_thw, strict=True)):
            items.append(MultimodalItem(modality, {**feature, "grid_thw": grid[None]}, start, length))
            t, h, w = grid.tolist()
            grids.append((t, h // merge, w // merge))
            intervals.append(time_interval(modality, index))
    positions, delta = mrope_positions(len(ids), items, grids, intervals)
    return MultimodalInputs(items=sorted(items, key=lambda it: it.offset), mrope_positions=positions,
                            mrope_delta=delta)


def _each(images: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    """[1, 3, H, W] images, from one tensor of several of a size or a list of them."""
    return list(images.split(1)) if isinstance(images, torch.Tensor) else images


def image_grid(image_processor: Any, height: int, width: int, bounds: tuple[int, int]) -> tuple[int, int, int]:
    """The patch grid the Qwen-VL image processors make of a height x width image resized within `bounds` pixels:
    both sides rounded to whole merged patches (transformers' smart_resize)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    patch = image_processor.patch_size
    h, w = smart_resize(height, width, factor=patch * image_processor.merge_size, min_pixels=bounds[0],
                        max_pixels=bounds[1])
    return 1, h // patch, w // patch


def qwen2_vl_inputs(hf_config: PretrainedConfig, processed: dict[str, Any]) -> MultimodalInputs:
    """Consecutive frame pairs of a video are one M-RoPE position apart."""
    return cut_items(hf_config, processed, lambda modality, index: 1.0)


def qwen2_5_vl_inputs(hf_config: PretrainedConfig, processed: dict[str, Any]) -> MultimodalInputs:
    """A video's frame pairs are `second_per_grid_ts` seconds apart, and M-RoPE spends `tokens_per_second`
    positions per second (an image has one frame pair, so its step never shows)."""
    seconds = processed.get("second_per_grid_ts")

    def interval(modality: str, index: int) -> float:
        if modality != "video":
            return 1.0
        # without timing the reference takes one second per frame pair
        step = 1.0 if seconds is None else float(seconds[index])
        return step * hf_config.vision_config.tokens_per_second

    return cut_items(hf_config, processed, interval)


def qwen3_vl_inputs(hf_config: PretrainedConfig, processed: dict[str, Any]) -> MultimodalInputs:
    """Qwen2-VL's cutting, with every video frame (temporal patch) its own item: the processor separates frames by
    timestamp text, so each is a placeholder run of its own with one-frame positions."""
    grid = processed.get("video_grid_thw")
    if grid is not None:
        frames = grid.repeat_interleave(grid[:, 0], dim=0)
        frames[:, 0] = 1
        # pixel_values_videos is frame-major within each video, so per-frame sizes split it as they are
        processed = {**processed, "video_grid_thw": frames}
    return qwen2_vl_inputs(hf_config, processed)


PROCESSORS = {
    "Qwen2VLForConditionalGeneration": ProcessorSpec(qwen2_vl_inputs, image_grid=image_grid),
    "Qwen2_5_VLForConditionalGeneration": ProcessorSpec(qwen2_5_vl_inputs, image_grid=image_grid),
    "Qwen3VLForConditionalGeneration": ProcessorSpec(qwen3_vl_inputs, image_grid=image_grid),
    "Qwen3VLMoeForConditionalGeneration": ProcessorSpec(qwen3_vl_inputs, image_grid=image_grid),
}
