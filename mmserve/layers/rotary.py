"""Rotary position embeddings (rotate-half layout) with default, linear, llama3 and yarn frequency scaling.

`RotaryEmbedding` precomputes cos/sin for every position up to the context length, so applying it is
an index and a few multiplies per layer: no per-step recomputation, and the table can live on the GPU.

On CUDA one Triton kernel rotates q and k in place (`fused_ops.rotary_embedding`), reading the tables and the
positions on the device; the eager code is the CPU path and the reference for the kernel.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mmserve.layers import fused_ops


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The rope settings of a Hugging Face config as one dict with `rope_type` and `rope_theta`.

    transformers 5 keeps them in `rope_parameters`; older configs use `rope_theta` plus `rope_scaling`.
    """
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None)
    if isinstance(scaling, dict):
        params = {**scaling, **params}
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(base: float, dim: int, p: dict[str, Any]) -> torch.Tensor:
    inv_freq = _default_inv_freq(base, dim)
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_context = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are interpolated by `factor`, short ones kept; a smooth blend in between.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn_inv_freq(base: float, dim: int, p: dict[str, Any], max_position: int) -> tuple[torch.Tensor, float]:
    old_context = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_position / old_context

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 where the original (extrapolated) frequency is kept
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def compute_inv_freq(params: dict[str, Any], rotary_dim: int, max_position: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rotary_dim / 2], scale applied to cos and sin) for a rope parameter dict."""
    base, kind = params["rope_theta"], params["rope_type"]
    if kind == "default":
        return _default_inv_freq(base, rotary_dim), 1.0
    if kind == "linear":
        return _default_inv_freq(base, rotary_dim) / params["factor"], 1.0
    if kind == "llama3":
        return _llama3_inv_freq(base, rotary_dim, params), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(base, rotary_dim, params, max_position)
    raise ValueError(f"unsupported rope_type {kind!r}; supported: default, linear, llama3, yarn")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Applies rotary embeddings to q and k of shape [tokens, heads, head_dim] at the given positions.

    Use the returned tensors: the kernel path rotates q and k in place and returns them, the eager path returns
    new ones."""

    def __init__(self, head_dim: int, max_position: int, params: dict[str, Any], rotary_dim: int | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or int(head_dim * params.get("partial_rotary_factor", 1.0))
        inv_freq, scale = compute_inv_freq(params, self.rotary_dim, max_position)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cache", emb.cos() * scale, persistent=False)
        self.register_buffer("sin_cache", emb.sin() * scale, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if q.is_cuda or fused_ops.run_on_cpu:
            return fused_ops.rotary_embedding(positions, q, k, self.cos_cache, self.sin_cache, self.rotary_dim)
        cos = self.cos_cache[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin_cache[positions].unsqueeze(1).to(q.dtype)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rotary_dim == self.head_dim:
            return x * cos + rotate_half(x) * sin
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


class MRotaryEmbedding(RotaryEmbedding):
    """Multimodal rotary (Qwen2-VL): positions are [3, tokens] (temporal, height, width); the frequency bands
    of the half head dim are split by `mrope_section` and band i takes its angle from position row i % 3.
    Text tokens carry the same value in all three rows, which makes this the plain 1-D rotary for them.

    `interleaved` (Qwen3-VL) deals the bands out in turn instead of in contiguous sections: band j reads row 1
    when j % 3 == 1 and j < 3 * mrope_section[1], row 2 when j % 3 == 2 and j < 3 * mrope_section[2], else row 0,
    so every axis gets both high and low frequencies."""

    def __init__(self, head_dim: int, max_position: int, params: dict[str, Any], mrope_section: list[int],
                 interleaved: bool = False):
        super().__init__(head_dim, max_position, params)
        half = self.rotary_dim // 2
        assert sum(mrope_section) == half, f"mrope_section {mrope_section} must sum to {half}"
        # row (0, 1 or 2) that each frequency band reads its position from
        if interleaved:
            rows = torch.zeros(half, dtype=torch.int64)
            for row in (1, 2):
                rows[row : 3 * mrope_section[row] : 3] = row
        else:
            rows = torch.cat([torch.full((n,), i % 3) for i, n in enumerate(mrope_section)])
        self.register_buffer("band_rows", rows, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super().forward(positions, q, k)
        if q.is_cuda or fused_ops.run_on_cpu:
            return fused_ops.rotary_embedding(positions, q, k, self.cos_cache, self.sin_cache, self.rotary_dim,
                                              self.band_rows)
        half = self.rotary_dim // 2
        # [3, T, half] -> per band, the row it belongs to -> [T, half]
        index = self.band_rows.view(1, 1, half).expand(1, positions.shape[1], half)
        cos = self.cos_cache[:, :half][positions].gather(0, index).squeeze(0)
        sin = self.sin_cache[:, :half][positions].gather(0, index).squeeze(0)
        cos = torch.cat((cos, cos), dim=-1).unsqueeze(1).to(q.dtype)
        sin = torch.cat((sin, sin), dim=-1).unsqueeze(1).to(q.dtype)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)
