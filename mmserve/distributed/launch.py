"""Where each engine rank runs and how it is started: one spawned process per rank of this host.

A replica (one model copy) has --tp-size ranks, spread evenly over --nnodes hosts; with --dp-size, replica d uses
the GPUs after replica d-1's. The ranks meet through torch.distributed's TCP rendezvous at --dist-init-addr, or at a
free local port when every rank is on this host.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import socket
from typing import Any

import msgspec

from mmserve.config import ServerArgs
from mmserve.engine_process import RankPlace
from mmserve.processes import blank_main


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous(args: ServerArgs, replica: int = 0) -> str:
    """The tcp:// address replica `replica`'s ranks meet at ("" with one rank: no process group)."""
    if args.tp_size == 1:
        return ""
    if args.dist_init_addr:
        host, _, port = args.dist_init_addr.rpartition(":")
        return f"tcp://{host}:{int(port) + replica}"
    return f"tcp://127.0.0.1:{free_port()}"


def local_places(args: ServerArgs, replica: int, init_method: str) -> list[RankPlace]:
    """The ranks of replica `replica` that run on this host, each with its device."""
    per_node = args.tp_size // args.nnodes
    first = args.node_rank * per_node
    device = args.resolved_device()
    places = []
    for local in range(per_node):
        if device.type == "cuda" and (args.tp_size > 1 or args.dp_size > 1 or device.index is None):
            where = f"cuda:{args.base_gpu_id + replica * per_node + local}"
        else:
            where = str(device)
        places.append(RankPlace(first + local, args.tp_size, init_method, where))
    return places


def check_devices(args: ServerArgs) -> None:
    """A ValueError when this host lacks the GPUs its ranks would use."""
    import torch

    if args.resolved_device().type != "cuda":
        return
    need = args.base_gpu_id + args.dp_size * (args.tp_size // args.nnodes)
    have = torch.cuda.device_count()
    if need > have:
        raise ValueError(f"--tp-size {args.tp_size} x --dp-size {args.dp_size} from --base-gpu-id "
                         f"{args.base_gpu_id} needs GPUs up to #{need - 1} on this host; it has {have}")


def start_ranks(args: ServerArgs, places: list[RankPlace], to_engine: str = "", from_engine: str = "",
                parent_pid: int | None = None) -> list[Any]:
    """Spawn one engine process per place (rank 0's connects to the two sockets; the others follow it)."""
    from mmserve.engine_process import run_engine_process

    spawn = multiprocessing.get_context("spawn")
    args_json = msgspec.json.encode(dataclasses.asdict(args)).decode()
    procs = []
    with blank_main():
        for place in places:
            name = "mmserve-engine" if place.world_size == 1 else f"mmserve-engine-rank{place.rank}"
            proc = spawn.Process(target=run_engine_process, name=name, daemon=True,
                                 args=(args_json, to_engine, from_engine, parent_pid or os.getpid(), place))
            proc.start()
            procs.append(proc)
    return procs
