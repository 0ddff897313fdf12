"""CLIP's vision tower, as LLaVA-style models use it: a class token and learned positions added to the patch
embeddings, a LayerNorm before the encoder, then pre-norm blocks (quick-GELU MLP, no rotary).

The models read hidden states of chosen layers, not the final output, so the tower runs only as far as the deepest
layer asked for and returns those layers' states; the pooled head (`post_layernorm`) is never used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PretrainedConfig

from mmserve.forward_batch import ForwardBatch
from mmserve.layers.vision import PackedSeqs, VisionMLP, copy_to_device, cu_seqlens, varlen_attention


def hidden_state_indices(layers: int | Sequence[int], num_layers: int) -> list[int]:
    """transformers' `vision_feature_layer` (one index or a list, negative from the end) as indices into the
    hidden states (0: the encoder's input, i: the output of block i - 1)."""
    layers = [layers] if isinstance(layers, int) else list(layers)
    return [i if i >= 0 else num_layers + 1 + i for i in layers]


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, vc: PretrainedConfig):
        super().__init__()
        self.patch_size = vc.patch_size
        self.class_embedding = nn.Parameter(torch.empty(vc.hidden_size))
        self.patch_embedding = nn.Conv2d(vc.num_channels, vc.hidden_size, vc.patch_size, vc.patch_size, bias=False)
        self.position_embedding = nn.Embedding((vc.image_size // vc.patch_size) ** 2 + 1, vc.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[images, C, H, W] -> [images, 1 + patches, hidden]; images are the tower's size (the processor crops)."""
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
        q, k, v = (proj(x).view(x.shape[0], self.num_heads, self.head_dim)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(varlen_attention(q, k, v, seqs, self.scale).reshape(x.shape[0], -1))


class CLIPEncoderLayer(nn.Module):
    """A pre-norm block around `self_attn`: the packed bidirectional attention of the vision towers by default (its
    context the step's PackedSeqs); CLIP's text tower passes its causal attention over the paged cache (its
    context the ForwardBatch)."""

    def __init__(self, vc: PretrainedConfig, self_attn: nn.Module | None = None):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        self.self_attn = self_attn if self_attn is not None else CLIPAttention(vc.hidden_size, vc.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        self.mlp = VisionMLP(vc.hidden_size, vc.intermediate_size, vc.hidden_act)

    def forward(self, x: torch.Tensor, context: PackedSeqs | ForwardBatch) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), context)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, vc: PretrainedConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(vc) for _ in range(num_layers))


class CLIPVisionTower(nn.Module):
    """`feature_layers`: indices into the hidden states (`hidden_state_indices`); blocks past the deepest are not
    built (their checkpoint tensors are skipped by the model's loader)."""

    def __init__(self, vc: PretrainedConfig, feature_layers: Sequence[int]):
        super().__init__()
        self.feature_layers = list(feature_layers)
        self.embeddings = CLIPVisionEmbeddings(vc)
        self.pre_layrnorm = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)  # sic: the checkpoints' name
        self.encoder = CLIPEncoder(vc, max(self.feature_layers))

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states [images, 1 + patches, hidden] of each feature layer, in `feature_layers` order; all images
        run as one packed sequence batch."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        images, tokens, dim = x.shape
        lengths = [tokens] * images
        seqs = PackedSeqs(copy_to_device([cu_seqlens(lengths)], x.device)[0], lengths)
        x = x.reshape(-1, dim)
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x, seqs)
            states.append(x)
        return [states[i].view(images, tokens, dim) for i in self.feature_layers]
