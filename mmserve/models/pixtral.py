"""Pixtral's vision tower, and how its images sit in a prompt (LLaVA with a Pixtral tower, and Mistral 3).

The tower takes every image at its own size (the processor resizes the longest edge to a bound, each side to a
multiple of the patch, or of the merged patch for Mistral 3): an image is `rows x cols` patches, and all images of
a call run as one packed sequence, each attending only to itself (`layers.vision.varlen_attention`). There are no
learned positions: q and k turn with a 2-D rotary whose first half of the bands follows the patch row and second
half the column, the two axes taking alternate frequencies of one 1-D table (`PixtralRotary`). Blocks are pre-norm
(RMSNorm, eps 1e-5) with a gated MLP and no biases.

In the prompt, an image of `rows x cols` tokens is `[IMG]` x cols then `[IMG_BREAK]` for each row, the last
`[IMG_BREAK]` being `[IMG_END]`: the span is not one run of image tokens. An item covers the whole span, and
`encode` returns one row per position of it, the break and end rows being the text embeddings of those tokens.
So the item is an ordinary contiguous item to the rest of the engine: `embed_multimodal`, the encoder cache, the
radix cache's pad values and chunked prefill (a chunk may end between two rows of an image) need nothing new,
where a mask from encoder rows to positions would have to be carried and sliced by each of them. The span's two
text tokens travel with the item (`row_end_ids`), since the model's config does not name them. The processor side
(cutting the spans into items) is `multimodal/processors/pixtral.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from mmserve.layers.activation import get_act_fn
from mmserve.layers.norm import RMSNorm
from mmserve.layers.vision import (
    PackedSeqs,
    apply_vision_rotary,
    copy_to_device,
    cu_seqlens,
    patch_positions,
    pixels_to_device,
    varlen_attention,
)
from mmserve.multimodal.inputs import MultimodalItem

_EPS = 1e-5  # the tower's RMSNorms


class PixtralRotary(nn.Module):
    """Pixtral's 2-D rotary: of the head_dim / 2 frequencies of a 1-D table over head_dim, the even ones turn with
    the patch row (first half of the bands) and the odd ones with the column (second half)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("row_freq", freqs[0::2].clone(), persistent=False)
        self.register_buffer("col_freq", freqs[1::2].clone(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N, 2] (row, column) -> cos, sin [N, head_dim / 2] in float32 (`apply_vision_rotary`'s table:
        the first half of the reference's, whose second half repeats it)."""
        pos = positions.float()
        freqs = torch.cat([pos[:, :1] * self.row_freq, pos[:, 1:] * self.col_freq], dim=-1)
        return freqs.cos(), freqs.sin()


class PixtralAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], seqs: PackedSeqs) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = (proj(x).view(n, self.num_heads, self.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_vision_rotary(torch.stack([q, k], dim=1), *rotary).unbind(1)  # q and k in one op
        return self.o_proj(varlen_attention(q, k, v, seqs, self.scale).reshape(n, -1))


class PixtralMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act = get_act_fn(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PixtralBlock(nn.Module):
    """Pre-norm block under the checkpoints' names (attention_norm, attention, ffn_norm, feed_forward)."""

    def __init__(self, vc: PretrainedConfig):
        super().__init__()
        self.attention_norm = RMSNorm(vc.hidden_size, eps=_EPS)
        self.attention = PixtralAttention(vc.hidden_size, vc.num_attention_heads)
        self.ffn_norm = RMSNorm(vc.hidden_size, eps=_EPS)
        self.feed_forward = PixtralMLP(vc.hidden_size, vc.intermediate_size, vc.hidden_act)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], seqs: PackedSeqs) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rotary, seqs)
        return x + self.feed_forward(self.ffn_norm(x))


class PixtralTransformer(nn.Module):
    def __init__(self, vc: PretrainedConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(PixtralBlock(vc) for _ in range(num_layers))


def _rope_theta(vc: PretrainedConfig) -> float:
    params = getattr(vc, "rope_parameters", None) or {}
    kind = params.get("rope_type", "axial")
    if kind != "axial":
        raise ValueError(f"a Pixtral vision tower with rope_type {kind!r} is not supported (only 'axial')")
    return float(params.get("rope_theta", getattr(vc, "rope_theta", 10000.0)))


class PixtralVisionTower(nn.Module):
    """`feature_layers`: indices into the hidden states (0: the patch embeddings after `ln_pre`, i: the output of
    block i - 1); blocks past the deepest are not built (their checkpoint tensors are skipped by the loader)."""

    def __init__(self, vc: PretrainedConfig, feature_layers: Sequence[int]):
        super().__init__()
        self.feature_layers = list(feature_layers)
        self.patch_size = vc.patch_size
        # stride = kernel: used as a matmul over flattened patches (its weight keeps the checkpoint's shape)
        self.patch_conv = nn.Conv2d(vc.num_channels, vc.hidden_size, vc.patch_size, vc.patch_size, bias=False)
        self.ln_pre = RMSNorm(vc.hidden_size, eps=_EPS)
        self.transformer = PixtralTransformer(vc, max(self.feature_layers))
        self.rotary = PixtralRotary(vc.hidden_size // vc.num_attention_heads, _rope_theta(vc))

    def grids(self, image_sizes: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
        """(rows, columns) of patches of each image of (height, width) pixels."""
        return [(int(h) // self.patch_size, int(w) // self.patch_size) for h, w in image_sizes]

    def _patches(self, pixels: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """[C, H, W] (padded or not) -> [rows * cols, C * P * P], row-major, each patch as the conv weight's layout."""
        p = self.patch_size
        pixels = pixels[:, :rows * p, :cols * p]
        return pixels.reshape(-1, rows, p, cols, p).permute(1, 3, 0, 2, 4).reshape(rows * cols, -1)

    def forward(self, pixel_values: Sequence[torch.Tensor],
                image_sizes: Sequence[Sequence[int]]) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """Images [C, H, W] (at least their size; any padding beyond it is cut) and their (height, width) on the
        host -> the hidden states [all patches, hidden] of each feature layer, in `feature_layers` order, and each
        image's (rows, columns) of patches. All images run as one packed sequence batch."""
        grids = self.grids(image_sizes)
        weight = self.patch_conv.weight
        patches = [self._patches(px, rows, cols) for px, (rows, cols) in zip(pixel_values, grids, strict=True)]
        x = F.linear(pixels_to_device(patches, weight.device).to(weight.dtype), weight.flatten(1))
        lengths = [rows * cols for rows, cols in grids]
        positions, cu = copy_to_device([patch_positions([(1, r, c) for r, c in grids], 1), cu_seqlens(lengths)],
                                       weight.device)
        seqs = PackedSeqs(cu, lengths)
        rotary = self.rotary(positions)
        x = self.ln_pre(x)
        states = [x]
        for layer in self.transformer.layers:
            x = layer(x, rotary, seqs)
            states.append(x)
        return [states[i] for i in self.feature_layers], grids


# ----- the images in the prompt -----

def encode_pixtral_images(items: list[MultimodalItem], tower: PixtralVisionTower,
                          project: Callable[[torch.Tensor, list[tuple[int, int]]], list[torch.Tensor]],
                          embed_tokens: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """One row per position of each item's span: the image's projected tokens row by row, each row closed by the
    text embedding of [IMG_BREAK], the last by [IMG_END]'s. `project(states, grids)` turns the tower's feature
    states (concatenated over the feature layers) and each image's patch grid into each image's token map
    [rows, cols, hidden]."""
    sizes = [it.features["image_sizes"][0].tolist() for it in items]
    states, grids = tower([it.features["pixel_values"][0] for it in items], sizes)
    maps = project(torch.cat(states, dim=-1), grids)
    ends = torch.stack([it.features["row_end_ids"] for it in items]).to(maps[0].device)
    row_ends = embed_tokens(ends).to(maps[0].dtype)  # [images, 2 (break, end), hidden]
    out = []
    for fmap, (brk, end) in zip(maps, row_ends, strict=True):
        span = torch.cat([fmap, brk.expand(fmap.shape[0], 1, -1)], dim=1).flatten(0, 1)
        span[-1] = end
        out.append(span)
    return out
