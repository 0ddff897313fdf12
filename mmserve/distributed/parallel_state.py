"""Tensor-parallel process state: this process's rank and world size, and the collectives layers call.

This is the one per-process context the package keeps: layers ask it how to shard, so model files never
pass ranks around. With no process group initialised, everything is rank 0 of 1 and collectives are no-ops.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_TP_GROUP: dist.ProcessGroup | None = None


def init_tensor_parallel(group: dist.ProcessGroup | None) -> None:
    """Record the process group that tensor-parallel collectives use (None: single process)."""
    global _TP_GROUP
    _TP_GROUP = group


def get_tp_size() -> int:
    return dist.get_world_size(_TP_GROUP) if _TP_GROUP is not None else 1


def get_tp_rank() -> int:
    return dist.get_rank(_TP_GROUP) if _TP_GROUP is not None else 0


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if get_tp_size() == 1:
        return x
    dist.all_reduce(x, group=_TP_GROUP)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate each rank's shard along `dim`."""
    size = get_tp_size()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=_TP_GROUP)
    return torch.cat(parts, dim=dim)
