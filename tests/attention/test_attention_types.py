"""Attention types a layer declares (`AttentionType`): the torch backend against a dense reference whose masks come
from transformers' own mask functions (Gemma 3's image blocks and bidirectional windows), and the Triton kernels
(interpreter, blocks of 16) against the torch backend: bidirectional spans with and without a cached prefix, with
sliding windows, over several requests and GQA; encoder-only layers; cross-attention's decode over a slab.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.masking_utils import (
    and_masks,
    blockwise_overlay,
    causal_mask_function,
    or_masks,
    sliding_window_overlay,
)
from transformers.models.gemma3.modeling_gemma3 import _bidirectional_window_overlay, get_block_sequence_ids_for_mask

from mmserve.attention.base import Attention, AttentionBackend, AttentionType
from mmserve.attention.torch_backend import TorchAttentionBackend
from mmserve.attention.triton_backend import TritonAttentionBackend
from mmserve.attention.triton_kernels import ExtendBlocks
from mmserve.cache.kv_pool import KVPool, ReqToTokenPool
from mmserve.forward_batch import ForwardBatch, ForwardMode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16 = torch.float32, torch.bfloat16
TOLERANCE = {F32: 2e-5, BF16: 3e-2}
BIDI, DECODER, ENCODER = AttentionType.DECODER_BIDIRECTIONAL, AttentionType.DECODER, AttentionType.ENCODER_ONLY

# (seq_len, extend_len) per request, and each request's spans in token indices: spans inside a fresh prompt, one
# crossing blocks of 16, touching spans (one block, as transformers groups a run of image tokens), a span in the
# cached prefix, one starting in the prefix and ending in the step (a radix-cache hit inside an image), a one-token
# span, a whole prompt as one span, and a request without any
LENS = [(40, 40), (50, 30), (30, 14), (17, 17), (9, 1), (33, 33)]
SPANS = [[(3, 9), (12, 31)], [(4, 12), (22, 38), (40, 41)], [(12, 25)], [(0, 17)], [], [(2, 6), (6, 20), (20, 21)]]


def small_triton(dense_prefill: bool = False) -> TritonAttentionBackend:
    return TritonAttentionBackend(DEVICE, extend_blocks=ExtendBlocks(16, 16, 4, 1), dense_prefill=dense_prefill)


class Setup:
    """A random KV pool holding each request's cached prefix in scattered slots, and the step's q, k, v (strided
    views of one qkv projection, as the models pass them)."""

    def __init__(self, lens: list[tuple[int, int]], heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.lens, self.heads, self.kv_heads, self.head_dim, self.dtype = lens, heads, kv_heads, head_dim, dtype
        total = sum(s for s, _ in lens)
        self.pool = KVPool(total + 8, 1, kv_heads, head_dim, dtype, DEVICE)
        for buf in (self.pool.k_buffers[0], self.pool.v_buffers[0]):
            buf.copy_(torch.randn(buf.shape, generator=g).to(dtype))
        self.table = ReqToTokenPool(2 * len(lens) + 1, max(s for s, _ in lens) + 3, DEVICE)
        slots = (torch.randperm(total + 8, generator=g)[:total] + 1).to(DEVICE)
        self.rows = [2 * i + 1 for i in range(len(lens))]
        out_loc, offset = [], 0
        for row, (seq_len, extend_len) in zip(self.rows, lens, strict=True):
            self.table.req_to_token[row, :seq_len] = slots[offset : offset + seq_len]
            out_loc.append(slots[offset + seq_len - extend_len : offset + seq_len])
            offset += seq_len
        self.out_loc = torch.cat(out_loc)
        self.tokens = sum(e for _, e in lens)
        qkv = torch.randn(self.tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype).to(DEVICE)
        self.q, self.k, self.v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)

    def batch(self, spans: list[list[tuple[int, int]]] | None) -> ForwardBatch:
        return ForwardBatch(
            mode=ForwardMode.EXTEND, input_ids=torch.zeros(self.tokens, dtype=torch.int64, device=DEVICE),
            positions=torch.zeros(self.tokens, dtype=torch.int64, device=DEVICE), out_cache_loc=self.out_loc,
            req_pool_indices=torch.tensor(self.rows, device=DEVICE),
            seq_lens=torch.tensor([s for s, _ in self.lens], device=DEVICE), seq_lens_cpu=[s for s, _ in self.lens],
            extend_lens_cpu=[e for _, e in self.lens], logits_indices=None, bidirectional_spans=spans,
        )

    def layer(self, attn_type: AttentionType, window: int | None) -> Attention:
        return Attention(self.heads, self.head_dim, self.kv_heads, 0, sliding_window=window, attn_type=attn_type)

    def run(self, backend: AttentionBackend, attn_type: AttentionType, window: int | None,
            spans: list[list[tuple[int, int]]] | None) -> torch.Tensor:
        batch = self.batch(spans)
        backend.bind(self.pool, self.table.req_to_token).init_forward_metadata(batch)
        return backend.forward(self.q, self.k, self.v, self.layer(attn_type, window), batch).float()

    def reference(self, attn_type: AttentionType, window: int | None,
                  spans: list[list[tuple[int, int]]] | None) -> torch.Tensor:
        """Dense float64 attention per request with transformers' masks: Gemma 3's OR(causal, same image block),
        AND the window on sliding layers; its bidirectional text model (full, or |p - q| < window) for encoders.
        Keys are the cached prefix from the pool and the step's own keys, read here, not through a backend."""
        k_buf, v_buf = self.pool.k_buffers[0], self.pool.v_buffers[0]
        group, outs, start, zero = self.heads // self.kv_heads, [], 0, torch.tensor(0)
        for i, (seq_len, n) in enumerate(self.lens):
            prefix = 0 if attn_type is ENCODER else seq_len - n
            slots = self.table.req_to_token[self.rows[i], : seq_len - n]
            k = torch.cat([k_buf[slots].flatten(1), self.k[start : start + n]])[-(prefix + n) :]
            v = torch.cat([v_buf[slots].flatten(1), self.v[start : start + n]])[-(prefix + n) :]
            q_idx, kv_idx = torch.arange(prefix, prefix + n)[:, None], torch.arange(prefix + n)[None, :]
            if attn_type is ENCODER:
                mask_fn = (lambda *_: torch.tensor(True)) if window is None else or_masks(
                    and_masks(causal_mask_function, sliding_window_overlay(window)),
                    _bidirectional_window_overlay(window))
            else:
                mask_fn = causal_mask_function
                if attn_type is BIDI and spans is not None:
                    image = torch.zeros(1, seq_len, dtype=torch.int64)
                    for a, b in spans[i]:
                        image[0, a:b] = 1
                    mask_fn = or_masks(mask_fn, blockwise_overlay(get_block_sequence_ids_for_mask(image)))
                if window is not None:
                    mask_fn = and_masks(mask_fn, sliding_window_overlay(window))
            allowed = mask_fn(zero, zero, q_idx, kv_idx).expand(n, prefix + n)
            q = self.q[start : start + n].double().view(n, self.heads, self.head_dim)
            k = k.double().view(-1, self.kv_heads, self.head_dim).repeat_interleave(group, dim=1)
            v = v.double().view(-1, self.kv_heads, self.head_dim).repeat_interleave(group, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q, k) * self.head_dim**-0.5
            weights = scores.masked_fill(~allowed.to(scores.device), float("-inf")).softmax(-1)
            outs.append(torch.einsum("hqk,khd->qhd", weights, v).flatten(1))
            start += n
        return torch.cat(outs).float()


# (heads, kv_heads, head_dim, window, dtype): GQA 1, 2, 3; windows shorter and longer than the spans
CASES = [(4, 4, 32, None, F32), (4, 2, 32, 7, F32), (6, 2, 64, 20, F32), (4, 1, 64, None, BF16)]
IDS = [f"h{h}kv{kv}d{d}-w{w}-{str(t).removeprefix('torch.')}" for h, kv, d, w, t in CASES]


@pytest.mark.parametrize("heads,kv_heads,head_dim,window,dtype", CASES, ids=IDS)
def test_torch_backend_matches_transformers_masks(heads, kv_heads, head_dim, window, dtype):
    s = Setup(LENS, heads, kv_heads, head_dim, dtype)
    tol = TOLERANCE[dtype]
    for attn_type, spans in ((BIDI, SPANS), (BIDI, None), (DECODER, SPANS), (ENCODER, None)):
        expected = s.reference(attn_type, window, spans)
        got = s.run(TorchAttentionBackend(), attn_type, window, spans)
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol, msg=lambda m, t=attn_type: f"{t}: {m}")
    # the spans change the bidirectional layer's output, and only there
    assert not torch.allclose(s.reference(BIDI, window, SPANS), s.reference(DECODER, window, SPANS))


@pytest.mark.parametrize("heads,kv_heads,head_dim,window,dtype", CASES, ids=IDS)
def test_triton_matches_torch(heads, kv_heads, head_dim, window, dtype):
    s = Setup(LENS, heads, kv_heads, head_dim, dtype, seed=1)
    tol = TOLERANCE[dtype]
    for attn_type, spans in ((BIDI, SPANS), (DECODER, SPANS), (ENCODER, None)):
        expected = s.run(TorchAttentionBackend(), attn_type, window, spans)
        got = s.run(small_triton(), attn_type, window, spans)
        assert not got.isnan().any()
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol, msg=lambda m, t=attn_type: f"{t}: {m}")


def test_fresh_prompts_with_spans_skip_the_dense_shortcut():
    """With nothing cached the Triton backend hands prompts to torch's causal kernels (flash, or SDPA for one
    prompt); a bidirectional layer with spans in the step must reach the extend kernel instead, a plain decoder
    layer of the same step may not."""
    s = Setup([(37, 37)], 4, 2, 32, F32, seed=2)
    spans = [[(5, 30)]]
    for attn_type in (BIDI, DECODER):
        torch.testing.assert_close(s.run(small_triton(dense_prefill=True), attn_type, None, spans),
                                   s.reference(attn_type, None, spans), atol=2e-5, rtol=2e-5)


def test_encoder_only_reads_and_writes_no_kv():
    """An encoder-only layer attends within each request's tokens of the step, ignores any cached prefix, and
    leaves the pool as it was (both backends; on the GPU the Triton one takes torch's flash kernel in half
    precision, here its kernel)."""
    s = Setup([(20, 20), (30, 12), (1, 1)], 4, 2, 32, F32, seed=3)
    before = s.pool.k_buffers[0].clone(), s.pool.v_buffers[0].clone()
    for backend in (TorchAttentionBackend(), small_triton(), small_triton(dense_prefill=True)):
        for window in (None, 4):
            torch.testing.assert_close(s.run(backend, ENCODER, window, None), s.reference(ENCODER, window, None),
                                       atol=2e-5, rtol=2e-5)
    assert torch.equal(s.pool.k_buffers[0], before[0]) and torch.equal(s.pool.v_buffers[0], before[1])


def test_cross_attention_decode_reads_each_requests_rows():
    """One new token per request over that request's encoder rows, scattered in a slab and found through a table
    row (Llama 3.2 Vision's images): both backends against dense float64 SDPA; a request with no rows (and a
    padding row of a graph bucket) gets zeros; GQA, lengths crossing the Triton blocks and split boundaries."""
    g = torch.Generator().manual_seed(5)
    heads, kv_heads, head_dim, slab_rows = 4, 2, 32, 300
    k_buf, v_buf = (torch.randn(slab_rows, kv_heads, head_dim, generator=g).to(DEVICE) for _ in range(2))
    lens = [37, 0, 130, 1, 64]
    rows = [3, 0, 5, 1, 2]
    table = torch.zeros(6, 160, dtype=torch.int64, device=DEVICE)
    for row, n in zip(rows, lens, strict=True):
        table[row, :n] = torch.randperm(slab_rows, generator=g)[:n].to(DEVICE)
    q = torch.randn(len(lens), heads, head_dim, generator=g).to(DEVICE)
    batch = ForwardBatch(mode=ForwardMode.DECODE, input_ids=torch.zeros(len(lens), dtype=torch.int64, device=DEVICE),
                         positions=torch.zeros(len(lens), dtype=torch.int64, device=DEVICE),
                         out_cache_loc=torch.zeros(len(lens), dtype=torch.int64, device=DEVICE),
                         req_pool_indices=torch.tensor(rows, device=DEVICE),
                         seq_lens=torch.full((len(lens),), 9, device=DEVICE), seq_lens_cpu=[9] * len(lens),
                         extend_lens_cpu=[1] * len(lens), logits_indices=None)
    layer = Attention(heads, head_dim, kv_heads, 0, attn_type=AttentionType.CROSS)
    lens_t = torch.tensor(lens, device=DEVICE)
    expected = torch.zeros(len(lens), heads, head_dim, dtype=torch.float64)
    for i, (row, n) in enumerate(zip(rows, lens, strict=True)):
        if n:
            slots = table[row, :n]
            k = k_buf[slots].double().repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)
            v = v_buf[slots].double().repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)
            expected[i] = F.scaled_dot_product_attention(q[i].double()[:, None], k, v)[:, 0].cpu()
    pool = KVPool(16, 1, kv_heads, head_dim, F32, DEVICE)
    for backend in (TorchAttentionBackend(), TritonAttentionBackend(DEVICE, min_split_len=16)):
        backend.bind(pool, ReqToTokenPool(6, 16, DEVICE).req_to_token).init_forward_metadata(batch)
        out = backend.forward_cross_decode(q, layer, batch, k_buf, v_buf, table, lens_t)
        torch.testing.assert_close(out.double().cpu(), expected, atol=2e-5, rtol=2e-5)
        with pytest.raises(TypeError, match="forward_cross_decode"):
            backend.forward(q.flatten(1), q.flatten(1), q.flatten(1), layer, batch)


def test_span_last_keys():
    """The per-token table the backends build once per step: a query's own position, or its span's last token;
    spans outside the step's queries change nothing, touching ones merge, a span the step's end cuts is refused."""
    batch = Setup([(12, 8), (6, 6)], 4, 4, 32, F32).batch([[(0, 5), (6, 8), (8, 10)], [(10, 12)]])
    assert batch.span_last_keys() == [4, 5, 9, 9, 9, 9, 10, 11, 0, 1, 2, 3, 4, 5]
    assert Setup([(6, 6)], 4, 4, 32, F32).batch([[(6, 9)]]).span_last_keys() is None  # a later chunk's span
    assert Setup([(6, 6)], 4, 4, 32, F32).batch(None).span_last_keys() is None
    with pytest.raises(AssertionError, match="cut by the step's end"):
        Setup([(6, 6)], 4, 4, 32, F32).batch([[(4, 9)]]).span_last_keys()


def test_layers_default_to_causal_decoders():
    assert Attention(4, 32, 2, 0).attn_type is AttentionType.DECODER
