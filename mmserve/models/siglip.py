"""SigLIP's vision tower, as Gemma 3 uses it: patch embeddings (a biased convolution) plus learned positions, no
class token, pre-norm blocks (tanh-GELU MLP, no rotary) and a final LayerNorm; the pooling head is never used.

The blocks are CLIP's (`models/clip.py`): the same names, norms and attention, only the activation differs, which
they read from the config.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from mmserve.layers.vision import PackedSeqs, copy_to_device, cu_seqlens
from mmserve.models.clip import CLIPEncoderLayer


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, vc: PretrainedConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(vc.num_channels, vc.hidden_size, vc.patch_size, vc.patch_size)
        self.position_embedding = nn.Embedding((vc.image_size // vc.patch_size) ** 2, vc.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[images, C, H, W] tower-sized pixels -> [images, patches, hidden]."""
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        return patches + self.position_embedding.weight


class SiglipEncoder(nn.Module):
    def __init__(self, vc: PretrainedConfig, num_layers: int | None = None):
        super().__init__()
        count = vc.num_hidden_layers if num_layers is None else num_layers
        self.layers = nn.ModuleList(CLIPEncoderLayer(vc) for _ in range(count))


class SiglipVisionTower(nn.Module):
    """The last hidden state after `post_layernorm`, [images, patches, hidden]; all images in one packed batch.

    With `feature_layers` (indices into the hidden states, `clip.hidden_state_indices`), as LLaVA-OneVision reads
    it: those layers' hidden states instead, a list in that order, without the final norm; blocks past the deepest
    are not built."""

    def __init__(self, vc: PretrainedConfig, feature_layers: list[int] | None = None):
        super().__init__()
        self.feature_layers = feature_layers
        self.embeddings = SiglipVisionEmbeddings(vc)
        self.encoder = SiglipEncoder(vc, None if feature_layers is None else max(feature_layers))
        if feature_layers is None:
            self.post_layernorm = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        x = self.embeddings(pixel_values)
        images, tokens, dim = x.shape
        lengths = [tokens] * images
        seqs = PackedSeqs(copy_to_device([cu_seqlens(lengths)], x.device)[0], lengths)
        x = x.reshape(-1, dim)
        if self.feature_layers is None:
            for layer in self.encoder.layers:
                x = layer(x, seqs)
            return self.post_layernorm(x).view(images, tokens, dim)
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x, seqs)
            states.append(x)
        return [states[i].view(images, tokens, dim) for i in self.feature_layers]
