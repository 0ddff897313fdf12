"""LLaVA-NeXT (1.6): LLaVA's tower and projector over several views of an image ("anyres"). The processor picks the
grid of tower-sized tiles (`image_grid_pinpoints`) that best fits the image and sends the whole image resized
(the base view) followed by the tiles. The tiles' features are laid back out as one feature map, the rows or columns
that only cover the processor's padding are cut off ("unpadding"), and a learned `image_newline` row ends each row
of the map; the base view's features come first. The processor side (each image's token count and item) is
`multimodal/processors/llava_next.py`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from mmserve.models.llava import LlavaForConditionalGeneration
from mmserve.multimodal.inputs import MultimodalItem
from mmserve.multimodal.processors.llava_next import tile_grid, unpadded_box


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


EntryClass = [LlavaNextForConditionalGeneration]
