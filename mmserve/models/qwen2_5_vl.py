"""Qwen2.5-VL (and MiMo-VL, which uses this architecture): Qwen2-VL with a different vision tower and video timing.

What differs from `qwen2_vl.py`:
- ViT blocks use RMSNorm and a gated SiLU MLP (gate/up/down projections with bias); the merger's norm is RMSNorm;
- most blocks attend only within windows of `window_size` pixels; the blocks in `fullatt_block_indexes` attend
  within each whole frame (pair). Patches are reordered once so that every window is a contiguous run, the blocks
  run on that order (each a single attention call over all windows or frames of the step: `layers/vision.py`),
  and the merged tokens are put back into the processor's order at the end;
- in the LLM's M-RoPE, consecutive frame pairs of a video are `second_per_grid_ts * tokens_per_second` positions
  apart (real time), not one (the processor side computes the positions).

The processor cutting (with the video timing) is `multimodal/processors/qwen_vl.py`'s; the LLM and weight loading
are Qwen2-VL's; the ViT layers are `layers/vision.py`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from mmserve.layers.mlp import GatedMLP
from mmserve.layers.norm import RMSNorm
from mmserve.layers.vision import (
    Grid,
    PackedSeqs,
    PatchEmbed,
    VisionBlock,
    VisionPlan,
    VisionRotary,
    frame_lengths,
    host_grids,
    patch_positions,
)
from mmserve.models.qwen2_vl import PatchMerger, Qwen2VLForConditionalGeneration


def window_order(grids: Sequence[Grid], merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """Order of the merged units (merge x merge patch blocks) that makes every attention window contiguous, and
    the windows' lengths in patches, on the host.

    `window` is the side of a window in merged units. Each frame's grid is tiled from the top-left corner, so the
    windows on the bottom and right edges are smaller when the grid is not a multiple of the window. Windows
    follow frame by frame, item by item, so each frame stays one contiguous run as well."""
    order: list[torch.Tensor] = []
    lengths: list[int] = []
    base = 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        pad_h, pad_w = -gh % window, -gw % window
        units = torch.arange(t * gh * gw).view(t, gh, gw)
        # pad to whole windows with -1, then lay the grid out window by window
        tiled = F.pad(units, (0, pad_w, 0, pad_h), value=-1)
        rows, cols = (gh + pad_h) // window, (gw + pad_w) // window
        tiled = tiled.view(t, rows, window, cols, window).permute(0, 1, 3, 2, 4).reshape(-1, window * window)
        real = tiled >= 0
        order.append(tiled[real] + base)
        lengths += (real.sum(-1) * merge * merge).tolist()
        base += t * gh * gw
    return torch.cat(order), lengths


class RMSNormPatchMerger(PatchMerger):
    """Qwen2-VL's patch merger with RMSNorm in place of LayerNorm."""

    def __init__(self, out_dim: int, dim: int, merge: int):
        super().__init__(out_dim, dim, merge)
        self.ln_q = RMSNorm(dim, eps=1e-6)


class Qwen2_5_VisionTransformer(nn.Module):
    def __init__(self, vc: PretrainedConfig):
        super().__init__()
        self.merge = vc.spatial_merge_size
        # the window's side in merged units (window_size is in pixels)
        self.window = vc.window_size // vc.spatial_merge_size // vc.patch_size
        self.full_attention_blocks = set(vc.fullatt_block_indexes)
        dim = vc.hidden_size  # the ViT width; out_hidden_size is the LLM's
        self.patch_embed = PatchEmbed(vc.in_channels * vc.temporal_patch_size * vc.patch_size**2, dim)
        theta = (getattr(vc, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        self.rotary = VisionRotary(getattr(vc, "head_dim", None) or dim // vc.num_heads, theta)
        # gate_proj and up_proj (with biases) load into GatedMLP's merged gate_up_proj (`packed_modules`)
        self.blocks = nn.ModuleList(
            VisionBlock(dim, vc.num_heads, GatedMLP(dim, vc.intermediate_size, vc.hidden_act, bias=True), RMSNorm)
            for _ in range(vc.depth))
        self.merger = RMSNormPatchMerger(vc.out_hidden_size, dim, self.merge)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Merged features [tokens, out_hidden] of all items (grid_thw [items, 3] on the host), in the processor's
        order. The blocks run on the patches reordered window by window: the window blocks attend within each
        window, the others within each frame (pair), which stays contiguous in that order."""
        plan = self.plan(host_grids(grid_thw))
        return self.run(pixel_values, *plan.to_device(self.patch_embed.proj.weight.device))

    def plan(self, grids: Sequence[Grid]) -> VisionPlan:
        """The window order of the patches (`patches`), their (row, column) in that order, the permutation of the
        merged units back to the processor's order (`restore`), and the frames and windows as sequences."""
        units, windows = window_order(grids, self.merge, self.window)
        # the processor keeps each merged unit's patches together, so reordering units reorders patch runs
        unit = self.merge**2
        patches = (units[:, None] * unit + torch.arange(unit)).flatten()
        return VisionPlan({"patches": patches, "positions": patch_positions(grids, self.merge)[patches],
                           "restore": units.argsort()},
                          {"frames": frame_lengths(grids), "windows": windows})

    def max_seqlens(self, patches: int) -> dict[str, int]:
        """Bounds on the sequences of each packing in a call of `patches` patches (a CUDA graph's `max_seqlen`)."""
        return {"frames": patches, "windows": min(patches, (self.window * self.merge) ** 2)}

    def run(self, pixel_values: torch.Tensor, tensors: dict[str, torch.Tensor],
            seqs: dict[str, PackedSeqs]) -> torch.Tensor:
        """The tower over a plan on the device (what a CUDA graph captures)."""
        x = self.patch_embed(pixel_values)[tensors["patches"]]
        rotary = self.rotary(tensors["positions"])
        for i, block in enumerate(self.blocks):
            x = block(x, rotary, seqs["frames"] if i in self.full_attention_blocks else seqs["windows"])
        # back to the processor's order, which is the order of the placeholder tokens
        return self.merger(x)[tensors["restore"]]


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    vision_tower = Qwen2_5_VisionTransformer


EntryClass = [Qwen2_5_VLForConditionalGeneration]
