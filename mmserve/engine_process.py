"""The engine process: an EngineCore behind two ZMQ sockets (requests in, output batches out, msgpack).

Started by the API server's TokenizerManager with the `spawn` method. It exits when told to, when its parent
dies, or on SIGTERM; an exception in the loop is logged and ends the process, which the server reports.
"""

from __future__ import annotations

import logging
import os
import sys

import msgspec
import zmq

from mmserve.config import ServerArgs
from mmserve.messages import OutputBatch, ToEngine

logger = logging.getLogger("mmserve.engine")

_IDLE_POLL_MS = 50


def run_engine_process(args_json: str, to_engine: str, from_engine: str, parent_pid: int) -> None:
    args = ServerArgs(**msgspec.json.decode(args_json))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s engine %(levelname)s %(message)s")
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
                outputs.extend(core.handle(decoder.decode(pull.recv())))
            if core.has_work():
                outputs.extend(core.step())
            if outputs or busy:
                push.send(encoder.encode(OutputBatch(outputs, core.stats())))
    except Exception:
        logger.exception("engine process failed")
        sys.exit(1)
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        ctx.term()
