"""The reference attention backend: PyTorch SDPA over each request's KV gathered from the paged cache.

Runs on any device. Extend loops over requests (prompts differ in length and cached prefix); decode gathers
every request's KV into one padded [batch, kv_heads, max_len, dim] tensor and runs a single masked SDPA per
layer, so a decode step costs a few kernels per layer rather than a few per request. GPU backends replace it
with paged kernels and are tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmserve.attention.base import Attention, AttentionBackend
from mmserve.forward_batch import ForwardBatch, ForwardMode


@dataclass
class _Metadata:
    slots: list[torch.Tensor]  # KV slots of each request, in position order
    query_starts: list[int]  # offset of each request's new tokens in the flattened batch
    prefix_lens: list[int]
    masks: dict[int | None, list[torch.Tensor | None]]  # per sliding window: per-request bool mask (None: plain causal)
    decode_slots: torch.Tensor | None = None  # [B, max_len] padded slot table of a decode step
    decode_masks: dict[int | None, torch.Tensor] | None = None  # per sliding window: [B, 1, 1, max_len]


class TorchAttentionBackend(AttentionBackend):
    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        rows = self.req_to_token[batch.req_pool_indices]
        slots = [rows[i, :n] for i, n in enumerate(batch.seq_lens_cpu)]
        starts, offset = [], 0
        for n in batch.extend_lens_cpu:
            starts.append(offset)
            offset += n
        batch.attn_metadata = _Metadata(slots, starts, batch.prefix_lens_cpu, {})
        if batch.mode == ForwardMode.DECODE:
            max_len = max(batch.seq_lens_cpu)
            batch.attn_metadata.decode_slots = rows[:, :max_len]
            batch.attn_metadata.decode_masks = {}

    def _decode_mask(self, batch: ForwardBatch, window: int | None) -> torch.Tensor:
        """True where a decode query may attend: inside its own length and, with a window, its last `window`."""
        meta: _Metadata = batch.attn_metadata
        if window not in meta.decode_masks:
            pos = torch.arange(meta.decode_slots.shape[1], device=batch.seq_lens.device)[None, :]
            lens = batch.seq_lens[:, None]
            allowed = pos < lens
            if window is not None:
                allowed &= pos >= lens - window
            meta.decode_masks[window] = allowed[:, None, None, :]
        return meta.decode_masks[window]

    def _mask(self, meta: _Metadata, i: int, extend_len: int, kv_len: int, window: int | None,
              device: torch.device) -> torch.Tensor | None:
        """Boolean [extend_len, kv_len] mask (True = attend) for request i, cached per step and window."""
        per_req = meta.masks.setdefault(window, [None] * len(meta.slots))
        if per_req[i] is None:
            q_pos = torch.arange(meta.prefix_lens[i], meta.prefix_lens[i] + extend_len, device=device)[:, None]
            k_pos = torch.arange(kv_len, device=device)[None, :]
            allowed = k_pos <= q_pos
            if window is not None:
                allowed &= q_pos - k_pos < window
            per_req[i] = allowed
        return per_req[i]

    def _attend(self, q: torch.Tensor, layer: Attention, batch: ForwardBatch, i: int) -> torch.Tensor:
        """q: [n, heads, dim] of request i -> [n, heads, dim]."""
        meta: _Metadata = batch.attn_metadata
        k_buf, v_buf = self.kv_pool.get_kv(layer.layer_id)
        slots = meta.slots[i]
        k, v = k_buf[slots].to(q.dtype), v_buf[slots].to(q.dtype)
        n, kv_len = q.shape[0], slots.shape[0]
        window = layer.sliding_window if layer.sliding_window is not None and layer.sliding_window < kv_len else None
        if window is None and n == kv_len:
            mask, causal = None, True
        elif window is None and n == 1:
            mask, causal = None, False  # a single newest token sees everything
        else:
            mask, causal = self._mask(meta, i, n, kv_len, window, q.device), False
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
            attn_mask=mask, is_causal=causal, scale=layer.scaling,
            enable_gqa=layer.num_heads != layer.num_kv_heads,
        )
        return out.squeeze(0).transpose(0, 1)

    def forward_extend(self, q: torch.Tensor, layer: Attention, batch: ForwardBatch, k: torch.Tensor,
                       v: torch.Tensor) -> torch.Tensor:
        meta: _Metadata = batch.attn_metadata
        outs = [
            self._attend(q[start : start + n], layer, batch, i)
            for i, (start, n) in enumerate(zip(meta.query_starts, batch.extend_lens_cpu, strict=True))
        ]
        return torch.cat(outs, dim=0)

    def forward_decode(self, q: torch.Tensor, layer: Attention, batch: ForwardBatch) -> torch.Tensor:
        meta: _Metadata = batch.attn_metadata
        k_buf, v_buf = self.kv_pool.get_kv(layer.layer_id)
        k = k_buf[meta.decode_slots].to(q.dtype).transpose(1, 2)  # [B, kv_heads, max_len, dim]
        v = v_buf[meta.decode_slots].to(q.dtype).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), k, v, attn_mask=self._decode_mask(batch, layer.sliding_window), scale=layer.scaling,
            enable_gqa=layer.num_heads != layer.num_kv_heads,
        )  # [B, heads, 1, dim]
        return out.squeeze(2)
