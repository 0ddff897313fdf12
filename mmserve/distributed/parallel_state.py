"""Tensor-parallel process state: this process's rank and world size, and the collectives layers call.

This is the one per-process context the package keeps: layers ask it how to shard, so model files never
pass ranks around. With no process group initialised, everything is rank 0 of 1 and collectives are no-ops.

Two groups over the same ranks: the tensor-parallel group (NCCL on GPUs, gloo on the CPU) that the layers' all-reduce
and all-gather use, and a gloo group on the CPU for the engine's own traffic (the inbound messages rank 0 mirrors to
the others each step, the KV-cache size they agree on), which must never wait behind GPU work.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

_TP_GROUP: dist.ProcessGroup | None = None
_CPU_GROUP: dist.ProcessGroup | None = None
_DP_ENCODER = False  # --mm-enable-dp-encoder: split a step's media among the ranks (see encode_data_parallel)

# The engine's loop mirrors messages every step and every idle poll, so a rank waits long only behind a long step
# (a first compilation, a huge prefill); a dead peer is noticed by its closed connection, not by this timeout.
_GROUP_TIMEOUT = datetime.timedelta(hours=2)


def init_tensor_parallel(group: dist.ProcessGroup | None, cpu_group: dist.ProcessGroup | None = None) -> None:
    """Record the process group that tensor-parallel collectives use (None: single process), and the CPU group of
    the same ranks (the same group when it is already gloo)."""
    global _TP_GROUP, _CPU_GROUP
    _TP_GROUP = group
    _CPU_GROUP = cpu_group if cpu_group is not None else group


def init_distributed(rank: int, world_size: int, init_method: str, device: torch.device) -> None:
    """Join the engine's ranks (torch.distributed rendezvous at `init_method`, e.g. tcp://host:port) and record the
    groups. On a GPU the collectives run on NCCL and the engine's messages on a gloo group beside it."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=init_method, world_size=world_size, rank=rank,
                            timeout=_GROUP_TIMEOUT, **kwargs)
    cpu_group = dist.new_group(backend="gloo", timeout=_GROUP_TIMEOUT) if backend == "nccl" else None
    init_tensor_parallel(dist.group.WORLD, cpu_group)


def set_dp_encoder(enabled: bool) -> None:
    global _DP_ENCODER
    _DP_ENCODER = enabled


def dp_encoder() -> bool:
    """Whether media encoders run data-parallel over the tensor-parallel ranks."""
    return _DP_ENCODER and get_tp_size() > 1


def destroy_distributed() -> None:
    """Leave the process group (the in-process Engine's shutdown); a later engine in this process is single-rank."""
    init_tensor_parallel(None)
    set_dp_encoder(False)
    if dist.is_initialized():
        dist.destroy_process_group()


def get_tp_size() -> int:
    return dist.get_world_size(_TP_GROUP) if _TP_GROUP is not None else 1


def get_tp_rank() -> int:
    return dist.get_rank(_TP_GROUP) if _TP_GROUP is not None else 0


def get_cpu_group() -> dist.ProcessGroup | None:
    return _CPU_GROUP


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if get_tp_size() == 1:
        return x
    dist.all_reduce(x, group=_TP_GROUP)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate each rank's shard along `dim` (one all-gather into a new leading axis, then a move)."""
    size = get_tp_size()
    if size == 1:
        return x
    x = x.contiguous()
    out = torch.empty((size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x, group=_TP_GROUP)
    dim = dim % x.dim()
    if dim == 0:
        return out
    return out.view(size, *x.shape).movedim(0, dim).reshape(*x.shape[:dim], size * x.shape[dim], *x.shape[dim + 1:])


# torch 2.14 renamed all_gather_into_tensor (and warns on the old name); the GPU image's 2.11 has only the old one
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def min_over_ranks(value: int) -> int:
    """The smallest of every rank's `value` (the KV cache all ranks can hold), over the CPU group."""
    if _CPU_GROUP is None or dist.get_world_size(_CPU_GROUP) == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_CPU_GROUP)
    return int(t.item())


def split_by_size(sizes: list[int], parts: int) -> list[list[int]]:
    """Indices of `sizes` dealt into `parts` lists of about equal totals: largest first, each to the lightest list
    (ties to the lowest rank). Deterministic, so every rank computes the same split."""
    loads, out = [0] * parts, [[] for _ in range(parts)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(parts), key=lambda r: (loads[r], r))
        out[r].append(i)
        loads[r] += sizes[i]
    return [sorted(part) for part in out]


def encode_data_parallel(encode, lengths: list[int], width: int, dtype: torch.dtype,
                         device: torch.device) -> list[torch.Tensor]:
    """Every rank's share of a step's media items through `encode(indices) -> [length_i, width] tensors`, then one
    all-gather: each rank ends with all items' outputs, having run its (replicated) encoder on about 1/tp of them.
    Rows are padded to the longest rank's total for the gather."""
    size, rank = get_tp_size(), get_tp_rank()
    shares = split_by_size(lengths, size)
    totals = [sum(lengths[i] for i in share) for share in shares]
    rows = max(totals)
    local = torch.zeros(rows, width, dtype=dtype, device=device)
    if shares[rank]:
        mine = torch.cat([out.to(dtype) for out in encode(shares[rank])])
        local[: mine.shape[0]] = mine
    gathered = tp_all_gather(local, dim=0).view(size, rows, width)
    outs: list[torch.Tensor | None] = [None] * len(lengths)
    for r, share in enumerate(shares):
        at = 0
        for i in share:
            outs[i] = gathered[r, at : at + lengths[i]]
            at += lengths[i]
    return outs
