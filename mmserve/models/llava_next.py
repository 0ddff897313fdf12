"""LLaVA-NeXT (1.6): LLaVA's tower and projector over several views of an image ("anyres"). The processor picks the
grid of tower-sized tiles (`image_grid_pinpoints`) that best fits the image and sends the whole image resized
(the base view) followed by the tiles. The tiles' features are laid back out as one feature map, the rows or columns
that only cover the processor's padding are cut off ("unpadding"), and a learned `image_newline` row ends each row
of the map; the base view's features come first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.image_processing_utils import select_best_resolution

from mmserve.models.llava import LlavaForConditionalGeneration
from mmserve.multimodal.inputs import MultimodalInputs, MultimodalItem


def tile_grid(image_size: tuple[int, int], config: PretrainedConfig) -> tuple[int, int]:
    """(rows, columns) of tiles the processor cut an image of `image_size` (height, width) into."""
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


def tile_feature_map(tiles: torch.Tensor, image_size: list[int], config: PretrainedConfig) -> torch.Tensor:
    """The features of an image's tiles [rows * cols, side * side, dim] laid back out as one map, unpadded:
    [kept rows, kept columns, dim]."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    rows, cols = tile_grid(image_size, config)
    fmap = tiles.view(rows, cols, side, side, -1).permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, -1)
    return fmap[unpadded_box(image_size, (rows * side, cols * side))]


def close_rows(fmap: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """A feature map [rows, cols, dim] as rows * (cols + 1) tokens, each row closed by `newline`."""
    newline = newline.to(fmap.dtype).expand(fmap.shape[0], 1, -1)
    return torch.cat([fmap, newline], dim=1).flatten(0, 1)


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    direct_weights = (*LlavaForConditionalGeneration.direct_weights, "image_newline")
    family = "LLaVA-NeXT"
    # the tower has a class token, which the "default" strategy drops (the token counts assume it)
    feature_select_strategies: tuple[str, ...] = ("default",)

    def __init__(self, config: PretrainedConfig):
        if config.vision_feature_select_strategy not in self.feature_select_strategies:
            raise ValueError(f"{self.family} with vision_feature_select_strategy "
                             f"{config.vision_feature_select_strategy!r} is not supported")
        super().__init__(config)
        self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size))

    def encode(self, items: list[MultimodalItem]) -> list[torch.Tensor]:
        """Each image's packed features: base view, then the unpadded tile map row by row, each row closed by
        `image_newline`. All tiles of all items go through the tower in one pass."""
        tiles = [it.features["pixel_values"] for it in items]
        features = self.image_features(self.device_pixels(tiles)).split([len(t) for t in tiles])
        return [self._pack(f, it.features["image_sizes"][0].tolist()) for f, it in zip(features, items, strict=True)]

    def _pack(self, features: torch.Tensor, image_size: list[int]) -> torch.Tensor:
        fmap = tile_feature_map(features[1:], image_size, self.config)
        return torch.cat([features[0], close_rows(fmap, self.image_newline)])

    @classmethod
    def image_tokens(cls, hf_config: PretrainedConfig, image_size: list[int]) -> int:
        side = hf_config.vision_config.image_size // hf_config.vision_config.patch_size
        rows, cols = tile_grid(image_size, hf_config)
        kept_rows, kept_cols = unpadded_box(image_size, (rows * side, cols * side))
        height, width = kept_rows.stop - kept_rows.start, kept_cols.stop - kept_cols.start
        return side * side + height * (width + 1)

    @classmethod
    def multimodal_inputs(cls, hf_config: PretrainedConfig, processed: dict[str, Any]) -> MultimodalInputs:
        """One item per image and, for the video families (their `video_tokens`), per video, in prompt order."""
        items = cls.image_items(hf_config, processed)
        if processed.get("pixel_values_videos") is not None and hasattr(cls, "video_tokens"):
            items += video_items(processed["input_ids"][0], hf_config.video_token_id,
                                 processed["pixel_values_videos"], lambda frames: cls.video_tokens(hf_config, frames))
        return MultimodalInputs(items=sorted(items, key=lambda it: it.offset))

    @classmethod
    def image_items(cls, hf_config: PretrainedConfig, processed: dict[str, Any]) -> list[MultimodalItem]:
        """One item per image: its tiles (the processor pads a batch to the most tiles; the padding is dropped)
        and its size. Adjacent images make one run of placeholders, cut by each image's token count."""
        ids = processed["input_ids"][0]
        if processed.get("pixel_values") is None:
            return []
        pixels = processed["pixel_values"]
        pixels = [p for part in (pixels if isinstance(pixels, list) else [pixels]) for p in part]
        sizes = processed["image_sizes"].tolist()
        positions = (ids == hf_config.image_token_id).nonzero().flatten().tolist()
        counts = [cls.image_tokens(hf_config, size) for size in sizes]
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


EntryClass = [LlavaNextForConditionalGeneration]
