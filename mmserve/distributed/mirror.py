"""Lockstep ranks: rank 0 mirrors every inbound message to the other ranks, and each rank runs the same scheduler.

Tensor parallelism needs every rank to run the same step at the same time. Two ways were open: rank 0 schedules
and sends the others a plan of each step (the batch, its slots, its sampling), or every rank runs its own scheduler
on the same inputs. mmserve does the second. The scheduler is deterministic given the messages it receives and the
step boundaries at which it receives them (no clocks, no threads in its decisions; the KV-cache size is agreed as
the smallest over ranks first), and the sampled tokens are the same everywhere because the logits are gathered
whole on every rank and every rank's sampler starts from the same seed. So rank 0 only forwards the raw message
frames, once per loop iteration, before it handles them: a few hundred bytes, never tensors of a step, and no
second code path through the scheduler that could drift from the single-GPU one.

A frame list travels as one gloo broadcast of its length and, when not empty, one of its bytes, on the CPU group.
An empty list (an idle poll) keeps the others' loops turning; a length of -1 tells them to stop.
"""

from __future__ import annotations

import logging

import msgspec
import torch
import torch.distributed as dist

logger = logging.getLogger("mmserve.engine")

_STOP = -1


class Mirror:
    """Rank 0's side (`publish`, `stop`) and the other ranks' side (`receive`) of the per-iteration broadcast."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self._length = torch.zeros(1, dtype=torch.int64)

    def publish(self, frames: list[bytes]) -> None:
        payload = msgspec.msgpack.encode(frames) if frames else b""
        self._length[0] = len(payload)
        dist.broadcast(self._length, src=0, group=self.group)
        if payload:
            dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8), src=0, group=self.group)

    def stop(self) -> None:
        self._length[0] = _STOP
        dist.broadcast(self._length, src=0, group=self.group)

    def receive(self) -> list[bytes] | None:
        """The frames rank 0 published this iteration; None when it said stop."""
        dist.broadcast(self._length, src=0, group=self.group)
        n = int(self._length[0])
        if n == _STOP:
            return None
        if n == 0:
            return []
        buf = torch.empty(n, dtype=torch.uint8)
        dist.broadcast(buf, src=0, group=self.group)
        return msgspec.msgpack.decode(buf.numpy().tobytes(), type=list[bytes])


def follow(core, mirror: Mirror) -> None:
    """A rank other than 0: take the frames rank 0 took, in the same order, and step when it steps, until it says
    stop. Outputs are dropped: rank 0 sends the same ones to the API server."""
    from mmserve.engine_process import handle_frame
    from mmserve.messages import ToEngine

    decoder = msgspec.msgpack.Decoder(ToEngine)
    while True:
        try:
            frames = mirror.receive()
        except RuntimeError as exc:  # rank 0's process ended without saying stop (killed, or crashed)
            logger.warning("rank 0 is gone (%s); this rank stops", str(exc).splitlines()[0][:200])
            return
        if frames is None:
            return
        for frame in frames:
            handle_frame(core, decoder, frame)
        if core.has_work():
            core.step()
