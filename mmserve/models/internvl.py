"""InternVL 3 / 3.5 in transformers' native layout (`InternVLForConditionalGeneration`, the "-hf" checkpoints): an
InternViT tower, pixel shuffle, a LayerNorm-MLP projector, and a Qwen2 (InternVL 3) or Qwen3 (InternVL 3.5) decoder.

The processor cuts each image into tower-sized tiles on the grid that best fits its aspect ratio (at most
`max_patches`) and adds a thumbnail of the whole image when there are several, so images of different shapes are
different numbers of tiles. Every tile is the same `image_seq_length` placeholder tokens (`<IMG_CONTEXT>`), and an
image's tokens sit between `<img>` and `</img>`. A video is its frames, each one tile between its own `<img>` and
`</img>` after a "FrameN: " label; here each frame is an item of its own, as an image of one tile (the processor
side: `multimodal/processors/internvl.py`).

InternViT (`InternVLVisionModel`): a class token and learned positions added to the patch embeddings, then pre-norm
blocks (LayerNorm or RMSNorm by `norm_type`) whose attention output and MLP output are each scaled per channel
(layer scale, `lambda_1` and `lambda_2`) before their residual adds; q and k optionally RMS-normed over all heads
together. The last block's output goes through a final LayerNorm unless `use_mean_pooling`.

From the chosen layer's states without the class token, pixel shuffle folds each k x k block of the feature map
(k = 1 / `downsample_ratio`) into one token of k^2 times the width: a 448 px tile of 32 x 32 patches is 256 tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from mmserve.layers.activation import get_act_fn
from mmserve.layers.embedding import ParallelLMHead
from mmserve.layers.logits import LogitsProcessor
from mmserve.layers.norm import RMSNorm
from mmserve.layers.vision import (
    PackedSeqs,
    VisionMLP,
    copy_to_device,
    cu_seqlens,
    pixels_to_device,
    varlen_attention,
)
from mmserve.models.clip import hidden_state_indices
from mmserve.models.llama import LlamaForCausalLM, LlamaModel
from mmserve.models.llava import load_split_weights
from mmserve.models.media_lm import MediaCausalLM
from mmserve.models.qwen2 import Qwen2ForCausalLM
from mmserve.models.qwen3 import Qwen3ForCausalLM
from mmserve.multimodal.encoder_cache import EncoderCache
from mmserve.multimodal.inputs import MultimodalItem
from mmserve.multimodal.processors.internvl import as_pair, shuffle_factor

_ENCODER_CACHE_BYTES = 512 << 20
# text_config.model_type -> the text family whose switches (q/k/v bias, q/k norm) the decoder takes
_BACKBONES: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM}


def pixel_shuffle(features: torch.Tensor, factor: int) -> torch.Tensor:
    """[tiles, H, W, C] -> [tiles, H/k * W/k, k^2 C]: the token at block (i, j) holds the block's patches row by row
    (rows 2i, 2i + 1; in each, columns 2j, 2j + 1 for k = 2), as transformers' view/permute sequence orders them."""
    tiles, height, width, channels = features.shape
    if height % factor or width % factor:
        raise ValueError(f"a {height}x{width} feature map does not fold into {factor}x{factor} blocks")
    blocks = features.view(tiles, height // factor, factor, width // factor, factor, channels)
    return blocks.permute(0, 1, 3, 2, 4, 5).reshape(tiles, (height // factor) * (width // factor), -1)


# ----- InternViT -----

def _vision_norm(vc: PretrainedConfig) -> nn.Module:
    if vc.norm_type == "layer_norm":
        return nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
    if vc.norm_type == "rms_norm":
        return RMSNorm(vc.hidden_size, vc.layer_norm_eps)
    raise ValueError(f"InternViT with norm_type {vc.norm_type!r} is not supported (layer_norm, rms_norm)")


class InternVisionPatchEmbeddings(nn.Module):
    def __init__(self, vc: PretrainedConfig):
        super().__init__()
        patch = as_pair(vc.patch_size)
        self.projection = nn.Conv2d(vc.num_channels, vc.hidden_size, kernel_size=patch, stride=patch)


class InternVisionEmbeddings(nn.Module):
    def __init__(self, vc: PretrainedConfig):
        super().__init__()
        self.image_size = as_pair(vc.image_size)
        self.grid = tuple(side // patch for side, patch in zip(self.image_size, as_pair(vc.patch_size), strict=True))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, vc.hidden_size))
        self.patch_embeddings = InternVisionPatchEmbeddings(vc)
        self.position_embeddings = (nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + 1, vc.hidden_size))
                                    if vc.use_absolute_position_embeddings else None)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, C, H, W] tower-sized tiles -> [tiles, 1 + patches, hidden]."""
        # tiles of another size are refused with the request (`multimodal/processors/internvl.py`): positions are
        # never interpolated
        assert tuple(pixel_values.shape[-2:]) == self.image_size, "InternViT takes tiles of its image_size"
        projection = self.patch_embeddings.projection
        x = projection(pixel_values.to(projection.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1), x], dim=1)
        return x if self.position_embeddings is None else x + self.position_embeddings


class InternVisionAttention(nn.Module):
    """Separate q/k/v projections (biased by `attention_bias`); with `use_qk_norm`, q and k RMS-normed over the
    whole width (all heads at once, eps 1e-6) before attention; the output projection always has a bias."""

    def __init__(self, vc: PretrainedConfig):
        super().__init__()
        dim = vc.hidden_size
        self.num_heads, self.head_dim = vc.num_attention_heads, dim // vc.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim, bias=vc.attention_bias) for _ in range(3))
        self.projection_layer = nn.Linear(dim, dim)
        self.qk_norm = vc.use_qk_norm
        if self.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(dim, 1e-6), RMSNorm(dim, 1e-6)

    def forward(self, x: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(x.shape[0], self.num_heads, self.head_dim) for t in (q, k, v))
        return self.projection_layer(varlen_attention(q, k, v, seqs, self.scale).reshape(x.shape[0], -1))


class InternVisionLayer(nn.Module):
    """Pre-norm block with layer scale: x + lambda_1 * attn(norm(x)), then the same with the MLP and lambda_2."""

    def __init__(self, vc: PretrainedConfig):
        super().__init__()
        self.layernorm_before = _vision_norm(vc)
        self.attention = InternVisionAttention(vc)
        self.layernorm_after = _vision_norm(vc)
        self.mlp = VisionMLP(vc.hidden_size, vc.intermediate_size, vc.hidden_act)
        self.lambda_1 = nn.Parameter(torch.ones(vc.hidden_size))
        self.lambda_2 = nn.Parameter(torch.ones(vc.hidden_size))

    def forward(self, x: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
        x = x + self.lambda_1 * self.attention(self.layernorm_before(x), seqs)
        return x + self.lambda_2 * self.mlp(self.layernorm_after(x))


class InternVisionEncoder(nn.Module):
    def __init__(self, vc: PretrainedConfig, num_layers: int):
        super().__init__()
        self.layer = nn.ModuleList(InternVisionLayer(vc) for _ in range(num_layers))


class InternVisionTower(nn.Module):
    """The hidden state of one layer (an index into the hidden states, `clip.hidden_state_indices`), [tiles,
    1 + patches, hidden]; with `final_norm` (transformers' `vision_feature_layer` -1, its last_hidden_state) after
    the final LayerNorm where the checkpoint has one. Blocks past that layer are not built. All tiles run as one
    packed batch."""

    def __init__(self, vc: PretrainedConfig, feature_layer: int, final_norm: bool):
        super().__init__()
        self.feature_layer = feature_layer
        self.embeddings = InternVisionEmbeddings(vc)
        self.encoder = InternVisionEncoder(vc, feature_layer)
        self.final_norm = final_norm and not vc.use_mean_pooling
        if self.final_norm:
            self.layernorm = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        tiles, tokens, dim = x.shape
        lengths = [tokens] * tiles
        seqs = PackedSeqs(copy_to_device([cu_seqlens(lengths)], x.device)[0], lengths)
        x = x.reshape(-1, dim)
        for layer in self.encoder.layer:
            x = layer(x, seqs)
        if self.final_norm:
            x = self.layernorm(x)
        return x.view(tiles, tokens, dim)


class InternVLMultiModalProjector(nn.Module):
    def __init__(self, config: PretrainedConfig, in_dim: int):
        super().__init__()
        hidden = config.text_config.hidden_size
        self.layer_norm = nn.LayerNorm(in_dim)
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.act = get_act_fn(config.projector_hidden_act)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))


# ----- the model -----

class InternVLForConditionalGeneration(MediaCausalLM):
    # checkpoint names (after the layout is normalised) loaded as they are, not through the decoder's mapping
    direct_weights = ("vision_tower.", "multi_modal_projector.")

    def __init__(self, config: PretrainedConfig):
        nn.Module.__init__(self)
        self.config = config
        text, vision = config.text_config, config.vision_config
        backbone = _BACKBONES.get(text.model_type)
        if backbone is None:
            raise ValueError(f"InternVL with a {text.model_type!r} text model is not supported; "
                             f"supported: {', '.join(sorted(_BACKBONES))}")
        if config.vision_feature_select_strategy != "default":
            raise ValueError(f"InternVL with vision_feature_select_strategy "
                             f"{config.vision_feature_select_strategy!r} is not supported ('default' only: the class "
                             f"token is dropped, so the patches fold into a square map)")
        if not isinstance(config.vision_feature_layer, int):
            raise ValueError(f"InternVL with a list of vision_feature_layer {config.vision_feature_layer} is not "
                             f"supported (one layer only, as transformers takes it)")
        self.qkv_bias, self.qk_norm = backbone.qkv_bias, backbone.qk_norm
        self.shuffle = shuffle_factor(config)
        (layer,) = hidden_state_indices(config.vision_feature_layer, vision.num_hidden_layers)
        self.vision_tower = InternVisionTower(vision, layer, final_norm=config.vision_feature_layer == -1)
        self.multi_modal_projector = InternVLMultiModalProjector(config, vision.hidden_size * self.shuffle**2)
        self.model = LlamaModel(text, qkv_bias=self.qkv_bias, qk_norm=self.qk_norm)
        self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size)
        # transformers ties by the top-level flag alone (True unless the config says otherwise), not the text config's
        self.tied = bool(getattr(config, "tie_word_embeddings", True))
        if self.tied:
            self.lm_head.tie_to(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(text.vocab_size)
        self.encoder_cache = EncoderCache(_ENCODER_CACHE_BYTES)

    # ----- forward -----

    def tile_features(self, tiles: torch.Tensor) -> torch.Tensor:
        """[tiles, C, H, W] -> projected features [tiles, tokens per tile, hidden], in one tower pass."""
        embeddings = self.vision_tower.embeddings
        states = self.vision_tower(tiles.to(embeddings.cls_token.device))[:, 1:]  # without the class token
        fmap = states.reshape(states.shape[0], *embeddings.grid, -1)
        return self.multi_modal_projector(pixel_shuffle(fmap, self.shuffle))

    def encode(self, items: list[MultimodalItem]) -> list[torch.Tensor]:
        """Each item's features [tiles x tokens per tile, hidden]: all tiles of all items in one tower pass."""
        tiles = [it.features["pixel_values"] for it in items]
        features = self.tile_features(pixels_to_device(tiles, self.vision_tower.embeddings.cls_token.device))
        features = features.split([len(t) for t in tiles])
        return [f.flatten(0, 1) for f in features]

    # ----- weights -----

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Accepts the layout the -hf checkpoints are saved in ("language_model.model.", "language_model.lm_head.",
        "vision_tower.") and transformers 5's in memory ("model.language_model.", "lm_head.", "model.vision_tower.").
        The tower and projector load by name; the decoder as its text family does."""
        # skipped there: blocks past the feature layer, the unused final norm, a mask token
        return load_split_weights(self, weights)


EntryClass = [InternVLForConditionalGeneration]
