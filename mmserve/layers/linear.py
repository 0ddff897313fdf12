"""Linear layers with tensor-parallel sharding.

Each parameter carries a `weight_loader(param, loaded_weight, shard_id=None)` that copies this rank's slice
of a full checkpoint tensor into it, so sharding lives next to the layer that owns it and a model's
`load_weights` only maps names. Merged layers (qkv, gate_up) load their parts by `shard_id`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmserve.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_gather, tp_all_reduce


def divide(numerator: int, denominator: int) -> int:
    assert numerator % denominator == 0, f"{numerator} is not divisible by {denominator}"
    return numerator // denominator


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    assert param.shape == loaded_weight.shape, f"shape mismatch: {tuple(param.shape)} vs {tuple(loaded_weight.shape)}"
    param.data.copy_(loaded_weight)


class LinearBase(nn.Module):
    """y = x W^T + b, with W of shape [output_size, input_size] as stored in checkpoints."""

    def __init__(self, input_size: int, output_size: int, bias: bool, dtype: torch.dtype | None = None):
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        default_weight_loader(param, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole weight."""


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank returns its slice (gather_output=False)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, gather_output: bool = False,
                 dtype: torch.dtype | None = None):
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.gather_output = gather_output
        super().__init__(input_size, divide(output_size, self.tp_size), bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        shard = param.shape[0]
        default_weight_loader(param, loaded_weight.narrow(0, self.tp_rank * shard, shard))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return tp_all_gather(y) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stored as one matrix (gate_proj + up_proj); shard_id indexes them."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 dtype: torch.dtype | None = None):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, dtype=dtype)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int | None = None) -> None:
        assert shard_id is not None, "merged layers load one part at a time"
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        part = loaded_weight.narrow(0, self.tp_rank * size, size)
        default_weight_loader_slice(param, offset, size, part)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matrix. With more ranks than KV heads, KV heads are replicated."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 dtype: torch.dtype | None = None):
        tp_size = get_tp_size()
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp_size)
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.kv_replicas = max(1, tp_size // num_kv_heads)
        total = (num_heads + 2 * self.num_kv_heads * tp_size) * head_dim
        super().__init__(hidden_size, total, bias, dtype=dtype)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | None = None) -> None:
        assert shard_id in ("q", "k", "v"), f"unknown qkv shard {shard_id!r}"
        if shard_id == "q":
            offset, size, rank = 0, self.q_size, self.tp_rank
        else:
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            size, rank = self.kv_size, self.tp_rank // self.kv_replicas
        default_weight_loader_slice(param, offset, size, loaded_weight.narrow(0, rank * size, size))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed with an all-reduce."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, dtype: torch.dtype | None = None):
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        super().__init__(divide(input_size, self.tp_size), output_size, bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if param.dim() == 1:  # the bias is added once, after the reduction
            default_weight_loader(param, loaded_weight)
            return
        shard = param.shape[1]
        default_weight_loader(param, loaded_weight.narrow(1, self.tp_rank * shard, shard))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        y = tp_all_reduce(y)
        return y + self.bias if self.bias is not None else y


def default_weight_loader_slice(param: nn.Parameter, offset: int, size: int, loaded: torch.Tensor) -> None:
    """Copy `loaded` into rows [offset, offset + size) of a merged parameter (weight or bias)."""
    target = param.data.narrow(0, offset, size)
    assert target.shape == loaded.shape, f"shape mismatch: {tuple(target.shape)} vs {tuple(loaded.shape)}"
    target.copy_(loaded)
