"""The Triton attention backend: paged decode (split-KV) and extend kernels reading the KV pool in place.

`init_forward_metadata` turns the step's per-request lengths into device tensors once (extend: query offsets and
extend lengths in one pinned host-to-device copy, with each new token's last visible key when bidirectional spans
hold some; prefix lengths are seq_len - extend_len in the kernel; the longest extend as a host int that sizes the
grid); the per-layer calls then only launch kernels: no host sync, no per-request Python. Encoder-only layers run
over the step's own K and V: torch's flash kernel (non-causal) or the extend kernel's encoder variant. Kernels live
in `triton_kernels.py`; the torch backend is the reference they are tested against (on CPU under
`TRITON_INTERPRET=1`).

Decode can be captured in a CUDA graph (`supports_cuda_graph`; runner/cuda_graph.py): the kernels read
`req_pool_indices` and `seq_lens` from device memory, the grid depends only on the batch size and `num_kv_splits`
(itself a function of the batch size), and a padding row of length 0 gets zeros without reading anything. The
graph runner builds each bucket's metadata once over its static buffers; the split scratch is allocated by the
first layer of the warm-up before capture and kept with that metadata. Cross-attention decode (Llama 3.2
Vision's images) is the same kernel over the model's slabs of encoder rows, with its table of slots in place of
req_to_token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from mmserve.attention.base import Attention, AttentionBackend, AttentionType
from mmserve.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from mmserve.attention.triton_kernels import DecodeBlocks, ExtendBlocks

logger = logging.getLogger(__name__)


@dataclass
class _DecodeMetadata:
    req_pool_indices: torch.Tensor  # [B]
    seq_lens: torch.Tensor  # [B]
    num_kv_splits: int  # splits in the grid; a request uses fewer when it is short
    # partial results of the splits per (heads, v_dim), allocated by the first layer and reused by the others
    scratch: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass
class _ExtendMetadata:
    req_pool_indices: torch.Tensor  # [B]
    seq_lens: torch.Tensor  # [B]
    q_starts: torch.Tensor  # [B] int32: offset of request i's new tokens in the flattened batch
    extend_lens: torch.Tensor  # [B] int32
    max_extend_len: int  # sizes the grid's query-block axis
    # nothing cached for any request: [B + 1] int32 offsets of the prompts, for torch's flash attention over the
    # step's own keys and values instead of the kernel (see forward_extend)
    cu_seqlens: torch.Tensor | None = None
    # [T] int32: the last key position each new token sees in a bidirectional layer (None: no span holds a query)
    last_keys: torch.Tensor | None = None


_flash_varlen_failed = False


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                 scale: float, causal: bool = True) -> torch.Tensor | None:
    """Causal (or with `causal=False` full) attention of packed prompts (q [T, heads, dim], k/v [T, kv_heads, dim],
    prompt i at rows cu_seqlens[i]:cu_seqlens[i + 1]) with the flash kernel torch ships, or None where it does not
    apply (not CUDA, not half precision, head dim over 256) or this torch build refused the call once (then logged,
    never retried)."""
    global _flash_varlen_failed
    if (_flash_varlen_failed or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16)
            or q.shape[-1] > 256 or q.shape[-1] % 8):
        return None
    try:
        return torch.ops.aten._flash_attention_forward(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0,
                                                       causal, False, scale=scale)[0]
    except (RuntimeError, TypeError) as exc:
        _flash_varlen_failed = True
        logger.warning("torch's flash attention refused packed prompts (%s); using SDPA and the extend kernel", exc)
        return None


class TritonAttentionBackend(AttentionBackend):
    """Needs a CUDA device, or CPU tensors with TRITON_INTERPRET=1 (tests).

    `max_kv_splits` bounds the decode splits per request; `min_split_len` is the fewest keys worth a split of
    their own. The block sizes default to per-dtype and head-dim choices in `triton_kernels`; tests shrink them
    so that short sequences still cross several blocks.
    """

    supports_cuda_graph = True

    def __init__(self, device: torch.device | str, max_kv_splits: int = 16, min_split_len: int = 64,
                 decode_blocks: DecodeBlocks | None = None, extend_blocks: ExtendBlocks | None = None,
                 dense_prefill: bool | None = None):
        from mmserve.attention import triton_kernels  # imported here: TRITON_INTERPRET is read at decoration time

        device = torch.device(device)
        if device.type != "cuda" and not triton_kernels.interpreting():
            raise ValueError(f"the triton attention backend needs a CUDA device, got {device}; use "
                             "--attention-backend torch (or TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)")
        if max_kv_splits < 1 or min_split_len < 1:
            raise ValueError(f"max_kv_splits and min_split_len must be >= 1, got {max_kv_splits}, {min_split_len}")
        self.kernels = triton_kernels
        self.device = device
        self.max_kv_splits = max_kv_splits
        self.min_split_len = min_split_len
        self.decode_blocks = decode_blocks
        self.extend_blocks = extend_blocks
        # Prompts with no cached prefix are plain causal attention, where torch's flash kernel beat the extend
        # kernel on the H100 (0.3-0.8x for one prompt of 2k-8k tokens: docs/benchmarks.md). On by default on CUDA;
        # the interpreter's tests keep the kernel on every shape unless they ask.
        self.dense_prefill = device.type == "cuda" if dense_prefill is None else dense_prefill
        # Enough decode programs to fill the GPU a few times over; on the interpreter, exercise every split.
        self.target_programs = (4 * torch.cuda.get_device_properties(device).multi_processor_count
                                if device.type == "cuda" else None)

    def num_kv_splits(self, batch_size: int, kv_heads: int) -> int:
        """Decode splits for a batch size: fewer when the batch alone fills the GPU (fixed per size, for graphs)."""
        if self.target_programs is None:
            return self.max_kv_splits
        return max(1, min(self.max_kv_splits, -(-self.target_programs // (batch_size * kv_heads))))

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        if batch.mode == ForwardMode.DECODE:
            splits = self.num_kv_splits(batch.batch_size, self.kv_pool.num_kv_heads)
            batch.attn_metadata = _DecodeMetadata(batch.req_pool_indices, batch.seq_lens, splits)
            return
        starts, offset = [], 0
        for n in batch.extend_lens_cpu:
            starts.append(offset)
            offset += n
        # one host-to-device copy for the per-request vectors, from pinned memory so that it never waits: the query
        # offsets and their total (with nothing cached, the prompts' offsets for flash attention), the extend
        # lengths, and the new tokens' last visible keys when spans hold some
        device = batch.seq_lens.device
        b = batch.batch_size
        last_keys = batch.span_last_keys()
        host = starts + [offset] + batch.extend_lens_cpu + (last_keys or [])
        lens = torch.tensor(host, dtype=torch.int32, pin_memory=device.type == "cuda").to(device, non_blocking=True)
        fresh = self.dense_prefill and not any(batch.prefix_lens_cpu)
        batch.attn_metadata = _ExtendMetadata(
            batch.req_pool_indices, batch.seq_lens, lens[:b], lens[b + 1 : 2 * b + 1], max(batch.extend_lens_cpu),
            lens[: b + 1] if fresh else None, None if last_keys is None else lens[2 * b + 1 :])

    def init_graph_extend_metadata(self, batch: ForwardBatch, q_starts: torch.Tensor, extend_lens: torch.Tensor,
                                   cu_seqlens: torch.Tensor | None, last_keys: torch.Tensor | None = None) -> None:
        """Extend metadata over a prefill graph's static buffers (runner/cuda_graph.py): the per-request vectors
        are device tensors the runner rewrites before each replay, the grid is sized by the bucket's token count,
        `cu_seqlens` (None: some request has a cached prefix) selects flash attention at capture time, and
        `last_keys` (each new token's last visible key) the bidirectional layers' span masks."""
        batch.attn_metadata = _ExtendMetadata(batch.req_pool_indices, batch.seq_lens, q_starts, extend_lens,
                                              batch.input_ids.shape[0],
                                              cu_seqlens if self.dense_prefill else None, last_keys)

    def forward_extend(self, q: torch.Tensor, layer: Attention, batch: ForwardBatch, k: torch.Tensor,
                       v: torch.Tensor) -> torch.Tensor:
        meta: _ExtendMetadata = batch.attn_metadata
        spans = meta.last_keys is not None and layer.attn_type is AttentionType.DECODER_BIDIRECTIONAL
        # Prompts with nothing cached are plain causal attention over the step's own keys and values, where torch's
        # flash kernel beat the extend kernel on the H100 (docs/benchmarks.md): its varlen form, called directly
        # (SDPA's dispatch costs ~60 us of CPU a layer), for half precision; SDPA for one prompt otherwise. Not so
        # where bidirectional spans bend the causal mask: those go to the kernel.
        if meta.cu_seqlens is not None and not spans and (layer.sliding_window is None
                                                          or layer.sliding_window >= meta.max_extend_len):
            out = flash_varlen(q, k, v, meta.cu_seqlens, meta.max_extend_len, layer.scaling)
            if out is not None:
                return out
            if batch.batch_size == 1:
                out = F.scaled_dot_product_attention(
                    q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
                    is_causal=True, scale=layer.scaling, enable_gqa=layer.num_heads != layer.num_kv_heads)
                return out.squeeze(0).transpose(0, 1)
        k_buf, v_buf = self.kv_pool.get_kv(layer.layer_id)
        return self.kernels.extend_attention(
            q, k_buf, v_buf, self.req_to_token, meta.req_pool_indices, meta.seq_lens, meta.q_starts,
            meta.extend_lens, meta.max_extend_len, layer.scaling, layer.sliding_window,
            blocks=self.extend_blocks, last_keys=meta.last_keys if spans else None,
        )

    def forward_encoder(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Attention,
                        batch: ForwardBatch) -> torch.Tensor:
        assert batch.mode == ForwardMode.EXTEND, "an encoder-only layer runs whole sequences, never decode steps"
        meta: _ExtendMetadata = batch.attn_metadata
        if meta.cu_seqlens is not None and (layer.sliding_window is None
                                            or layer.sliding_window >= meta.max_extend_len):
            out = flash_varlen(q, k, v, meta.cu_seqlens, meta.max_extend_len, layer.scaling, causal=False)
            if out is not None:
                return out
        return self.kernels.encoder_attention(q, k, v, meta.q_starts, meta.extend_lens, meta.max_extend_len,
                                              layer.scaling, layer.sliding_window, blocks=self.extend_blocks)

    def save_kv(self, k: torch.Tensor, v: torch.Tensor, layer: Attention, batch: ForwardBatch) -> None:
        k_buf, v_buf = self.kv_pool.get_kv(layer.layer_id)
        if k.dtype != k_buf.dtype or not self.kernels.store_kv(k, v, k_buf, v_buf, batch.out_cache_loc):
            super().save_kv(k, v, layer, batch)

    def forward_decode(self, q: torch.Tensor, layer: Attention, batch: ForwardBatch) -> torch.Tensor:
        meta: _DecodeMetadata = batch.attn_metadata
        k_buf, v_buf = self.kv_pool.get_kv(layer.layer_id)
        return self.kernels.decode_attention(
            q, k_buf, v_buf, self.req_to_token, meta.req_pool_indices, meta.seq_lens, layer.scaling,
            layer.sliding_window, meta.num_kv_splits, self.min_split_len, blocks=self.decode_blocks,
            scratch=self._scratch(meta, q, layer.num_heads, v_buf.shape[2]),
        )

    def _scratch(self, meta: _DecodeMetadata, q: torch.Tensor, heads: int,
                 v_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's split scratch for this shape, allocated by the first layer that needs it."""
        if (heads, v_dim) not in meta.scratch:
            meta.scratch[heads, v_dim] = self.kernels.decode_scratch(q.shape[0], heads, meta.num_kv_splits, v_dim,
                                                                     q.device)
        return meta.scratch[heads, v_dim]

    def forward_cross_decode(self, q: torch.Tensor, layer: Attention, batch: ForwardBatch, k_buf: torch.Tensor,
                             v_buf: torch.Tensor, table: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """The decode kernel over the slabs, with the table standing for req_to_token and `lens` for the KV
        lengths: no host work, so a decode graph captures it (its scratch is the self-attention layers')."""
        meta: _DecodeMetadata = batch.attn_metadata
        return self.kernels.decode_attention(
            q, k_buf, v_buf, table, meta.req_pool_indices, lens, layer.scaling, None, meta.num_kv_splits,
            self.min_split_len, blocks=self.decode_blocks, scratch=self._scratch(meta, q, layer.num_heads,
                                                                                 v_buf.shape[2]),
        )
