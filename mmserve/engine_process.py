"""The engine process: an EngineCore behind two ZMQ sockets (requests in, output batches out, msgpack).

Started by the API server's TokenizerManager with the `spawn` method. It exits when told to, when its parent
dies, or on SIGTERM. A request's own failures never reach this loop (EngineCore answers them with an error output);
an exception that does is one no request can be blamed for: it is logged and ends the process, and the server
fails the requests in flight and starts a new engine.

With tensor parallelism there is one such process per rank: rank 0 holds the sockets and mirrors every inbound
frame to the others, which step in lockstep with it (mmserve.distributed.mirror). A rank that dies ends the others'
broadcast, so the whole group exits and the server restarts it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq

from mmserve.config import ServerArgs
from mmserve.messages import OutputBatch, ToEngine, TokenOutput

logger = logging.getLogger("mmserve.engine")

_IDLE_POLL_MS = 50


def handle_frame(core: Any, decoder: msgspec.msgpack.Decoder, frame: bytes) -> list[TokenOutput]:
    """One inbound frame to the core. Only the API process writes to this socket; still, a malformed frame is
    logged and dropped rather than allowed to end the loop."""
    try:
        msg = decoder.decode(frame)
    except msgspec.DecodeError as exc:
        logger.error("dropped a malformed message (%d bytes): %s", len(frame), exc)
        return []
    return core.handle(msg)


@dataclass(frozen=True)
class RankPlace:
    """Where one engine process sits among tensor-parallel ranks: its rank, their number, the rendezvous address
    (tcp://host:port) and its device (cuda:N, or cpu)."""

    rank: int = 0
    world_size: int = 1
    init_method: str = ""
    device: str = "auto"


def run_engine_process(args_json: str, to_engine: str, from_engine: str, parent_pid: int,
                       place: RankPlace | None = None) -> None:
    args = ServerArgs(**msgspec.json.decode(args_json))
    place = place or RankPlace(device=args.device)
    if place.device != args.device:
        args = dataclasses.replace(args, device=place.device)
    tag = "engine" if place.world_size == 1 else f"engine rank {place.rank}"
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s {tag} %(levelname)s %(message)s")
    _leave_a_core_for_the_api_process(args, place.world_size)
    # The loop runs in a thread of its own, as it does in the in-process Engine: stepping the model from a process's
    # main thread was measured 5-10x slower on a loaded 2-core CPU (docs/benchmarks.md, "server against in-process").
    failed: list[BaseException] = []
    loop = threading.Thread(target=_serve, args=(args, to_engine, from_engine, parent_pid, place, failed),
                            name="mmserve-scheduler", daemon=True)
    loop.start()
    loop.join()
    if failed:
        sys.exit(1)


def _leave_a_core_for_the_api_process(args: ServerArgs, ranks: int = 1) -> None:
    """On a CPU, run torch's intra-op team on all cores but one (shared among tensor-parallel ranks). The API
    process wakes at every step to stream the step's tokens; with an OpenMP team on every core, each wake-up preempts
    a team thread while the others spin in their barriers, and decode ran 8x slower than the in-process Engine on 2
    cores (one thread: the same speed; see docs/benchmarks.md). An explicit OMP_NUM_THREADS is left alone."""
    if args.resolved_device().type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return
    import torch

    torch.set_num_threads(max(1, min(torch.get_num_threads(), (len(os.sched_getaffinity(0)) - 1) // ranks)))


def _serve(args: ServerArgs, to_engine: str, from_engine: str, parent_pid: int, place: RankPlace,
           failed: list[BaseException]) -> None:
    mirror = core = None
    try:
        if place.world_size > 1:
            from mmserve.distributed.mirror import Mirror
            from mmserve.distributed.parallel_state import get_cpu_group, init_distributed

            init_distributed(place.rank, place.world_size, place.init_method, args.resolved_device())
            mirror = Mirror(get_cpu_group())
        from mmserve.engine_core import EngineCore

        core = EngineCore(args)
        if place.rank > 0:
            from mmserve.distributed.mirror import follow

            follow(core, mirror)
        else:
            _lead(core, mirror, to_engine, from_engine, parent_pid)
    except BaseException as exc:  # noqa: BLE001 - reported by the process's exit code
        logger.exception("engine process failed")
        failed.append(exc)
    finally:
        if mirror is not None:  # leave the group here: NCCL's threads must not meet the interpreter's exit
            from mmserve.distributed.parallel_state import destroy_distributed

            if core is not None:
                core.runner.release_graphs()
            destroy_distributed()


def _lead(core: Any, mirror: Any, to_engine: str, from_engine: str, parent_pid: int) -> None:
    """Rank 0 (the only rank without tensor parallelism): read the API server's frames, mirror them to the other
    ranks, handle them, step, and send the step's outputs back."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(to_engine)
    push = ctx.socket(zmq.PUSH)
    push.connect(from_engine)
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(ToEngine)
    try:
        push.send(encoder.encode(core.ready()))
        while True:
            busy = core.has_work()
            if not busy and not pull.poll(_IDLE_POLL_MS):
                if os.getppid() != parent_pid:  # the server is gone: do not linger as an orphan
                    return
                if mirror is not None:  # the other ranks wait in the broadcast: keep their loops turning
                    mirror.publish([])
                continue
            frames = []
            while pull.poll(0):
                frames.append(pull.recv())
            if mirror is not None:
                mirror.publish(frames)
            outputs = []
            for frame in frames:
                outputs.extend(handle_frame(core, decoder, frame))
            if core.has_work():
                outputs.extend(core.step())
            if outputs or busy:
                push.send(encoder.encode(OutputBatch(outputs, core.stats())))
    finally:
        if mirror is not None:
            _try_stop(mirror)
        push.close(linger=0)
        pull.close(linger=0)
        ctx.term()


def _try_stop(mirror: Any) -> None:
    """Tell the other ranks to stop; they may be gone already (a rank that died ended the broadcast)."""
    try:
        mirror.stop()
    except Exception:  # noqa: BLE001
        logger.debug("the other ranks did not take the stop message", exc_info=True)
