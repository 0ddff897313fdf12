"""The layers' way to the fused Triton kernels (`fused_kernels.py`): the switch that says when to use them and the
functions that run them.

The layers call these for CUDA tensors and keep their eager code, the reference, for CPU ones; `run_on_cpu` sends
CPU tensors to the kernels too (tests, under TRITON_INTERPRET=1). Triton is imported on the first call, not with
the layers: a CPU-only install needs no Triton, and TRITON_INTERPRET, which Triton reads when it decorates the
kernels (and its own library functions), may still be set by a test after the layers were imported.
"""

from __future__ import annotations

from types import ModuleType

import torch

# Send CPU tensors through the kernels too (tests, with TRITON_INTERPRET=1); the layers read it on every call.
run_on_cpu = False

# activation name (as in activation.py) -> the kernel's variant; the others stay eager
FUSED_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}

_kernels: ModuleType | None = None


def kernels() -> ModuleType:
    """`mmserve.layers.fused_kernels`, imported on first use."""
    global _kernels
    if _kernels is None:
        from mmserve.layers import fused_kernels

        _kernels = fused_kernels
    return _kernels


def interpreting() -> bool:
    """Whether the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 when they were imported)."""
    return kernels().interpreting()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             max_block: int | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`RMSNorm.forward` in one launch: norm(x), or (norm(x + residual), x + residual) with `residual`.

    x may be any strided view whose last dim is the normalised one (the per-head norms of q and k read the qkv
    output in place); the results are new contiguous tensors, in the dtypes eager promotion gives. `max_block`
    caps the row block (tests shrink it to reach the chunked path of long rows)."""
    k = kernels()
    return k.rms_norm(x, weight, eps, residual, max_block or k.RMS_MAX_BLOCK)


def gated_activation(x: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up for x = [gate | up] on the last dim, in one launch; `act` is a value of FUSED_ACTIVATIONS."""
    return kernels().gated_activation(x, act)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor, rotary_dim: int,
                     band_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, heads, head_dim] and k [T, kv_heads, head_dim] in place, in one launch, and returns them (strided
    views are fine); the first `rotary_dim` dims of each head rotate, the rest pass through.

    positions [T] index the [max_position, rotary_dim] tables; [3, T] positions need `band_rows`, the position row
    each of the rotary_dim / 2 frequency bands reads (M-RoPE). `k` may be `q` itself (rotated once)."""
    return kernels().rotary_embedding(positions, q, k, cos_cache, sin_cache, rotary_dim, band_rows)
