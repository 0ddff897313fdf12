"""Triton kernels for attention over the paged KV cache (page size 1): split-KV decode and batched extend.

Both read K and V straight from the pool through the request-to-token table (no gathered copy) and accumulate
in float32 with an online softmax in base 2 (the scale is pre-multiplied by log2(e)).

Decode is flash-decoding: `_decode_split_kernel` runs one program per (request, KV head [, block of its query
heads], KV split); the query heads that share a KV head form the rows of one `tl.dot`, so each K/V block is read
once for the whole group. Each split writes its normalised partial output and log-sum-exp; `_decode_reduce_kernel`
merges the splits. How many splits a request uses is decided in the kernel from its length (at most `max_splits`,
each at least `min_split_len` tokens), so the grid depends only on the batch size.

Extend runs one program per (query head, request, block of new tokens) over the request's cached prefix and its
new tokens, with the causal mask and the sliding window; programs whose block lies past their request's extend
length exit at once, so the grid is sized by the longest extend of the step. Two compile-time variants of it:
bidirectional spans (`SPANS`: each query's last visible key comes from a per-token table, the end of its span or
itself) and encoder-only (`ENCODER`: no pool, the step's own K and V per request, every token of the sequence
visible, a window symmetric).

A sliding window `w` lets a query at position p see keys at positions > p - w; no window is passed as a window
longer than any sequence (`NO_WINDOW`), so the kernels have no branch for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

NO_WINDOW = 1 << 30
_LOG2E = 1.4426950408889634


@triton.jit
def _decode_num_splits(seq_len, window, max_splits, min_split):
    """First visible position and number of splits of a decode query (shared by both decode kernels)."""
    start = tl.maximum(seq_len - window, 0)
    visible = seq_len - start  # >= 1 (the query sees itself) but on padding rows of length 0
    n_splits = tl.minimum(tl.cdiv(visible, min_split), max_splits)
    return start, visible, n_splits


@triton.jit
def _decode_split_kernel(
    Q, K, V, ReqToToken, ReqPoolIdx, SeqLens, MidO, MidLse,
    scale_log2, window, max_splits, min_split,
    stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_req,
    stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
    GROUP: tl.constexpr, HEAD_BLOCKS: tl.constexpr, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1) // HEAD_BLOCKS
    head_block = tl.program_id(1) % HEAD_BLOCKS
    split = tl.program_id(2)

    seq_len = tl.load(SeqLens + b).to(tl.int32)  # positions in int32: cheaper masks and fewer registers
    start, visible, n_splits = _decode_num_splits(seq_len, window, max_splits, min_split)
    if split < n_splits:  # the reduction reads only the first n_splits splits
        # whole blocks per split; a trailing split may come out empty (it then stores lse = -inf, weight 0)
        split_len = tl.cdiv(tl.cdiv(visible, n_splits), BLOCK_N) * BLOCK_N
        lo = start + split * split_len
        hi = tl.minimum(lo + split_len, seq_len)
        row = tl.load(ReqPoolIdx + b)

        in_group = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
        head_mask = in_group < GROUP
        heads = kv_head * GROUP + in_group
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        d_mask = offs_d < HEAD_DIM
        dv_mask = offs_dv < V_DIM
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=head_mask[:, None] & d_mask[None, :], other=0.0).to(DOT_DTYPE)

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            pos_mask = pos < hi
            slots = tl.load(ReqToToken + row * stride_req + pos, mask=pos_mask, other=0).to(tl.int64)
            k = tl.load(K + slots[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                        mask=pos_mask[:, None] & d_mask[None, :], other=0.0)
            qk = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * scale_log2
            qk = tl.where(pos_mask[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: every block of the loop holds a visible key
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + slots[:, None] * stride_vt + kv_head * stride_vh + offs_dv[None, :],
                        mask=pos_mask[:, None] & dv_mask[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
            m_i = m_new

        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        tl.store(MidO + b * stride_mb + heads[:, None] * stride_mh + split * stride_ms + offs_dv[None, :],
                 acc / l_safe[:, None], mask=head_mask[:, None] & dv_mask[None, :])
        tl.store(MidLse + b * stride_lb + heads * stride_lh + split,
                 tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe)), mask=head_mask)


@triton.jit
def _decode_reduce_kernel(
    MidO, MidLse, Out, SeqLens, window, max_splits, min_split,
    stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_ob, stride_oh,
    V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(SeqLens + b).to(tl.int32)
    _, _, n_splits = _decode_num_splits(seq_len, window, max_splits, min_split)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_mask = offs_s < n_splits
    dv_mask = offs_dv < V_DIM
    lse = tl.load(MidLse + b * stride_lb + h * stride_lh + offs_s, mask=s_mask, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    # unused splits weigh exp2(-inf) = 0; a row of length 0 (CUDA-graph padding) has no split at all and gets zeros
    weights = tl.math.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))
    part = tl.load(MidO + b * stride_mb + h * stride_mh + offs_s[:, None] * stride_ms + offs_dv[None, :],
                   mask=s_mask[:, None] & dv_mask[None, :], other=0.0)
    total = tl.sum(weights, 0)
    out = tl.sum(part * weights[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_dv, out.to(Out.dtype.element_ty), mask=dv_mask)


@triton.jit
def _extend_kernel(
    Q, K, V, Out, ReqToToken, ReqPoolIdx, SeqLens, QStarts, ExtendLens, LastKeys,
    scale_log2, window,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_req,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SPANS: tl.constexpr, ENCODER: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # heads vary fastest, so the query heads sharing a KV head run side by side and find its blocks in L2; the
    # last query blocks (the longest causal rows) start first, so the grid's tail is short
    h = tl.program_id(0)
    b = tl.program_id(1)
    m0 = (tl.num_programs(2) - 1 - tl.program_id(2)) * BLOCK_M
    extend_len = tl.load(ExtendLens + b)
    if m0 < extend_len:
        if ENCODER:  # the step's own tokens are the whole sequence; K and V are the step's, row per token
            seq_len = extend_len
        else:
            seq_len = tl.load(SeqLens + b).to(tl.int32)  # positions in int32: cheaper masks and fewer registers
            row = tl.load(ReqPoolIdx + b)
        prefix_len = seq_len - extend_len
        q_start = tl.load(QStarts + b)
        kv_head = h // GROUP

        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < extend_len
        q_pos = prefix_len + offs_m
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        d_mask = offs_d < HEAD_DIM
        dv_mask = offs_dv < V_DIM
        tokens = (q_start + offs_m).to(tl.int64)
        q = tl.load(Q + tokens[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0).to(DOT_DTYPE)

        # the last key each query sees: itself (causal), its span's last token, or (encoder) the window's far end
        if ENCODER:
            last = q_pos + window - 1
        elif SPANS:
            last = tl.load(LastKeys + tokens, mask=m_mask, other=0)
        else:
            last = q_pos
        # keys from the first one the block's first query can see to the last one any of its queries sees
        lo = tl.maximum(prefix_len + m0 - window + 1, 0)
        if SPANS:
            hi = tl.minimum(tl.max(last, 0) + 1, seq_len)
        elif ENCODER:
            hi = tl.minimum(m0 + BLOCK_M - 1 + window, seq_len)
        else:
            hi = tl.minimum(prefix_len + m0 + BLOCK_M, seq_len)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            k_pos = n0 + tl.arange(0, BLOCK_N)
            k_mask = k_pos < hi
            if ENCODER:
                slots = (q_start + k_pos).to(tl.int64)
            else:
                slots = tl.load(ReqToToken + row * stride_req + k_pos, mask=k_mask, other=0).to(tl.int64)
            k = tl.load(K + slots[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                        mask=k_mask[:, None] & d_mask[None, :], other=0.0)
            qk = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * scale_log2
            allowed = (k_mask[None, :] & (k_pos[None, :] <= last[:, None])
                       & (k_pos[None, :] > q_pos[:, None] - window))
            qk = tl.where(allowed, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # a row may see nothing in this block yet (window, padding): keep its exponents at exp2(-inf) = 0
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_ref)
            p = tl.math.exp2(qk - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + slots[:, None] * stride_vt + kv_head * stride_vh + offs_dv[None, :],
                        mask=k_mask[:, None] & dv_mask[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
            m_i = m_new

        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # l_i is 0 only on padding rows, never stored
        tl.store(Out + tokens[:, None] * stride_ot + h * stride_oh + offs_dv[None, :], out.to(Out.dtype.element_ty),
                 mask=m_mask[:, None] & dv_mask[None, :])


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _store_kv_kernel(K, V, KBuf, VBuf, Loc, stride_kt, stride_vt, stride_kbt, stride_vbt,
                     K_WIDTH: tl.constexpr, V_WIDTH: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """One token's K and V rows (all KV heads) into its slot of the pool: one launch for both, where indexed
    assignment takes one per tensor."""
    t = tl.program_id(0)
    slot = tl.load(Loc + t)
    offs = tl.arange(0, BLOCK_K)
    k = tl.load(K + t * stride_kt + offs, mask=offs < K_WIDTH)
    tl.store(KBuf + slot * stride_kbt + offs, k.to(KBuf.dtype.element_ty), mask=offs < K_WIDTH)
    offs = tl.arange(0, BLOCK_V)
    v = tl.load(V + t * stride_vt + offs, mask=offs < V_WIDTH)
    tl.store(VBuf + slot * stride_vbt + offs, v.to(VBuf.dtype.element_ty), mask=offs < V_WIDTH)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, loc: torch.Tensor) -> bool:
    """`k_buf[loc] = k; v_buf[loc] = v` for k, v [T, kv_heads, dim] whose rows are contiguous (views of the qkv
    projection are); False, with nothing written, for layouts it does not take."""
    tokens = k.shape[0]
    if tokens == 0:
        return True
    if not (k.stride(2) == 1 and k.stride(1) == k.shape[2] and v.stride(2) == 1 and v.stride(1) == v.shape[2]
            and k_buf.is_contiguous() and v_buf.is_contiguous() and loc.is_contiguous()):
        return False
    k_width, v_width = k.shape[1] * k.shape[2], v.shape[1] * v.shape[2]
    _store_kv_kernel[(tokens,)](
        k, v, k_buf, v_buf, loc, k.stride(0), v.stride(0), k_buf.stride(0), v_buf.stride(0),
        K_WIDTH=k_width, V_WIDTH=v_width, BLOCK_K=triton.next_power_of_2(k_width),
        BLOCK_V=triton.next_power_of_2(v_width), num_warps=4 if max(k_width, v_width) >= 1024 else 2,
    )
    return True


def interpreting() -> bool:
    """Whether these kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 when this module was imported)."""
    return isinstance(_extend_kernel, InterpretedFunction)


def _dot_args(dtype: torch.dtype) -> dict:
    """The operand type and precision of the kernels' matmuls for inputs of `dtype`."""
    if dtype not in _TL_DTYPES:
        raise ValueError(f"the triton attention kernels take float32, bfloat16 or float16, got {dtype}")
    dot_dtype = _TL_DTYPES[dtype]
    if dtype == torch.bfloat16 and interpreting():
        dot_dtype = tl.float32  # the interpreter keeps bfloat16 as raw uint16 and would multiply the bits
    # float32 inputs would otherwise go through TF32 tensor cores (10-bit mantissa) on the GPU
    return {"DOT_DTYPE": dot_dtype, "DOT_PRECISION": "ieee" if dot_dtype == tl.float32 else "tf32"}


@dataclass(frozen=True)
class DecodeBlocks:
    block_n: int  # keys per loop step
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class ExtendBlocks:
    block_m: int  # new tokens per program
    block_n: int  # keys per loop step
    num_warps: int
    num_stages: int


def default_decode_blocks(dtype: torch.dtype, block_d: int) -> DecodeBlocks:
    # Half precision: four pipeline stages, from `scripts/triton_check.py --sweep-decode` on the H100 (1.13-1.26x
    # over two stages from batch 32 to 256, docs/benchmarks.md); block sizes from sm_90 register and shared-memory
    # counts. float32 needs smaller tiles: its "ieee" dots run on the FMA units.
    if dtype == torch.float32:
        return DecodeBlocks(16, 8, 1)
    return DecodeBlocks(64 if block_d <= 128 else 32, 4, 4)


def default_extend_blocks(dtype: torch.dtype, block_d: int) -> ExtendBlocks:
    if dtype == torch.float32:
        return ExtendBlocks(32, 32 if block_d <= 128 else 16, 8, 1)
    if block_d <= 128:
        return ExtendBlocks(64, 64, 4, 2)
    return ExtendBlocks(64, 32, 8, 2)


def _check_shapes(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, req_to_token: torch.Tensor) -> None:
    assert q.shape[1] % k_buf.shape[1] == 0, f"{q.shape[1]} query heads cannot share {k_buf.shape[1]} KV heads"
    assert q.shape[2] == k_buf.shape[2], f"query head dim {q.shape[2]} != key head dim {k_buf.shape[2]}"
    assert k_buf.stride(-1) == 1 and v_buf.stride(-1) == 1 and req_to_token.stride(-1) == 1


def decode_scratch(batch: int, heads: int, max_splits: int, v_dim: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 partial outputs [B, heads, splits, v_dim] and log-sum-exps [B, heads, splits] of the decode splits."""
    return (torch.empty((batch, heads, max_splits, v_dim), dtype=torch.float32, device=device),
            torch.empty((batch, heads, max_splits), dtype=torch.float32, device=device))


def decode_attention(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, scaling: float, window: int | None,
    max_splits: int, min_split_len: int, blocks: DecodeBlocks | None = None,
    scratch: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """q: [B, heads, head_dim]; k_buf/v_buf: [slots, kv_heads, dim] -> [B, heads, v_dim] in q's dtype.

    `max_splits` fixes the grid and the partial results (`scratch`, from `decode_scratch`, reusable across the
    layers of a step); a request uses min(max_splits, ceil(visible keys / min_split_len)) of them. A request of
    length 0 (padding) gets zeros.
    """
    if q.stride(-1) != 1:
        q = q.contiguous()
    _check_shapes(q, k_buf, v_buf, req_to_token)
    batch, heads, head_dim = q.shape
    kv_heads, v_dim = k_buf.shape[1], v_buf.shape[2]
    group = heads // kv_heads
    block_h = min(64, max(16, triton.next_power_of_2(group)))  # tl.dot needs at least 16 rows
    head_blocks = triton.cdiv(group, block_h)
    # tl.dot needs an inner size of 16 at least: tiny heads are padded (the loads mask the columns past the head)
    block_d, block_dv = max(16, triton.next_power_of_2(head_dim)), max(16, triton.next_power_of_2(v_dim))
    blocks = blocks or default_decode_blocks(q.dtype, max(block_d, block_dv))
    mid_o, mid_lse = scratch or decode_scratch(batch, heads, max_splits, v_dim, q.device)
    assert mid_o.shape == (batch, heads, max_splits, v_dim) and mid_lse.shape == (batch, heads, max_splits)
    out = torch.empty((batch, heads, v_dim), dtype=q.dtype, device=q.device)
    window = NO_WINDOW if window is None else window
    _decode_split_kernel[(batch, kv_heads * head_blocks, max_splits)](
        q, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, mid_o, mid_lse,
        scaling * _LOG2E, window, max_splits, min_split_len,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        req_to_token.stride(0), mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0),
        mid_lse.stride(1),
        GROUP=group, HEAD_BLOCKS=head_blocks, HEAD_DIM=head_dim, V_DIM=v_dim, BLOCK_H=block_h, BLOCK_D=block_d,
        BLOCK_DV=block_dv, BLOCK_N=blocks.block_n, **_dot_args(q.dtype),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    _decode_reduce_kernel[(batch, heads)](
        mid_o, mid_lse, out, seq_lens, window, max_splits, min_split_len,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        V_DIM=v_dim, BLOCK_DV=block_dv, BLOCK_S=triton.next_power_of_2(max_splits),
        num_warps=4 if block_dv >= 256 else 2,
    )
    return out


def extend_attention(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, q_starts: torch.Tensor, extend_lens: torch.Tensor,
    max_extend_len: int, scaling: float, window: int | None, blocks: ExtendBlocks | None = None,
    last_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [T, heads, head_dim] (request i's new tokens at q_starts[i] .. + extend_lens[i]) -> [T, heads, v_dim].

    Causal over the request's KV in the pool, or with `last_keys` ([T] int32, the last key position each new token
    sees: the end of its bidirectional span, else itself) causal but for the spans; the window bounds both."""
    _check_shapes(q, k_buf, v_buf, req_to_token)
    return _launch_extend(q, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, q_starts, extend_lens,
                          max_extend_len, scaling, window, blocks, last_keys, encoder=False)


def encoder_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_starts: torch.Tensor, extend_lens: torch.Tensor,
    max_extend_len: int, scaling: float, window: int | None, blocks: ExtendBlocks | None = None,
) -> torch.Tensor:
    """Bidirectional attention within each packed sequence (rows q_starts[i] .. + extend_lens[i] of q [T, heads,
    head_dim] and of k, v [T, kv_heads, dim], read in place) -> [T, heads, v_dim]; a window sees |p - q| < window."""
    _check_shapes(q, k, v, q_starts)
    return _launch_extend(q, k, v, q_starts, q_starts, extend_lens, q_starts, extend_lens, max_extend_len, scaling,
                          window, blocks, None, encoder=True)


def _launch_extend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor, q_starts: torch.Tensor, extend_lens: torch.Tensor, max_extend_len: int, scaling: float,
    window: int | None, blocks: ExtendBlocks | None, last_keys: torch.Tensor | None, encoder: bool,
) -> torch.Tensor:
    if q.stride(-1) != 1:
        q = q.contiguous()
    tokens, heads, head_dim = q.shape
    kv_heads, v_dim = k.shape[1], v.shape[2]
    # tl.dot needs an inner size of 16 at least: tiny heads are padded (the loads mask the columns past the head)
    block_d, block_dv = max(16, triton.next_power_of_2(head_dim)), max(16, triton.next_power_of_2(v_dim))
    blocks = blocks or default_extend_blocks(q.dtype, max(block_d, block_dv))
    out = torch.empty((tokens, heads, v_dim), dtype=q.dtype, device=q.device)
    batch = q_starts.shape[0]
    _extend_kernel[(heads, batch, triton.cdiv(max_extend_len, blocks.block_m))](
        q, k, v, out, req_to_token, req_pool_indices, seq_lens, q_starts, extend_lens,
        q_starts if last_keys is None else last_keys,  # never read without spans
        scaling * _LOG2E, NO_WINDOW if window is None else window,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), req_to_token.stride(0),
        GROUP=heads // kv_heads, HEAD_DIM=head_dim, V_DIM=v_dim, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
        BLOCK_D=block_d, BLOCK_DV=block_dv, SPANS=last_keys is not None, ENCODER=encoder, **_dot_args(q.dtype),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    return out
