"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, captured once at start-up.

A batch-1 decode step of an 8B model launches hundreds of kernels; launched one by one from Python, the GPU waits
on the CPU for most of the step. A graph replays the whole forward (embedding to logits) with one launch.

Graphs read and write fixed addresses, so the runner owns static input buffers of the largest bucket
(`input_ids`, `positions`, `out_cache_loc`, `req_pool_indices`, `seq_lens`) and each bucket's graph was captured
over the first `bs` rows of them. A step of B requests copies its inputs in, pads rows B..bs with a request of
length 0 (the attention kernels read nothing for it and write zeros; its K/V go to the pool's dummy slot 0), replays
the graph of the smallest bucket >= B, and returns the first B rows of that graph's logits.

What the attention backend must do for this (`AttentionBackend.supports_cuda_graph`): read every per-step value
from device tensors (here the static buffers), size its grid from the batch size alone, and allocate nothing whose
size depends on the data; its per-step metadata is built once at capture over the static buffers. The Triton
backend does; the torch reference backend (Python loops over requests) does not, and runs eagerly.

The logits a replay returns are views into the graph's output buffer: they are valid until the next replay.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from mmserve.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from mmserve.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_bs: int) -> list[int]:
    """Captured batch sizes: every size up to 4, then steps of 8 to 32, 16 to 256, 32 beyond (padding wastes at
    most one step's worth of rows; more buckets cost capture time and graph memory)."""
    if max_bs < 1:
        raise ValueError(f"cuda_graph_max_bs must be >= 1, got {max_bs}")
    sizes = [1, 2, 3, 4, *range(8, 33, 8), *range(48, 257, 16), *range(288, max(max_bs, 288) + 1, 32)]
    picked = [s for s in sizes if s < max_bs]
    return [*picked, max_bs]


class CudaGraphRunner:
    def __init__(self, runner: ModelRunner, max_bs: int, use_graphs: bool = True):
        """`use_graphs=False` keeps the static buffers and padding but runs the forward eagerly: the CPU tests use
        it to check that padded steps give the unpadded results."""
        self.runner = runner
        self.batch_sizes = graph_batch_sizes(max_bs)
        self.max_bs = self.batch_sizes[-1]
        self.use_graphs = use_graphs
        device, n = runner.device, self.max_bs
        mrope = getattr(runner.model, "uses_mrope", False)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros((3, n) if mrope else (n,), dtype=torch.int64, device=device)
        self.out_cache_loc = torch.zeros(n, dtype=torch.int64, device=device)
        self.req_pool_indices = torch.zeros(n, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.batches: dict[int, ForwardBatch] = {}
        self.capture_seconds = 0.0
        self.graph_bytes = 0

    def static_batch(self, bs: int) -> ForwardBatch:
        """A decode batch over the first `bs` rows of the static buffers (all rows of length 0 until filled)."""
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=self.input_ids[:bs],
            positions=self.positions[..., :bs],
            out_cache_loc=self.out_cache_loc[:bs],
            req_pool_indices=self.req_pool_indices[:bs],
            seq_lens=self.seq_lens[:bs],
            seq_lens_cpu=[0] * bs,  # graphs must not depend on host values; backends that read these cannot capture
            extend_lens_cpu=[1] * bs,
            logits_indices=None,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so that the smaller graphs reuse its memory from the shared pool."""
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.runner.device)[0] if self.use_graphs else 0
        pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        stream = torch.cuda.Stream(self.runner.device) if self.use_graphs else None
        total = len(self.batch_sizes)
        last_line = start
        for i, bs in enumerate(reversed(self.batch_sizes)):
            batch = self.static_batch(bs)
            self.runner.attn_backend.init_forward_metadata(batch)
            self.batches[bs] = batch
            if not self.use_graphs:
                continue
            with torch.cuda.stream(stream):
                for _ in range(2):  # compiles the kernels and creates library handles outside the capture
                    self.runner.run_model(batch)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.outputs[bs] = self.runner.run_model(batch)
            self.graphs[bs] = graph
            now = time.perf_counter()
            if now - last_line > 2.0 or i + 1 == total:
                logger.info("capturing CUDA graphs: %d/%d batch sizes (down to %d), %.1f s", i + 1, total, bs,
                            now - start)
                last_line = now
        if self.use_graphs:
            torch.cuda.synchronize(self.runner.device)
            self.graph_bytes = max(0, free_before - torch.cuda.mem_get_info(self.runner.device)[0])
        self.capture_seconds = time.perf_counter() - start

    def can_run(self, batch: ForwardBatch) -> bool:
        return batch.mode == ForwardMode.DECODE and batch.batch_size <= self.max_bs and batch.logits_indices is None

    def bucket(self, batch_size: int) -> int:
        return next(bs for bs in self.batch_sizes if bs >= batch_size)

    @torch.inference_mode()
    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        b = batch.batch_size
        bs = self.bucket(b)
        self.input_ids[:b].copy_(batch.input_ids)
        self.positions[..., :b].copy_(batch.positions)
        self.out_cache_loc[:b].copy_(batch.out_cache_loc)
        self.req_pool_indices[:b].copy_(batch.req_pool_indices)
        self.seq_lens[:b].copy_(batch.seq_lens)
        if bs > b:  # padding rows: length 0, K/V into the dummy slot; their ids and positions stay harmless
            self.seq_lens[b:bs].zero_()
            self.out_cache_loc[b:bs].zero_()
        if not self.use_graphs:
            return self.runner.run_model(self.batches[bs])[:b]
        self.graphs[bs].replay()
        return self.outputs[bs][:b]
