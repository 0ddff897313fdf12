"""Fused Triton kernels for the elementwise work of a decoder layer and their launch code: RMSNorm (with the
residual add), the gated activation of the MLP, and rotary embeddings (1-D and M-RoPE positions), each one launch
instead of a chain of eager ops with their intermediate tensors. The layers reach them through `fused_ops`.

A decode step is mostly such small launches, replayed from a CUDA graph, so the kernels read everything from
device tensors (positions, the rotary tables, M-RoPE's band -> position-row table), never sync with the host, and
size their grids from shapes alone.

The kernels reproduce the eager layers' rounding, not only their math: the eager code (like transformers) rounds
to the activation dtype after each op (`x + residual`, the normalised row, `silu(gate)`, each rotary product), and
so do the kernels, with `_round`, on float32 registers. bfloat16 results then match the eager ones bit for bit,
up to the last float32 place of exp and rsqrt and the order of the RMS sum (rarely a unit or two). One deliberate
difference: tanh-GELU is computed as x * sigmoid(2z), which equals 0.5 * x * (1 + tanh(z)) but does not lose digits
to cancellation for x below about -3, where eager's results are tiny and mostly rounding noise.

Triton reads TRITON_INTERPRET (run the kernels on CPU tensors, for tests) when this module is imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Widest row block of the RMSNorm kernel; longer rows are normalised in chunks of this size.
RMS_MAX_BLOCK = 8192
_RMS_ROW_ELEMS = 2048  # short rows (per-head q/k norms) are batched into programs of about this many elements
_ACT_BLOCK = 1024
_ROTARY_ELEMS = 1024  # (heads x half head dim) per rotary program

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """float32 `x` rounded (to nearest even) to DTYPE and kept in float32: the rounding an eager op in DTYPE does.

    bfloat16 is rounded with integer ops rather than a cast: the interpreter's float32 -> bfloat16 cast truncates,
    and this way CPU tests and the GPU round alike (a few integer ops; these kernels are memory-bound)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        # a NaN's payload can carry into the sign bit (the GPU's NaN, 0x7FFFFFFF, would come out -0): keep NaNs
        y = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    elif DTYPE == tl.float32:
        y = x
    else:
        y = x.to(DTYPE).to(tl.float32)
    return y


@triton.jit
def _rms_load(X, R, x_off, r_off, mask, HAS_RESIDUAL: tl.constexpr, SUM_DTYPE: tl.constexpr):
    """x (+ residual, rounded to SUM_DTYPE as the eager add is) in float32."""
    s = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s = _round(s + tl.load(R + r_off, mask=mask, other=0.0).to(tl.float32), SUM_DTYPE)
    return s


@triton.jit
def _rms_norm_kernel(
    X, R, W, Out, SumOut, n_rows, inner, hidden, eps,
    stride_xa, stride_xb, stride_xh, stride_ra, stride_rb, stride_rh,
    HAS_RESIDUAL: tl.constexpr, SUM_DTYPE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
    CHUNKS: tl.constexpr,
):
    # Rows are the flattened [outer, inner] leading dims, each with its own stride, so per-head norms of q and k
    # read the strided views of the qkv projection in place. Out and SumOut are contiguous.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    x_rows = (rows // inner) * stride_xa + (rows % inner) * stride_xb
    r_rows = (rows // inner) * stride_ra + (rows % inner) * stride_rb
    out_rows = rows * hidden
    cols = tl.arange(0, BLOCK)
    out_ty = Out.dtype.element_ty
    if CHUNKS == 1:  # the row stays in registers between the sum of squares and the scaling
        col_mask = cols < hidden
        mask = row_mask[:, None] & col_mask[None, :]
        s = _rms_load(X, R, x_rows[:, None] + cols[None, :] * stride_xh, r_rows[:, None] + cols[None, :] * stride_rh,
                      mask, HAS_RESIDUAL, SUM_DTYPE)
        if HAS_RESIDUAL:
            tl.store(SumOut + out_rows[:, None] + cols[None, :], s, mask=mask)
        rstd = tl.rsqrt(tl.sum(s * s, axis=1) / hidden + eps)
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = _round(_round(s * rstd[:, None], SUM_DTYPE) * w[None, :], out_ty)
        tl.store(Out + out_rows[:, None] + cols[None, :], y, mask=mask)
    else:  # a long row (ROWS == 1): a pass for the sum of squares, then one that re-reads the inputs and scales
        acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for c in range(CHUNKS):
            cc = c * BLOCK + cols
            mask = row_mask[:, None] & (cc < hidden)[None, :]
            s = _rms_load(X, R, x_rows[:, None] + cc[None, :] * stride_xh, r_rows[:, None] + cc[None, :] * stride_rh,
                          mask, HAS_RESIDUAL, SUM_DTYPE)
            if HAS_RESIDUAL:
                tl.store(SumOut + out_rows[:, None] + cc[None, :], s, mask=mask)
            acc += s * s
        rstd = tl.rsqrt(tl.sum(acc, axis=1) / hidden + eps)
        for c in range(CHUNKS):
            # recomputed from the inputs rather than read back from SumOut, which other threads of this program
            # wrote (that would need a barrier); the rounding is deterministic, so the values are the same
            cc = c * BLOCK + cols
            col_mask = cc < hidden
            mask = row_mask[:, None] & col_mask[None, :]
            s = _rms_load(X, R, x_rows[:, None] + cc[None, :] * stride_xh, r_rows[:, None] + cc[None, :] * stride_rh,
                          mask, HAS_RESIDUAL, SUM_DTYPE)
            w = tl.load(W + cc, mask=col_mask, other=0.0).to(tl.float32)
            y = _round(_round(s * rstd[:, None], SUM_DTYPE) * w[None, :], out_ty)
            tl.store(Out + out_rows[:, None] + cc[None, :], y, mask=mask)


@triton.jit
def _gated_act_kernel(X, Out, n_cols, stride_xr, stride_xc, ACT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(X + row * stride_xr + cols * stride_xc, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_xr + (n_cols + cols) * stride_xc, mask=mask, other=0.0).to(tl.float32)
    if ACT == "silu":
        act = gate / (1.0 + tl.exp(-gate))
    else:  # gelu with the tanh approximation: 0.5 * (1 + tanh(z)) = sigmoid(2z), without tanh's cancellation
        z = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = gate / (1.0 + tl.exp(-2.0 * z))
    out_ty = Out.dtype.element_ty
    # eager: act(gate) is rounded to the dtype, then the product is
    tl.store(Out + row * n_cols + cols, _round(_round(act, out_ty) * up, out_ty), mask=mask)


@triton.jit
def _rotate_heads(X, first_head, n_heads, stride_h, stride_d, cos, sin, offs, half_mask, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr):
    """Rotates heads first_head .. + BLOCK_H of one token in place (the dims past 2 * HALF are left alone)."""
    heads = first_head + tl.arange(0, BLOCK_H)
    mask = (heads < n_heads)[:, None] & half_mask[None, :]
    p1 = X + heads[:, None] * stride_h + offs[None, :] * stride_d
    p2 = p1 + HALF * stride_d
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    dt = X.dtype.element_ty
    c, s = cos[None, :], sin[None, :]
    # eager: x * cos + rotate_half(x) * sin, each product and the sum rounded to the dtype
    tl.store(p1, _round(_round(x1 * c, dt) - _round(x2 * s, dt), dt), mask=mask)
    tl.store(p2, _round(_round(x2 * c, dt) + _round(x1 * s, dt), dt), mask=mask)


@triton.jit
def _rotary_kernel(
    Q, K, Positions, Cos, Sin, BandRows, n_q_heads, n_k_heads,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_pr, stride_pt, stride_cos,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr, MROPE: tl.constexpr,
):
    # program (token, block of heads); the head blocks of q come first, then those of k
    t = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    offs = tl.arange(0, BLOCK_HALF)
    half_mask = offs < HALF
    if MROPE:  # frequency band j takes its angle from position row BandRows[j]
        rows = tl.load(BandRows + offs, mask=half_mask, other=0)
        pos = tl.load(Positions + rows * stride_pr + t * stride_pt, mask=half_mask, other=0)
    else:
        pos = tl.load(Positions + t * stride_pt)
    # The tables are cat(freqs, freqs) (times the scale): both halves of a row hold the same values, so the first
    # half serves both. Eager casts them to the activation dtype first.
    dt = Q.dtype.element_ty
    cos = _round(tl.load(Cos + pos.to(tl.int64) * stride_cos + offs, mask=half_mask, other=0.0), dt)
    sin = _round(tl.load(Sin + pos.to(tl.int64) * stride_cos + offs, mask=half_mask, other=0.0), dt)
    q_blocks = tl.cdiv(n_q_heads, BLOCK_H)
    if block < q_blocks:
        _rotate_heads(Q + t * stride_qt, block * BLOCK_H, n_q_heads, stride_qh, stride_qd, cos, sin, offs, half_mask,
                      HALF, BLOCK_H)
    else:
        _rotate_heads(K + t * stride_kt, (block - q_blocks) * BLOCK_H, n_k_heads, stride_kh, stride_kd, cos, sin,
                      offs, half_mask, HALF, BLOCK_H)


def interpreting() -> bool:
    """Whether these kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 when this module was imported)."""
    return isinstance(_rms_norm_kernel, InterpretedFunction)


def _warps(elems: int) -> int:
    return max(1, min(8, elems // 512))


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """x as [outer, inner, hidden], a view wherever the leading dims allow one (flatten copies only otherwise)."""
    if x.dim() > 3:
        return x.flatten(0, -3)
    return x.view((1,) * (3 - x.dim()) + tuple(x.shape))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             max_block: int = RMS_MAX_BLOCK) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """See `fused_ops.rms_norm`."""
    hidden = x.shape[-1]
    sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, sum_dtype), device=x.device)
    x3 = _as_3d(x)
    if residual is None:
        r3, sum_out = x3, out  # placeholders: the kernel reads and writes neither
    else:
        assert residual.shape == x.shape, f"residual {tuple(residual.shape)} != x {tuple(x.shape)}"
        r3 = _as_3d(residual)
        sum_out = torch.empty(x.shape, dtype=sum_dtype, device=x.device)
    n_rows = x3.shape[0] * x3.shape[1]
    if n_rows > 0:
        block = min(triton.next_power_of_2(hidden), max_block)
        chunks = triton.cdiv(hidden, block)
        rows = 1 if chunks > 1 else max(1, min(_RMS_ROW_ELEMS // block, triton.next_power_of_2(n_rows)))
        _rms_norm_kernel[(triton.cdiv(n_rows, rows),)](
            x3, r3, weight, out, sum_out, n_rows, x3.shape[1], hidden, eps,
            x3.stride(0), x3.stride(1), x3.stride(2), r3.stride(0), r3.stride(1), r3.stride(2),
            HAS_RESIDUAL=residual is not None, SUM_DTYPE=_TL_DTYPES[sum_dtype], ROWS=rows, BLOCK=block,
            CHUNKS=chunks, num_warps=_warps(rows * block),
        )
    return out if residual is None else (out, sum_out)


def gated_activation(x: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up for x = [gate | up] on the last dim; `act` is "silu" or "gelu_tanh"."""
    half = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], half), dtype=x.dtype, device=x.device)
    x2 = x.flatten(0, -2) if x.dim() > 1 else x.view(1, -1)
    if x2.shape[0] > 0 and half > 0:
        block = min(triton.next_power_of_2(half), _ACT_BLOCK)
        _gated_act_kernel[(x2.shape[0], triton.cdiv(half, block))](
            x2, out, half, x2.stride(0), x2.stride(1), ACT=act, BLOCK=block, num_warps=_warps(block),
        )
    return out


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor, rotary_dim: int,
                     band_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """See `fused_ops.rotary_embedding`."""
    assert q.dim() == 3 and k.dim() == 3 and cos_cache.stride(-1) == 1 and sin_cache.stride() == cos_cache.stride()
    tokens, n_q, n_k = q.shape[0], q.shape[1], 0 if k is q else k.shape[1]
    half = rotary_dim // 2
    mrope = positions.dim() == 2
    if tokens == 0:
        return q, k
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(max(n_q, n_k)), _ROTARY_ELEMS // block_half))
    grid = (tokens, triton.cdiv(n_q, block_h) + triton.cdiv(n_k, block_h))
    _rotary_kernel[grid](
        q, k, positions, cos_cache, sin_cache, band_rows if mrope else positions, n_q, n_k,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        positions.stride(0) if mrope else 0, positions.stride(-1), cos_cache.stride(0),
        HALF=half, BLOCK_HALF=block_half, BLOCK_H=block_h, MROPE=mrope, num_warps=_warps(block_h * block_half * 2),
    )
    return q, k
