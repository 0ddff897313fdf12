"""The engine process: an EngineCore behind two ZMQ sockets (requests in, output batches out, msgpack).

Started by the API server's TokenizerManager with the `spawn` method. It exits when told to, when its parent
dies, or on SIGTERM. A request's own failures never reach this loop (EngineCore answers them with an error output);
an exception that does is one no request can be blamed for: it is logged and ends the process, and the server
fails the requests in flight and starts a new engine.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
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


def run_engine_process(args_json: str, to_engine: str, from_engine: str, parent_pid: int) -> None:
    args = ServerArgs(**msgspec.json.decode(args_json))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s engine %(levelname)s %(message)s")
    _leave_a_core_for_the_api_process(args)
    # The loop runs in a thread of its own, as it does in the in-process Engine: stepping the model from a process's
    # main thread was measured 5-10x slower on a loaded 2-core CPU (docs/benchmarks.md, "server against in-process").
    failed: list[BaseException] = []
    loop = threading.Thread(target=_serve, args=(args, to_engine, from_engine, parent_pid, failed),
                            name="mmserve-scheduler", daemon=True)
    loop.start()
    loop.join()
    if failed:
        sys.exit(1)


def _leave_a_core_for_the_api_process(args: ServerArgs) -> None:
    """On a CPU, run torch's intra-op team on all cores but one. The API process wakes at every step to stream the
    step's tokens; with an OpenMP team on every core, each wake-up preempts a team thread while the others spin in
    their barriers, and decode ran 8x slower than the in-process Engine on 2 cores (one thread: the same speed; see
    docs/benchmarks.md). An explicit OMP_NUM_THREADS is left alone."""
    if args.resolved_device().type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return
    import torch

    torch.set_num_threads(max(1, min(torch.get_num_threads(), len(os.sched_getaffinity(0)) - 1)))


def _serve(args: ServerArgs, to_engine: str, from_engine: str, parent_pid: int, failed: list[BaseException]) -> None:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(to_engine)
    push = ctx.socket(zmq.PUSH)
    push.connect(from_engine)
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(ToEngine)
    try:
        from mmserve.engine_core import EngineCore

        core = EngineCore(args)
        push.send(encoder.encode(core.ready()))
        while True:
            busy = core.has_work()
            if not busy and not pull.poll(_IDLE_POLL_MS):
                if os.getppid() != parent_pid:  # the server is gone: do not linger as an orphan
                    return
                continue
            outputs = []
            while pull.poll(0):
                outputs.extend(handle_frame(core, decoder, pull.recv()))
            if core.has_work():
                outputs.extend(core.step())
            if outputs or busy:
                push.send(encoder.encode(OutputBatch(outputs, core.stats())))
    except BaseException as exc:  # noqa: BLE001 - reported by the process's exit code
        logger.exception("engine process failed")
        failed.append(exc)
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        ctx.term()
