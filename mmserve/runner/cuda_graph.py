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

Short prefills are launch-bound too (a 128-token prompt of an 8B model: ~18 ms of CPU against ~8 ms of GPU), so
`PrefillGraphRunner` captures extend steps by token count: buckets up to
`--cuda-graph-max-prefill-tokens`, each twice where the backend has a dense path (every prompt fresh: flash
attention; some cached prefix: the extend kernel). A step of T tokens from B <= 16 requests fills the first T rows
and B requests of the static buffers; requests B..15 get length 0, and the bucket's remaining tokens form one
padding request that attends only to itself through the request-to-token table's padding row (every position the
dummy slot 0), so every row the graph computes is finite and nothing live is read or written. Prompt lengths then
reuse a handful of captured shapes: no per-length work on a user's time to first token. A vision-language model
(one with `embed`) is captured from its input embeddings: a step's media are encoded eagerly, their embeddings
copied into a static buffer, and the language model replayed; a text model's graphs start from the ids.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from mmserve.attention.base import AttentionType
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
        # a model may keep a step off the graphs (Llama 3.2 Vision: a request whose images are outside its slabs)
        self.model_allows = getattr(runner.model, "decode_capturable", None)
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
    def capture(self, pool=None, stream: torch.cuda.Stream | None = None) -> None:
        """Capture every bucket, largest first so that the smaller graphs reuse its memory from the shared pool
        (`pool` and `stream`: those of the prefill graphs captured before, when there are)."""
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.runner.device)[0] if self.use_graphs else 0
        if self.use_graphs:
            pool = pool if pool is not None else torch.cuda.graph_pool_handle()
            stream = stream if stream is not None else torch.cuda.Stream(self.runner.device)
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
        return (batch.mode == ForwardMode.DECODE and batch.batch_size <= self.max_bs and batch.logits_indices is None
                and (self.model_allows is None or self.model_allows(batch)))

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


# Requests a captured prefill step holds (at most this many logits rows too); a padding request comes on top.
PREFILL_GRAPH_MAX_REQS = 16


def prefill_token_buckets(max_tokens: int) -> list[int]:
    """Captured prefill sizes in tokens: doubling to 128, steps of 64 to 512, of 128 beyond (a prefill under ~256
    tokens reads the weights in about the time it computes, so padding it costs little; above, each bucket wastes
    at most a fifth of the step)."""
    if max_tokens < 1:
        raise ValueError(f"cuda_graph_max_prefill_tokens must be >= 1 to capture, got {max_tokens}")
    sizes = [16, 32, 64, 128, *range(192, 513, 64), *range(640, max(max_tokens, 640) + 1, 128)]
    picked = [s for s in sizes if s < max_tokens]
    return [*picked, max_tokens]


class PrefillGraphRunner:
    def __init__(self, runner: ModelRunner, max_tokens: int, use_graphs: bool = True):
        """`use_graphs=False`: static buffers, buckets and padding request as on a GPU, the forward run eagerly
        (the CPU tests)."""
        self.runner = runner
        self.token_buckets = prefill_token_buckets(max_tokens)
        self.max_tokens = self.token_buckets[-1]
        self.use_graphs = use_graphs
        # Where the backend takes prompts with nothing cached another way (flash attention), each bucket is
        # captured for both kinds of step; otherwise one graph serves both.
        self.dense = bool(getattr(runner.attn_backend, "dense_prefill", False))
        device, n, r = runner.device, self.max_tokens, PREFILL_GRAPH_MAX_REQS
        mrope = getattr(runner.model, "uses_mrope", False)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros((3, n) if mrope else (n,), dtype=torch.int64, device=device)
        self.out_cache_loc = torch.zeros(n, dtype=torch.int64, device=device)
        self.logits_indices = torch.zeros(r, dtype=torch.int64, device=device)
        # r requests and the padding request (its row of the table is the all-zeros padding row)
        self.req_pool_indices = torch.zeros(r + 1, dtype=torch.int64, device=device)
        self.req_pool_indices[r] = runner.req_to_token_pool.padding_row
        self.seq_lens = torch.zeros(r + 1, dtype=torch.int64, device=device)
        # int32 rows for the kernels: query offsets [r + 1], new-token counts [r + 1], prompt offsets [r + 2]
        self.lens32 = torch.zeros(3 * r + 4, dtype=torch.int32, device=device)
        self.logits = torch.zeros(r, runner.config.vocab_size, dtype=torch.float32, device=device)
        # A model with `embed` (the vision-language ones) is captured from its input embeddings: a step computes
        # them eagerly (its media encoded and placed) into this buffer and replays the language model, so steps
        # with images replay graphs too.
        self.from_embeds = getattr(runner.model, "embed", None) is not None
        self.input_embeds = None
        if self.from_embeds:
            width = runner.model.model.embed_tokens.weight.shape[1]
            self.input_embeds = torch.zeros(n, width, dtype=runner.dtype, device=device)
        # A model with bidirectional layers (Gemma 3's image spans) gets each bucket captured once more, with a
        # table of each new token's last visible key that a replay rewrites like the rows above: its steps with
        # images replay too. Such a step takes the extend kernel in every layer, cached prefix or not.
        self.spans = any(getattr(m, "attn_type", None) is AttentionType.DECODER_BIDIRECTIONAL
                         for m in runner.model.modules())
        self.last_keys = torch.zeros(n, dtype=torch.int32, device=device) if self.spans else None
        # keyed by (tokens, fresh: nothing cached, spans: the last-keys table in force)
        self.graphs: dict[tuple[int, bool, bool], torch.cuda.CUDAGraph] = {}
        self.batches: dict[tuple[int, bool, bool], ForwardBatch] = {}
        self.capture_seconds = 0.0

    def static_batch(self, tokens: int, fresh: bool, spans: bool = False) -> ForwardBatch:
        r = PREFILL_GRAPH_MAX_REQS
        batch = ForwardBatch(
            mode=ForwardMode.EXTEND,
            input_ids=self.input_ids[:tokens],
            positions=self.positions[..., :tokens],
            out_cache_loc=self.out_cache_loc[:tokens],
            req_pool_indices=self.req_pool_indices,
            seq_lens=self.seq_lens,
            seq_lens_cpu=[0] * (r + 1),  # graphs must not depend on host values
            extend_lens_cpu=[0] * (r + 1),
            logits_indices=self.logits_indices,
        )
        cu_seqlens = self.lens32[2 * r + 2:] if fresh else None
        self.runner.attn_backend.init_graph_extend_metadata(batch, self.lens32[: r + 1],
                                                            self.lens32[r + 1: 2 * r + 2], cu_seqlens,
                                                            self.last_keys[:tokens] if spans else None)
        return batch

    def keys(self) -> list[tuple[int, bool, bool]]:
        kinds = [(True, False), (False, False)] if self.dense else [(False, False)]
        if self.spans:
            kinds.append((False, True))
        return [(t, fresh, spans) for t in reversed(self.token_buckets) for fresh, spans in kinds]

    @torch.inference_mode()
    def capture(self, pool=None, stream: torch.cuda.Stream | None = None) -> None:
        """Capture every bucket, largest first (they share the memory pool, and with it the decode graphs')."""
        start = time.perf_counter()
        last_line = start
        keys = self.keys()
        for i, key in enumerate(keys):
            batch = self.static_batch(*key)
            self.batches[key] = batch
            if not self.use_graphs:
                continue
            self._set_padding(0, [], key[0], [])  # one padding request of the whole bucket while capturing
            if key[2]:
                self._set_last_keys([], 0, key[0])
            embeds = self.input_embeds[: key[0]] if self.from_embeds else None
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.logits.copy_(self.runner.run_model(batch, embeds))
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                # copied into one buffer that every bucket shares, so no graph keeps a logits tensor of its own
                self.logits.copy_(self.runner.run_model(batch, embeds))
            self.graphs[key] = graph
            now = time.perf_counter()
            if now - last_line > 2.0 or i + 1 == len(keys):
                logger.info("capturing prefill CUDA graphs: %d/%d (down to %d tokens), %.1f s", i + 1, len(keys),
                            key[0], now - start)
                last_line = now
        self.capture_seconds = time.perf_counter() - start

    def can_run(self, batch: ForwardBatch) -> bool:
        return (batch.mode == ForwardMode.EXTEND and 0 < batch.input_ids.shape[0] <= self.max_tokens
                and batch.batch_size <= PREFILL_GRAPH_MAX_REQS and batch.logits_indices is not None
                and batch.logits_indices.shape[0] <= PREFILL_GRAPH_MAX_REQS
                and (self.from_embeds or batch.mm_inputs is None or all(m is None for m in batch.mm_inputs))
                and (batch.bidirectional_spans is None or self.spans))

    def _set_padding(self, tokens: int, lens: list[int], bucket: int, seq_lens: list[int]) -> None:
        """The int rows of a step of `lens` new tokens per request (total `tokens`, KV lengths after the step
        `seq_lens`) padded to `bucket` tokens and PREFILL_GRAPH_MAX_REQS requests."""
        r = PREFILL_GRAPH_MAX_REQS
        b, pad = len(lens), bucket - tokens
        starts, offset = [], 0
        for n in lens:
            starts.append(offset)
            offset += n
        starts += [tokens] * (r + 1 - b)
        extend = [*lens, *[0] * (r - b), pad]
        cu = [*starts, bucket]  # request i at cu[i]:cu[i + 1]; the unused ones empty, the padding request last
        host = torch.tensor(starts + extend + cu, dtype=torch.int32, pin_memory=self.input_ids.is_cuda)
        self.lens32.copy_(host, non_blocking=True)
        seq = [*seq_lens, *[0] * (r - b), pad]
        self.seq_lens.copy_(torch.tensor(seq, dtype=torch.int64, pin_memory=self.input_ids.is_cuda),
                            non_blocking=True)

    def _set_last_keys(self, last_keys: list[int], tokens: int, bucket: int) -> None:
        """The step's last visible key per new token, then the padding request's tokens, causal (0, 1, ...)."""
        host = torch.tensor([*last_keys, *range(bucket - tokens)], dtype=torch.int32,
                            pin_memory=self.input_ids.is_cuda)
        self.last_keys[:bucket].copy_(host, non_blocking=True)

    @torch.inference_mode()
    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        """The step's logits rows ([len(logits_indices), vocab], valid until the next prefill replay)."""
        t, b, rows = batch.input_ids.shape[0], batch.batch_size, batch.logits_indices.shape[0]
        bucket = next(n for n in self.token_buckets if n >= t)
        last_keys = batch.span_last_keys() if self.spans else None  # None too when no span holds a new token
        spans = last_keys is not None
        fresh = self.dense and not spans and not any(batch.prefix_lens_cpu)
        if spans:
            self._set_last_keys(last_keys, t, bucket)
        if self.from_embeds:  # media encoded eagerly (the tower is not in the graph), the language model replayed
            self.input_embeds[:t].copy_(self.runner.embed_inputs(batch))
        self.input_ids[:t].copy_(batch.input_ids)
        self.positions[..., :t].copy_(batch.positions)
        self.out_cache_loc[:t].copy_(batch.out_cache_loc)
        if bucket > t:
            self.out_cache_loc[t:bucket].zero_()  # padding tokens' K/V into the dummy slot
        self.req_pool_indices[:b].copy_(batch.req_pool_indices)
        self._set_padding(t, batch.extend_lens_cpu, bucket, batch.seq_lens_cpu)
        self.logits_indices[:rows].copy_(batch.logits_indices)
        self.logits_indices[rows:].zero_()  # left from a larger step, they could point past this bucket
        if not self.use_graphs:
            embeds = self.input_embeds[:bucket] if self.from_embeds else None
            self.logits.copy_(self.runner.run_model(self.batches[bucket, fresh, spans], embeds))
        else:
            self.graphs[bucket, fresh, spans].replay()
        return self.logits[:rows]
