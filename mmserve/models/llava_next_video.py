"""LLaVA-NeXT-Video: LLaVA-NeXT (`models/llava_next.py`: CLIP tower, anyres images, Llama / Mistral / Qwen2
decoders) plus video. A video's frames go through the tower like base views; each frame's feature map (before the
projector) is pooled by `spatial_pool_mode` ("average" or "max") over `spatial_pool_stride` x stride windows, then
projected; the frames' tokens follow one another with no newline (the processor side:
`multimodal/processors/llava_next_video.py`).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers import PretrainedConfig

from mmserve.models.llava_next import LlavaNextForConditionalGeneration
from mmserve.multimodal.inputs import MultimodalItem

_POOLS = {"average": F.avg_pool2d, "max": F.max_pool2d}


class LlavaNextVideoForConditionalGeneration(LlavaNextForConditionalGeneration):
    family = "LLaVA-NeXT-Video"

    def __init__(self, config: PretrainedConfig):
        mode = config.spatial_pool_mode
        if mode not in _POOLS:
            raise ValueError(f"LLaVA-NeXT-Video with spatial_pool_mode {mode!r} is not supported "
                             f"(supported: {', '.join(_POOLS)})")
        stride = config.spatial_pool_stride
        side = config.vision_config.image_size // config.vision_config.patch_size
        # the processor counts a frame's tokens as its patches // 4, whatever the stride
        if (side // stride) ** 2 != side * side // 4:
            raise ValueError(f"LLaVA-NeXT-Video with spatial_pool_stride {stride} over {side}x{side} patches is not "
                             f"supported: the processor's token count assumes 2x2 pooling of an even grid")
        self.pool_stride = stride
        super().__init__(config)

    # ----- forward -----

    def encode(self, items: list[MultimodalItem]) -> list[torch.Tensor]:
        """Each image's packed anyres features; each video's frames pooled and projected, [frames * pooled, hidden].
        Every tile and frame goes through the tower in one pass."""
        views = [it.features["pixel_values" if it.modality == "image" else "pixel_values_videos"] for it in items]
        states = self.vision_states(torch.cat(views)).split([len(v) for v in views])
        return [self._pack(self.multi_modal_projector(s), it.features["image_sizes"][0].tolist())
                if it.modality == "image" else self.multi_modal_projector(self._pool(s)).flatten(0, 1)
                for s, it in zip(states, items, strict=True)]

    def _pool(self, frames: torch.Tensor) -> torch.Tensor:
        """[frames, side * side, dim] tower states -> [frames, (side // stride)^2, dim]."""
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        grid = frames.view(len(frames), side, side, -1).permute(0, 3, 1, 2)
        pooled = _POOLS[self.config.spatial_pool_mode](grid, kernel_size=self.pool_stride, stride=self.pool_stride)
        return pooled.flatten(2).transpose(1, 2)


EntryClass = [LlavaNextVideoForConditionalGeneration]
