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
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmserve.processes import blank_main

_processor: Any = None  # in a worker process: the model's processor, loaded once

# Arrays cross between the processes in a shared-memory block, not through the executor's pipe: pickled through
# it, a 448x448 image's 4.8 MB of pixel values took 15 ms to come back (about 320 MB/s), against ~2 ms of copies.
# One block per direction of a task; the parent unlinks both (the resource tracker, shared with the workers,
# removes any left behind when the parent exits).
Layout = list[tuple[str, str, tuple[int, ...], int]]  # (name, dtype, shape, byte offset) of each array


def _pack(arrays: dict[str, np.ndarray]) -> tuple[str, Layout]:
    """The arrays copied into a new shared-memory block: its name and where each lies in it."""
    layout: Layout = []
    offset = 0
    for name, array in arrays.items():
        layout.append((name, array.dtype.str, array.shape, offset))
        offset += -(-array.nbytes // 64) * 64
    block = shared_memory.SharedMemory(create=True, size=max(offset, 1))
    try:
        for (_, _, shape, at), array in zip(layout, arrays.values(), strict=True):
            np.ndarray(shape, array.dtype, buffer=block.buf, offset=at)[...] = array
        return block.name, layout
    finally:
        block.close()


def _unpack(block_name: str, layout: Layout, unlink: bool) -> dict[str, np.ndarray]:
    """Copies of the arrays `_pack` put in the block (which is removed when `unlink`)."""
    block = shared_memory.SharedMemory(name=block_name)
    try:
        return {name: np.ndarray(shape, np.dtype(dtype), buffer=block.buf, offset=at).copy()
                for name, dtype, shape, at in layout}
    finally:
        block.close()
        if unlink:
            block.unlink()


def _load(folder: str, trust_remote_code: bool, threads: int) -> None:
    global _processor
    from transformers import AutoProcessor

    torch.set_num_threads(threads)
    _processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)


def _ready() -> bool:
    return _processor is not None


def _run(kwargs: dict[str, Any], media: str, block_name: str, layout: Layout) -> tuple[str, Layout]:
    """The processor on the media in `block_name` (images, or video frames, as arrays); its tensors, packed."""
    arrays = [array for array in _unpack(block_name, layout, unlink=False).values()]
    if media == "images":  # as PIL images again, as the threads hand them over (an array 3 pixels high would read
        from PIL import Image  # as channels-first to the processor)

        arrays = [Image.fromarray(array) for array in arrays]
    out = _processor(**kwargs, **{media: arrays})
    return _pack({name: value.numpy() for name, value in out.items() if isinstance(value, torch.Tensor)})


class ProcessorCrashed(RuntimeError):
    pass


class ProcessorProcesses:
    def __init__(self, folder: Path, trust_remote_code: bool, workers: int):
        self._args = (str(folder), trust_remote_code)
        self.workers = workers
        self._lock = threading.Lock()
        self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        threads = max(1, (os.cpu_count() or 1) // (2 * self.workers))
        pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_load, initargs=(*self._args, threads))
        with blank_main():
            for _ in range(self.workers):  # starts every process now; each loads the processor meanwhile
                pool.submit(_ready)
        return pool

    def __call__(self, kwargs: dict[str, Any], media: str, items: list[Any]) -> dict[str, torch.Tensor]:
        """The processor's tensors for `processor(**kwargs, media=items)` (images as PIL images or arrays, or
        videos as frame arrays), from a worker process."""
        block_name, layout = _pack({f"{media}{i}": np.asarray(item) for i, item in enumerate(items)})
        try:
            for attempt in range(2):
                pool = self._pool
                try:
                    out_name, out_layout = pool.submit(_run, kwargs, media, block_name, layout).result()
                    return {name: torch.from_numpy(array)
                            for name, array in _unpack(out_name, out_layout, unlink=True).items()}
                except BrokenProcessPool as exc:
                    with self._lock:
                        if self._pool is pool:  # the first thread to see it replaces the pool
                            pool.shutdown(wait=False, cancel_futures=True)
                            self._pool = self._start()
                    if attempt == 1:
                        raise ProcessorCrashed("the model's processor crashed on this item") from exc
            raise AssertionError("unreachable")
        finally:
            shared_memory.SharedMemory(name=block_name).unlink()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
