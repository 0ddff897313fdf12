"""The attention backend interface and the per-layer `Attention` module that models call.

A backend is chosen once at start. Per step, `init_forward_metadata` prepares whatever it needs for the
whole batch (index lists, masks, kernel arguments) so the per-layer call does no batch bookkeeping.

Each layer declares how it attends (`AttentionType`); the backend reads it per call, so one model may mix types.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum, auto

import torch
import torch.nn.functional as F
from torch import nn

from mmserve.cache.kv_pool import KVPool
from mmserve.forward_batch import ForwardBatch, ForwardMode


class AttentionType(Enum):
    """How a layer's queries see keys. A sliding window `w` bounds every type: a decoder's query at p sees no key at
    or before p - w (spans included); an encoder's window is symmetric."""

    DECODER = auto()  # causal over the paged KV cache (cached prefix and the step's tokens)
    # causal, except that tokens of the same bidirectional span (ForwardBatch.bidirectional_spans) see each other
    # both ways: Gemma 3's image tokens (transformers: OR(causal, same span), AND the window on sliding layers)
    DECODER_BIDIRECTIONAL = auto()
    # every token of a request's step sees every other one (within |p - q| < w with a window, as transformers'
    # bidirectional Gemma 3); no KV is written or read: encoders and embedding models
    ENCODER_ONLY = auto()
    # decoder queries over per-request encoder states (Llama 3.2 Vision's images), held outside the paged pool: the
    # model calls `AttentionBackend.forward_cross_decode` with them (its prefill steps attend with their own masks)
    CROSS = auto()


class Attention(nn.Module):
    """Self-attention of one layer (q, k, v already projected and rotated), over the paged KV cache unless the
    layer is encoder-only."""

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, layer_id: int,
                 scaling: float | None = None, sliding_window: int | None = None,
                 attn_type: AttentionType = AttentionType.DECODER, logit_cap: float | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.layer_id = layer_id
        self.scaling = scaling if scaling is not None else head_dim**-0.5
        self.sliding_window = sliding_window  # a query sees the last `sliding_window` positions, itself included
        self.attn_type = attn_type
        # scores pass through cap * tanh(score / cap) before the softmax (Gemma 2); only backends that say
        # `supports_logit_cap` run such a layer
        self.logit_cap = logit_cap
        self.backend: AttentionBackend | None = None  # bound by the model runner (`bind_attention`)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """q: [T, heads * head_dim], k/v: [T, kv_heads * head_dim] -> [T, heads * head_dim]."""
        if self.backend is None:
            raise RuntimeError(f"attention layer {self.layer_id} has no backend: bind_attention(model, backend) first")
        return self.backend.forward(q, k, v, self, batch)


def bind_attention(model: nn.Module, backend: AttentionBackend) -> None:
    """Point every attention layer of `model` at `backend`."""
    for module in model.modules():
        if isinstance(module, Attention):
            if module.logit_cap is not None and not backend.supports_logit_cap:
                raise ValueError(f"the model caps attention logits (attn_logit_softcapping), which the "
                                 f"{type(backend).__name__} does not: use --attention-backend torch")
            module.backend = backend


class AttentionBackend(ABC):
    # Whether a decode step can be captured in a CUDA graph (see runner/cuda_graph.py for what that asks): the
    # metadata built by `init_forward_metadata` over the graph runner's static buffers stays valid for every replay.
    supports_cuda_graph = False
    supports_logit_cap = False  # runs layers with Attention.logit_cap
    kv_pool: KVPool
    req_to_token: torch.Tensor

    def bind(self, kv_pool: KVPool, req_to_token: torch.Tensor) -> AttentionBackend:
        """Give the backend the KV pool and the request-to-token table it reads (once, when the runner builds
        them; tests bind their own)."""
        self.kv_pool, self.req_to_token = kv_pool, req_to_token
        return self

    @abstractmethod
    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        """Prepare per-step state shared by every layer; called once before the model forward."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Attention,
                batch: ForwardBatch) -> torch.Tensor:
        if layer.attn_type is AttentionType.CROSS:
            raise TypeError(f"attention layer {layer.layer_id} is cross-attention: call forward_cross_decode")
        tokens = q.shape[0]
        q = q.view(tokens, layer.num_heads, layer.head_dim)
        k = k.view(tokens, layer.num_kv_heads, layer.head_dim)
        v = v.view(tokens, layer.num_kv_heads, -1)
        if layer.attn_type is AttentionType.ENCODER_ONLY:
            return self.forward_encoder(q, k, v, layer, batch).reshape(tokens, -1)
        self.save_kv(k, v, layer, batch)
        if batch.mode == ForwardMode.DECODE:
            out = self.forward_decode(q, layer, batch)
        else:
            out = self.forward_extend(q, layer, batch, k, v)
        return out.reshape(tokens, -1)

    def save_kv(self, k: torch.Tensor, v: torch.Tensor, layer: Attention, batch: ForwardBatch) -> None:
        """Write the step's keys and values ([T, kv_heads, dim]) into their slots of the pool."""
        self.kv_pool.set_kv(layer.layer_id, batch.out_cache_loc, k, v)

    @abstractmethod
    def forward_extend(self, q: torch.Tensor, layer: Attention, batch: ForwardBatch, k: torch.Tensor,
                       v: torch.Tensor) -> torch.Tensor:
        """Attention of each request's new tokens over its cached prefix and themselves; q: [T, heads, dim]. k and
        v are the step's own keys and values (already saved to the pool), for a backend that can use them
        directly where nothing is cached."""

    @abstractmethod
    def forward_decode(self, q: torch.Tensor, layer: Attention, batch: ForwardBatch) -> torch.Tensor:
        """Attention of one new token per request over its whole KV; q: [B, heads, dim]."""

    def forward_encoder(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Attention,
                        batch: ForwardBatch) -> torch.Tensor:
        """Bidirectional attention within each request's tokens of the step (q [T, heads, dim], k/v [T, kv_heads,
        dim]), nothing read from or written to the pool. The reference: SDPA per request (a loop on the host);
        a GPU backend overrides it."""
        assert batch.mode == ForwardMode.EXTEND, "an encoder-only layer runs whole sequences, never decode steps"
        outs, start = [], 0
        for n in batch.extend_lens_cpu:
            outs.append(sdpa(q[start : start + n], k[start : start + n], v[start : start + n], layer,
                             encoder_window_mask(n, layer.sliding_window, q.device)))
            start += n
        return torch.cat(outs, dim=0)

    def forward_cross_decode(self, q: torch.Tensor, layer: Attention, batch: ForwardBatch, k_buf: torch.Tensor,
                             v_buf: torch.Tensor, table: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """Cross-attention of one new token per request (q [B, heads, dim]) over that request's encoder rows,
        which sit in slabs k_buf/v_buf [slots, kv_heads, dim] at `table[row, :lens[i]]` (row: the request's
        `req_pool_indices`; lens [B]). A request with no rows gets zeros. The reference: SDPA per request."""
        out = q.new_zeros(q.shape[0], layer.num_heads, v_buf.shape[-1])
        rows, counts = batch.req_pool_indices.tolist(), lens.tolist()
        for i, (row, n) in enumerate(zip(rows, counts, strict=True)):
            if n:
                slots = table[row, :n]
                out[i] = sdpa(q[i : i + 1], k_buf[slots], v_buf[slots], layer, None)[0]
        return out


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Attention, mask: torch.Tensor | None,
         causal: bool = False) -> torch.Tensor:
    """SDPA of one sequence in the flattened layout: q [n, heads, dim], k/v [m, kv_heads, dim] -> [n, heads, dim];
    `mask`: bool [n, m], True = attend."""
    out = attend(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
                 layer, mask, causal)
    return out.squeeze(0).transpose(0, 1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: Attention, mask: torch.Tensor | None,
           causal: bool = False) -> torch.Tensor:
    """SDPA in torch's layout (q [B, heads, n, dim], k/v [B, kv_heads, m, dim]); a layer with a logit cap spells
    the product out, since SDPA cannot bend scores before its softmax. `causal` aligns the last query with the
    last key."""
    gqa = layer.num_heads != layer.num_kv_heads
    if layer.logit_cap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=layer.scaling,
                                              enable_gqa=gqa)
    if gqa:
        k = k.repeat_interleave(layer.num_heads // layer.num_kv_heads, dim=1)
        v = v.repeat_interleave(layer.num_heads // layer.num_kv_heads, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * layer.scaling
    scores = torch.tanh(scores / layer.logit_cap) * layer.logit_cap
    n, m = q.shape[-2], k.shape[-2]
    if causal:
        mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # the softmax in float32, as transformers' eager attention takes it
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def encoder_window_mask(n: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """An encoder's window over n tokens: True where |p - q| < window (None: no window within the sequence)."""
    if window is None or window >= n:
        return None
    pos = torch.arange(n, device=device)
    return (pos[:, None] - pos[None, :]).abs() < window


def create_attention_backend(name: str, device: torch.device, logit_cap: bool = False) -> AttentionBackend:
    """`auto`: the Triton kernels on a CUDA device, the torch reference elsewhere and for a model whose layers cap
    their logits (`logit_cap`: Gemma 2), which the Triton kernels do not do yet."""
    if name == "auto":
        name = "triton" if torch.device(device).type == "cuda" and not logit_cap else "torch"
    if name == "torch":
        from mmserve.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        from mmserve.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(device)
    raise ValueError(f"unknown attention backend {name!r}; available: torch, triton, auto")
