"""Mistral 3 (Mistral-Small-3.1): Pixtral's tower (`models/pixtral.py`), then a projector that RMS-norms the chosen
layer's features, merges each `spatial_merge_size` x `spatial_merge_size` block of patches into one token (a linear
over the block's features side by side) and maps them through two linears into a Mistral decoder.

Images are each their own size (a multiple of the merged patch on both sides); the prompt holds each one as rows
of `[IMG]` tokens closed by `[IMG_BREAK]`, the last by `[IMG_END]`, and an item covers that whole span (see
`models/pixtral.py` for why; the processor side is `multimodal/processors/mistral3.py`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from mmserve.layers.activation import get_act_fn
from mmserve.layers.embedding import ParallelLMHead
from mmserve.layers.logits import LogitsProcessor
from mmserve.layers.norm import RMSNorm
from mmserve.models.clip import hidden_state_indices
from mmserve.models.llama import LlamaModel
from mmserve.models.llava import _BACKBONES, _ENCODER_CACHE_BYTES, LlavaForConditionalGeneration
from mmserve.models.pixtral import PixtralVisionTower, encode_pixtral_images
from mmserve.multimodal.encoder_cache import EncoderCache
from mmserve.multimodal.inputs import MultimodalItem


class Mistral3PatchMerger(nn.Module):
    """Each merge x merge block of an image's patch map -> one token: the block's features side by side, in the
    order transformers' `unfold` lays them (each channel's merge x merge values together), through a linear."""

    def __init__(self, dim: int, merge: int):
        super().__init__()
        self.merge = merge
        self.merging_layer = nn.Linear(dim * merge * merge, dim, bias=False)

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        """x [all patches, dim] of images with (rows, cols) patches -> each image's [rows / m, cols / m, dim]."""
        m, dim = self.merge, x.shape[-1]
        blocks = []
        for part, (rows, cols) in zip(x.split([r * c for r, c in grids]), grids, strict=True):
            block = part.view(rows // m, m, cols // m, m, dim).permute(0, 2, 4, 1, 3)
            blocks.append(block.reshape(rows // m, cols // m, dim * m * m))
        merged = self.merging_layer(torch.cat([b.flatten(0, 1) for b in blocks]))
        return [t.view(b.shape[0], b.shape[1], -1) for t, b in
                zip(merged.split([b.shape[0] * b.shape[1] for b in blocks]), blocks, strict=True)]


class Mistral3MultiModalProjector(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        vision_dim, hidden = config.vision_config.hidden_size, config.text_config.hidden_size
        bias = config.multimodal_projector_bias
        self.norm = RMSNorm(vision_dim, eps=config.text_config.rms_norm_eps)
        self.patch_merger = Mistral3PatchMerger(vision_dim, config.spatial_merge_size)
        self.linear_1 = nn.Linear(vision_dim, hidden, bias=bias)
        self.act = get_act_fn(config.projector_hidden_act)
        self.linear_2 = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, states: torch.Tensor, grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        """The tower's states [all patches, dim] -> each image's token map [rows / m, cols / m, hidden]."""
        return [self.linear_2(self.act(self.linear_1(t))) for t in self.patch_merger(self.norm(states), grids)]


class Mistral3ForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA's decoder and loader, with Pixtral's tower and Mistral 3's merging projector."""

    def __init__(self, config: PretrainedConfig):
        nn.Module.__init__(self)
        self.config = config
        text, vision = config.text_config, config.vision_config
        backbone = _BACKBONES.get(text.model_type)
        if backbone is None:
            raise ValueError(f"Mistral 3 with a {text.model_type!r} text model is not supported; "
                             f"supported: {', '.join(sorted(_BACKBONES))}")
        if vision.model_type != "pixtral":
            raise ValueError(f"Mistral 3 with a {vision.model_type!r} vision tower is not supported (only 'pixtral')")
        self.qkv_bias, self.qk_norm = backbone.qkv_bias, backbone.qk_norm
        self.pixtral, self.keep_class_token = True, True
        layers = hidden_state_indices(config.vision_feature_layer, vision.num_hidden_layers)
        if len(layers) != 1:  # the projector's norm and merger take one layer's width (transformers' too)
            raise ValueError(f"Mistral 3 with several vision_feature_layer {config.vision_feature_layer} is not "
                             "supported (one layer only)")
        self.vision_tower = PixtralVisionTower(vision, layers)
        self.multi_modal_projector = Mistral3MultiModalProjector(config)
        self.model = LlamaModel(text, qkv_bias=self.qkv_bias, qk_norm=self.qk_norm)
        self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size)
        self.tied = bool(getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))
        if self.tied:
            self.lm_head.tie_to(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(text.vocab_size)
        self.encoder_cache = EncoderCache(_ENCODER_CACHE_BYTES)

    def encode(self, items: list[MultimodalItem]) -> list[torch.Tensor]:
        """One row per position of each image's span: merged tokens row by row, with the break and end rows."""
        return encode_pixtral_images(items, self.vision_tower, self.multi_modal_projector, self.model.embed_tokens)


EntryClass = [Mistral3ForConditionalGeneration]
