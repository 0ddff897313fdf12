"""Gated activations: the MLP's gate and up projections arrive concatenated on the last dimension.

On CUDA, SiLU and tanh-GELU run as one Triton kernel (`fused_ops.gated_activation`) instead of a split, an
activation and a multiply; the eager code is the CPU path and the reference for the kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmserve.layers import fused_ops

_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def get_act_fn(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class GatedActivation(nn.Module):
    """act(gate) * up for x = [gate | up]."""

    def __init__(self, act: str = "silu"):
        super().__init__()
        self.act = get_act_fn(act)
        self.fused_act = fused_ops.FUSED_ACTIVATIONS.get(act)  # None: no kernel, eager everywhere

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_act is not None and (x.is_cuda or fused_ops.run_on_cpu):
            return fused_ops.gated_activation(x, self.fused_act)
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up
