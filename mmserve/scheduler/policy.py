"""Waiting-queue order: first come first served, or longest cached prefix first (more reuse per step)."""

from __future__ import annotations

from collections.abc import Callable

from mmserve.scheduler.req import Req


def order_waiting(queue: list[Req], policy: str, prefix_len: Callable[[Req], int]) -> list[Req]:
    if policy == "fcfs":
        return queue
    if policy == "lpm":
        # Retracted requests keep their place at the front; the rest by cached prefix, longest first.
        return sorted(queue, key=lambda r: (not r.admitted, -prefix_len(r)))
    raise ValueError(f"unknown schedule policy {policy!r}; choose fcfs or lpm")
