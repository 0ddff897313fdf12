"""ProcessorProcesses: the model's Hugging Face processor run in worker processes (`--mm-processor-pool process`).

The torchvision processors release the GIL inside each tensor operation, but spend most of an image's time in
Python between them (argument checks, per-operation dispatch, the tokenizer call), so worker threads run them one
at a time and take the GIL from whatever else the process does: in the in-process Engine that is the thread that
launches the GPU's work, which then starves. Measured on an H200 with 128 new 448x448 images: the GPU ran at 13%
for the 1.5 s the threads took (`docs/benchmarks.md`). Processes run them side by side and leave the GIL alone.

What stays in the parent's worker threads: reading and decoding the media (the budgets and deadlines of
`media.py` live there), the processor cache, and the assembly of the request. A task sends the decoded images or
frames and the processor's keyword arguments, and gets back the output's tensors. Each process loads the processor
once, at start; the processes start when the pool does, in the background.

The processes start from a blank `__main__`: they need nothing but mmserve, and a user's script that makes an Engine
without an `if __name__ == "__main__":` guard would otherwise run again in each of them (how "spawn" starts a
process), and fail there.

A process that dies (a crash in native code on some input) breaks the pool: it is replaced, the item retried once
on the new one, and a second failure is the item's error.
"""

from __future__ import annotations

import multiprocessing
import sys
import threading
import types
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

_processor: Any = None  # in a worker process: the model's processor, loaded once


def _load(folder: str, trust_remote_code: bool) -> None:
    global _processor
    from transformers import AutoProcessor

    torch.set_num_threads(1)  # one image per process; the processes are the parallelism
    _processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)


def _ready() -> bool:
    return _processor is not None


def _run(kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = _processor(**kwargs)
    return {name: value for name, value in out.items() if isinstance(value, torch.Tensor)}


@contextmanager
def _blank_main() -> Iterator[None]:
    """Processes spawned inside see an empty `__main__` (the parent's is put back after)."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


class ProcessorCrashed(RuntimeError):
    pass


class ProcessorProcesses:
    def __init__(self, folder: Path, trust_remote_code: bool, workers: int):
        self._args = (str(folder), trust_remote_code)
        self.workers = workers
        self._lock = threading.Lock()
        self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_load, initargs=self._args)
        with _blank_main():
            for _ in range(self.workers):  # starts every process now; each loads the processor meanwhile
                pool.submit(_ready)
        return pool

    def __call__(self, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The processor's tensors for `kwargs` (as `processor(**kwargs)` gives them), from a worker process."""
        for attempt in range(2):
            pool = self._pool
            try:
                return pool.submit(_run, kwargs).result()
            except BrokenProcessPool as exc:
                with self._lock:
                    if self._pool is pool:  # the first thread to see it replaces the pool
                        pool.shutdown(wait=False, cancel_futures=True)
                        self._pool = self._start()
                if attempt == 1:
                    raise ProcessorCrashed("the model's processor crashed on this item") from exc
        raise AssertionError("unreachable")

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
