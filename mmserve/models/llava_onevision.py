"""LLaVA-OneVision: LLaVA-NeXT's anyres views (`models/llava_next.py`) under a SigLIP tower, all of its features
("full": SigLIP has no class token) from `vision_feature_layer` before the final norm, a Qwen2 decoder, and video.

Two things differ from LLaVA-NeXT for images: a tile map larger than `vision_aspect_ratio` ("anyres_max_N": N
tower views' worth of features) is shrunk by bilinear interpolation to that area before the `image_newline` column
is added, and the same counts are what the processor expands the placeholder to. Every image of a prompt is tiled:
transformers' base-view-only mode for several images applies only when images are passed as a nested list per
prompt, which neither the processor called with a flat list nor mmserve does.

A video is its frames through the tower and projector, each frame's feature map halved by bilinear interpolation
(rounding up: 27x27 -> 14x14), all frames' tokens in order, then one `image_newline` after the whole video.
The processor side is `multimodal/processors/llava_onevision.py`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PretrainedConfig

from mmserve.models.llava_next import LlavaNextForConditionalGeneration, close_rows, tile_feature_map
from mmserve.models.siglip import SiglipVisionTower
from mmserve.multimodal.inputs import MultimodalItem
from mmserve.multimodal.processors.llava_onevision import max_tile_views, shrunk_size


class LlavaOnevisionForConditionalGeneration(LlavaNextForConditionalGeneration):
    family = "LLaVA-OneVision"
    feature_select_strategies = ("full",)  # SigLIP has no class token: "default" would drop a patch

    def __init__(self, config: PretrainedConfig):
        if config.vision_config.model_type != "siglip_vision_model":
            raise ValueError(f"LLaVA-OneVision with a {config.vision_config.model_type!r} vision tower is not "
                             f"supported (SigLIP only)")
        self.max_views = max_tile_views(config)
        super().__init__(config)

    def build_vision_tower(self, vision: PretrainedConfig, layers: list[int]) -> nn.Module:
        return SiglipVisionTower(vision, layers)

    # ----- forward -----

    def encode(self, items: list[MultimodalItem]) -> list[torch.Tensor]:
        """Each image's packed features (base view, then the shrunk tile map row by row with `image_newline`), each
        video's pooled frames and one `image_newline`. Every tile and frame goes through the tower in one pass."""
        views = [it.features["pixel_values" if it.modality == "image" else "pixel_values_videos"] for it in items]
        features = self.image_features(self.device_pixels(views)).split([len(v) for v in views])
        return [self._pack(f, it.features["image_sizes"][0].tolist()) if it.modality == "image" else self._pool(f)
                for f, it in zip(features, items, strict=True)]

    def _pack(self, features: torch.Tensor, image_size: list[int]) -> torch.Tensor:
        fmap = tile_feature_map(features[1:], image_size, self.config)
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        size = shrunk_size(fmap.shape[0], fmap.shape[1], side, self.max_views)
        if size != tuple(fmap.shape[:2]):
            fmap = F.interpolate(fmap.permute(2, 0, 1)[None], size=list(size), mode="bilinear")[0].permute(1, 2, 0)
        return torch.cat([features[0], close_rows(fmap, self.image_newline)])

    def _pool(self, frames: torch.Tensor) -> torch.Tensor:
        """[frames, side * side, dim] -> each frame's map halved (bilinear, rounding up), then `image_newline`."""
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        grid = frames.view(len(frames), side, side, -1).permute(0, 3, 1, 2)
        pooled = F.interpolate(grid, size=[math.ceil(side / 2)] * 2, mode="bilinear").permute(0, 2, 3, 1)
        return torch.cat([pooled.reshape(-1, frames.shape[-1]), self.image_newline[None].to(frames.dtype)])


EntryClass = [LlavaOnevisionForConditionalGeneration]
