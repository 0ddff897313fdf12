"""Qwen2.5-VL (and MiMo-VL, which uses this architecture): Qwen2-VL with a different vision tower and video timing.

What differs from `qwen2_vl.py`, and all this file holds:
- ViT blocks use RMSNorm and a gated SiLU MLP (gate/up/down projections with bias); the merger's norm is RMSNorm;
- most blocks attend only within windows of `window_size` pixels; the blocks in `fullatt_block_indexes` attend
  within each whole frame (pair). Patches are reordered once so that every window is a contiguous run, the blocks
  run on that order, and the merged tokens are put back into the processor's order at the end;
- in the LLM's M-RoPE, consecutive frame pairs of a video are `second_per_grid_ts * tokens_per_second` positions
  apart (real time), not one.

The processor cutting, the LLM, the rotary helpers and weight loading are Qwen2-VL's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from mmserve.layers.activation import get_act_fn
from mmserve.layers.norm import RMSNorm
from mmserve.layers.rotary import rotate_half
from mmserve.models.qwen2_vl import (
    PatchMerger,
    Qwen2VLForConditionalGeneration,
    VisionAttention,
    VisionRotary,
    patch_positions,
)

# Upper bound on query x key scores one batched attention call may hold (per head), so that many equal frames of
# a long video are not materialized at once by a backend that builds the full score matrix.
_MAX_SCORES_PER_CALL = 1 << 26


def window_order(grid_thw: torch.Tensor, merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """Order of the merged units (merge x merge patch blocks) that makes every attention window contiguous, and
    the windows' lengths in patches.

    `window` is the side of a window in merged units. Each frame's grid is tiled from the top-left corner, so the
    windows on the bottom and right edges are smaller when the grid is not a multiple of the window. Windows
    follow frame by frame, item by item, so each frame stays one contiguous run as well."""
    order: list[torch.Tensor] = []
    lengths: list[int] = []
    base = 0
    for t, h, w in grid_thw.tolist():
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


def group_segments(seqlens: list[int], device: torch.device) -> list[torch.Tensor]:
    """Row indices of the segments of a packed sequence, equal lengths together: a list of [segments, length].

    Window attention cuts an image into dozens of windows, almost all of one size; one attention call per group
    instead of one per window keeps the per-call overhead from dominating on a GPU."""
    by_length: dict[int, list[int]] = {}
    start = 0
    for n in seqlens:
        if n:
            by_length.setdefault(n, []).append(start)
        start += n
    groups: list[torch.Tensor] = []
    for n, starts in by_length.items():
        rows = torch.tensor(starts, device=device)[:, None] + torch.arange(n, device=device)
        groups += rows.split(max(1, _MAX_SCORES_PER_CALL // (n * n)))
    return groups


class GroupedVisionAttention(VisionAttention):
    """Qwen2-VL's vision attention (same weights), with equal-length segments batched into one SDPA call."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,  # type: ignore[override]
                segments: list[torch.Tensor]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        # rotary in float32, as the reference does
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
        if len(segments) == 1 and segments[0].shape == (1, n):  # one segment covering everything: no gather
            o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
            return self.proj(o.transpose(0, 1).reshape(n, -1))
        out = torch.empty_like(q)
        for rows in segments:
            count, length = rows.shape
            flat = rows.flatten()
            qs, ks, vs = (t[flat].view(count, length, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs)
            out[flat] = o.transpose(1, 2).reshape(count * length, self.num_heads, self.head_dim)
        return self.proj(out.reshape(n, -1))


class VisionGatedMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        # separate projections, named as in the checkpoints, so the vision weights load by name
        self.gate_proj = nn.Linear(dim, hidden, bias=True)
        self.up_proj = nn.Linear(dim, hidden, bias=True)
        self.down_proj = nn.Linear(hidden, dim, bias=True)
        self.act = get_act_fn(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Qwen2_5_VisionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int, act: str):
        super().__init__()
        self.norm1 = RMSNorm(dim, eps=1e-6)
        self.norm2 = RMSNorm(dim, eps=1e-6)
        self.attn = GroupedVisionAttention(dim, num_heads)
        self.mlp = VisionGatedMLP(dim, mlp_dim, act)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segments: list[torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


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
        patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        # the reference's Conv3d with stride = kernel is a matmul over each flattened patch
        self.patch_embed = nn.ModuleDict({"proj": nn.Linear(patch_dim, dim, bias=False)})
        theta = (getattr(vc, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        self.rotary = VisionRotary(getattr(vc, "head_dim", None) or dim // vc.num_heads, theta)
        self.blocks = nn.ModuleList(Qwen2_5_VisionBlock(dim, vc.num_heads, vc.intermediate_size, vc.hidden_act)
                                    for _ in range(vc.depth))
        self.merger = RMSNormPatchMerger(vc.out_hidden_size, dim, self.merge)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed["proj"](pixel_values.to(self.patch_embed["proj"].weight.dtype))
        device = x.device
        unit = self.merge**2
        units, window_lens = window_order(grid_thw, self.merge, self.window)
        # the processor keeps each merged unit's patches together, so reordering units reorders patch runs
        patches = (units[:, None] * unit + torch.arange(unit)).flatten().to(device)
        x = x[patches]
        cos, sin = self.rotary(patch_positions(grid_thw, self.merge).to(device)[patches])
        frames = group_segments([h * w for t, h, w in grid_thw.tolist() for _ in range(t)], device)
        windows = group_segments(window_lens, device)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, frames if i in self.full_attention_blocks else windows)
        merged = self.merger(x)
        # back to the processor's order, which is the order of the placeholder tokens
        restore = torch.empty_like(units)
        restore[units] = torch.arange(units.numel())
        return merged[restore.to(device)]


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    vision_tower = Qwen2_5_VisionTransformer

    @classmethod
    def time_interval(cls, hf_config: PretrainedConfig, processed: dict[str, Any], modality: str, index: int) -> float:
        """A video's frame pairs are `second_per_grid_ts` seconds apart; M-RoPE spends `tokens_per_second`
        positions per second. An image has one frame pair, so its step never shows."""
        if modality != "video":
            return 1.0
        seconds = processed.get("second_per_grid_ts")
        # without timing the reference takes one second per frame pair
        step = 1.0 if seconds is None else float(seconds[index])
        return step * hf_config.vision_config.tokens_per_second


EntryClass = [Qwen2_5_VLForConditionalGeneration]
