"""The reference attention backend: PyTorch SDPA over each request's KV gathered from the paged cache.

Runs on any device. Extend loops over requests (prompts differ in length and cached prefix), with an explicit
mask where a sliding window or a bidirectional span bends the causal one; decode gathers
every request's KV into one padded [batch, kv_heads, max_len, dim] tensor and runs a single masked SDPA per
layer, so a decode step costs a few kernels per layer rather than a few per request. GPU backends replace it
with paged kernels and are tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmserve.attention.base import Attention, AttentionBackend, AttentionType, attend, sdpa
from mmserve.forward_batch import ForwardBatch, ForwardMode


@dataclass
class _Metadata:
    slots: list[torch.Tensor]  # KV slots of each request, in position order
    query_starts: list[int]  # offset of each request's new tokens in the flattened batch
    prefix_lens: list[int]
    # per (sliding window, with spans): per-request bool mask, built on first use
    masks: dict[tuple[int | None, bool], list[torch.Tensor | None]]
    # per request: the last key position each new token sees in a bidirectional layer (None: no span in its queries)
    span_last_keys: list[torch.Tensor | None]
    decode_slots: torch.Tensor | None = None  # [B, max_len] padded slot table of a decode step
    decode_masks: dict[int | None, torch.Tensor] | None = None  # per sliding window: [B, 1, 1, max_len]


class TorchAttentionBackend(AttentionBackend):
    supports_logit_cap = True

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        rows = self.req_to_token[batch.req_pool_indices]
        slots = [rows[i, :n] for i, n in enumerate(batch.seq_lens_cpu)]
        starts, offset = [], 0
        for n in batch.extend_lens_cpu:
            starts.append(offset)
            offset += n
        last = batch.span_last_keys()
        span_last_keys = [None] * batch.batch_size
        if last is not None:
            device = batch.seq_lens.device
            for i, (start, n, prefix) in enumerate(zip(starts, batch.extend_lens_cpu, batch.prefix_lens_cpu,
                                                       strict=True)):
                if last[start : start + n] != list(range(prefix, prefix + n)):
                    span_last_keys[i] = torch.tensor(last[start : start + n], device=device)
        batch.attn_metadata = _Metadata(slots, starts, batch.prefix_lens_cpu, {}, span_last_keys)
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

    def _mask(self, meta: _Metadata, i: int, extend_len: int, kv_len: int, window: int | None, spans: bool,
              device: torch.device) -> torch.Tensor:
        """Boolean [extend_len, kv_len] mask (True = attend) for request i, cached per step, window and spans: a
        query at p sees keys in (p - window, last], where last is p, or the end of p's span with `spans`."""
        per_req = meta.masks.setdefault((window, spans), [None] * len(meta.slots))
        if per_req[i] is None:
            q_pos = torch.arange(meta.prefix_lens[i], meta.prefix_lens[i] + extend_len, device=device)[:, None]
            k_pos = torch.arange(kv_len, device=device)[None, :]
            allowed = k_pos <= (meta.span_last_keys[i][:, None] if spans else q_pos)
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
        spans = layer.attn_type is AttentionType.DECODER_BIDIRECTIONAL and meta.span_last_keys[i] is not None
        if spans or window is not None:
            mask, causal = self._mask(meta, i, n, kv_len, window, spans, q.device), False
        elif n == kv_len:
            mask, causal = None, True
        elif n == 1:
            mask, causal = None, False  # a single newest token sees everything
        else:
            mask, causal = self._mask(meta, i, n, kv_len, None, False, q.device), False
        return sdpa(q, k, v, layer, mask, causal)

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
        out = attend(q.unsqueeze(2), k, v, layer, self._decode_mask(batch, layer.sliding_window))  # [B, heads, 1, dim]
        return out.squeeze(2)
