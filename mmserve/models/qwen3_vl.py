"""Qwen3-VL, dense and MoE: a ViT over 16x16 patches with learned absolute position embeddings, DeepStack, and the
Qwen3 decoder with interleaved M-RoPE (Qwen3-VL-MoE: the Qwen3-MoE decoder, `models/qwen3_moe.py`).

What differs from `qwen2_vl.py`, and all this file holds:
- ViT: the patch projection has a bias; a learned square table of `num_position_embeddings` absolute positions is
  resampled (bilinear, corners aligned) to each image's patch grid and added before the blocks, on top of the 2-D
  rotary inside attention; blocks use LayerNorm and a plain (non-gated) MLP;
- DeepStack: the outputs of the blocks in `deepstack_visual_indexes` go through their own patch mergers (with the
  LayerNorm after the 2x2 concatenation) and are added to the decoder's hidden states at the media positions after
  the first len(deepstack_visual_indexes) decoder layers. The encoder output of an item is one tensor
  [tokens, hidden * (1 + levels)], main features first, so the encoder cache and chunked prefill slice all levels
  together; the forward splits this step's rows into input embeddings and per-level additions (zero on text rows);
- decoder: Qwen3 (per-head q/k RMSNorm, no q/k/v bias) whose M-RoPE deals the frequency bands out to t/h/w in turn
  (`MRotaryEmbedding(interleaved=True)`) instead of in contiguous sections;
- video: the processor writes every frame (temporal patch) as its own placeholder run after a "<t seconds>" text
  timestamp, and the reference gives each run the positions of a one-frame image; the ViT attends within a frame
  anyway, so each frame is its own item with grid (1, h, w).

The processor cutting is `multimodal/processors/qwen_vl.py`'s; encode and weight-name handling are Qwen2-VL's;
the ViT layers are `layers/vision.py`'s.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from mmserve.forward_batch import ForwardBatch, ForwardMode
from mmserve.layers.rotary import rope_parameters
from mmserve.layers.vision import (
    PackedSeqs,
    PatchEmbed,
    VisionBlock,
    VisionMLP,
    VisionRotary,
    copy_to_device,
    cu_seqlens,
    frame_lengths,
    host_grids,
    patch_positions,
)
from mmserve.models.llama import LlamaModel
from mmserve.models.qwen2_vl import Qwen2VLForConditionalGeneration
from mmserve.models.qwen3_moe import qwen_moe_mlp
from mmserve.multimodal.embed import embed_multimodal


class PatchMerger(nn.Module):
    """Concatenates each merge x merge block of patch features and projects it to the LLM width. The main merger
    normalizes each patch before the concatenation; the DeepStack mergers normalize the concatenated block."""

    def __init__(self, dim: int, out_dim: int, merge: int, norm_after_shuffle: bool):
        super().__init__()
        self.in_dim = dim * merge * merge
        self.norm_after_shuffle = norm_after_shuffle
        self.norm = nn.LayerNorm(self.in_dim if norm_after_shuffle else dim, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.in_dim, self.in_dim)
        self.linear_fc2 = nn.Linear(self.in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.view(-1, self.in_dim)) if self.norm_after_shuffle else self.norm(x).view(-1, self.in_dim)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class Qwen3VisionTransformer(nn.Module):
    def __init__(self, vc: PretrainedConfig):
        super().__init__()
        self.merge = vc.spatial_merge_size
        dim = vc.hidden_size
        self.patch_embed = PatchEmbed(vc.in_channels * vc.temporal_patch_size * vc.patch_size**2, dim, bias=True)
        self.pos_embed = nn.Embedding(vc.num_position_embeddings, dim)
        self.side = int(vc.num_position_embeddings**0.5)
        theta = (getattr(vc, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        self.rotary = VisionRotary(dim // vc.num_heads, theta)
        self.blocks = nn.ModuleList(
            VisionBlock(dim, vc.num_heads, VisionMLP(dim, vc.intermediate_size, vc.hidden_act,
                                                     names=("linear_fc1", "linear_fc2")))
            for _ in range(vc.depth))
        self.merger = PatchMerger(dim, vc.out_hidden_size, self.merge, norm_after_shuffle=False)
        self.deepstack_visual_indexes = list(vc.deepstack_visual_indexes)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(dim, vc.out_hidden_size, self.merge, norm_after_shuffle=True)
            for _ in self.deepstack_visual_indexes)

    def position_embeddings(self, hw: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """[patches, hidden] in float32: the side x side table resampled bilinearly, corners aligned, to each item's
        (h, w) patch grid (`sizes`, per patch), at the (row, column) `hw` of every patch."""
        side = self.side
        # corners aligned: patch 0 samples table row 0 and patch h - 1 samples table row side - 1
        src = hw.float() * (side - 1) / (sizes - 1).clamp(min=1)
        lo = src.floor()
        frac = src - lo
        lo = lo.long()
        hi = (lo + 1).clamp(max=side - 1)
        table = self.pos_embed.weight
        out = 0
        for rows, row_w in ((lo[:, 0], 1 - frac[:, 0]), (hi[:, 0], frac[:, 0])):
            for cols, col_w in ((lo[:, 1], 1 - frac[:, 1]), (hi[:, 1], frac[:, 1])):
                out = out + table[rows * side + cols] * (row_w * col_w)[:, None]
        return out

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """[merged tokens, out_hidden * (1 + DeepStack levels)] of all items (grid_thw [items, 3] on the host): the
        main merger's output, then each level's. Attention runs within each frame (pair) of each item."""
        grids = host_grids(grid_thw)
        x = self.patch_embed(pixel_values)
        frames = frame_lengths(grids)
        # each patch's item grid (h, w), which the position table is resampled to
        sizes = torch.tensor([g[1:] for g in grids]).repeat_interleave(torch.tensor([t * h * w for t, h, w in grids]),
                                                                      dim=0)
        hw, sizes, cu_frames = copy_to_device([patch_positions(grids, self.merge), sizes, cu_seqlens(frames)],
                                              x.device)
        x = x + self.position_embeddings(hw, sizes).to(x.dtype)
        rotary = self.rotary(hw)
        seqs = PackedSeqs(cu_frames, frames)
        levels = []
        for i, block in enumerate(self.blocks):
            x = block(x, rotary, seqs)
            if i in self.deepstack_visual_indexes:
                levels.append(self.deepstack_merger_list[self.deepstack_visual_indexes.index(i)](x))
        return torch.cat([self.merger(x), *levels], dim=-1)


class Qwen3VLTextModel(LlamaModel):
    """The Llama/Qwen3 decoder with DeepStack: `deepstack` [tokens, levels, hidden] is added to the hidden states
    after each of the first `levels` layers."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                input_embeds: torch.Tensor | None = None, deepstack: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids) if input_embeds is None else input_embeds
        residual = None
        for i, layer in enumerate(self.layers):
            hidden_states, residual = layer(positions, hidden_states, residual, batch)
            if deepstack is not None and i < deepstack.shape[1]:
                # the reference adds to the layer's full output (residual + update); folding the residual here
                # keeps its order of additions, and the next layer starts from a fresh residual
                hidden_states, residual = residual + hidden_states + deepstack[:, i], None
        return self.norm(hidden_states) if residual is None else self.norm(hidden_states, residual)[0]


class Qwen3VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    qkv_bias = False
    qk_norm = True

    def __init__(self, config: PretrainedConfig):
        nn.Module.__init__(self)
        self.config = config
        # The reference always interleaves the M-RoPE bands, whether or not the config says `mrope_interleaved`.
        text = copy.deepcopy(config.text_config)
        text.rope_parameters = {**rope_parameters(text), "mrope_interleaved": True}
        self.hidden_size = text.hidden_size
        self.visual = Qwen3VisionTransformer(config.vision_config)
        self.deepstack_levels = len(self.visual.deepstack_visual_indexes)
        self.model = Qwen3VLTextModel(text, qkv_bias=self.qkv_bias, qk_norm=self.qk_norm,
                                      mlp_factory=self.mlp_factory)
        self._build_head(config, text)

    def _wide_embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings padded with zeros to the encoder output's width: text rows get no DeepStack addition."""
        return F.pad(self.model.embed_tokens(input_ids), (0, self.hidden_size * self.deepstack_levels))

    # DeepStack adds encoder features inside the language model's first layers, only on steps with media: the
    # prefill graphs (which replay the language model from the input embeddings alone) leave its media steps eager
    embed = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        deepstack = None
        if self.deepstack_levels and batch.mode == ForwardMode.EXTEND and any(batch.mm_inputs or ()):
            wide = embed_multimodal(input_ids, batch, self._wide_embed, self.encode, self.encoder_cache)
            embeds = wide[:, : self.hidden_size]
            deepstack = wide[:, self.hidden_size :].unflatten(-1, (self.deepstack_levels, self.hidden_size))
        else:
            embeds = embed_multimodal(input_ids, batch, self.model.embed_tokens, self.encode, self.encoder_cache)
        hidden_states = self.model(input_ids, positions, batch, input_embeds=embeds, deepstack=deepstack)
        return self.logits_processor(hidden_states, self.lm_head, batch)


class Qwen3VLMoeForConditionalGeneration(Qwen3VLForConditionalGeneration):
    """Qwen3-VL with the Qwen3-MoE decoder; its router always renormalises the top-k weights."""

    mlp_factory = staticmethod(functools.partial(qwen_moe_mlp, norm_topk_prob=True))


EntryClass = [Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration]
