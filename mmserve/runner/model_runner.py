"""ModelRunner: owns the model, the KV cache pools, the attention backend and the sampler on one device.

It builds the model from the checkpoint, sizes the KV cache from a memory budget, and runs one
`ForwardBatch` at a time. It knows nothing about requests; the scheduler builds the batches.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmserve.attention.base import bind_attention, create_attention_backend
from mmserve.cache.kv_pool import KVPool, ReqToTokenPool
from mmserve.config import ModelConfig, ServerArgs
from mmserve.distributed.parallel_state import get_tp_size, min_over_ranks, set_dp_encoder
from mmserve.forward_batch import ForwardBatch
from mmserve.layers import moe
from mmserve.models.loader import iterate_weights
from mmserve.models.registry import ModelRegistry
from mmserve.runner.cuda_graph import CudaGraphRunner, PrefillGraphRunner
from mmserve.runner.sampler import Sampler, SamplerOutput, SamplingBatch

logger = logging.getLogger(__name__)
_CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

_CPU_KV_BUDGET_BYTES = 2 << 30
_CPU_KV_MAX_TOKENS = 131072
# On a GPU, 512 running requests (with graphs up to 512): the weights are read once a step however many requests
# decode, and 1,000 prompts of 256 + 256 tokens ran 3-10% faster than with 256 on the H100 (docs/benchmarks.md)
_DEFAULT_MAX_RUNNING = {"cpu": 32, "cuda": 512}


class ModelRunner:
    def __init__(self, model_config: ModelConfig, args: ServerArgs, checkpoint: Path, device: torch.device):
        self.config = model_config
        self.args = args
        self.device = device
        self.dtype = model_config.dtype
        if self.dtype == torch.float32 and device.type == "cuda":
            # PyTorch lets cuDNN convolutions use TF32 by default: float32 weights should compute in float32, so the
            # towers' patch embeddings (convolutions) match the CPU's and transformers' (process-wide)
            torch.backends.cudnn.allow_tf32 = False
        start = time.perf_counter()
        set_dp_encoder(args.mm_enable_dp_encoder)
        self.model = self._load_model(checkpoint)
        if hasattr(self.model, "encoder_cache") and not hasattr(self.model, "attach_cross_kv"):
            from mmserve.multimodal.encoder_cache import EncoderCache

            self.model.encoder_cache = EncoderCache(args.mm_cache_size_mb << 20)
            self._install_image_prep(checkpoint)
        self.load_seconds = time.perf_counter() - start
        self.max_running_requests = args.max_running_requests or _DEFAULT_MAX_RUNNING.get(device.type, 256)
        # Every rank holds the same requests: the cache is the smallest any rank can hold.
        self.max_total_tokens = min_over_ranks(self._kv_cache_tokens())
        self.max_running_requests = min(self.max_running_requests, self.max_total_tokens)
        tp = get_tp_size()
        # A model whose cross-attention layers read per-request encoder states (Llama 3.2 Vision) has fewer layers
        # with paged KV, and slabs for those states sized with the pool (`cross_kv_bytes_per_token`).
        self.kv_pool = KVPool(self.max_total_tokens, getattr(self.model, "paged_kv_layers", model_config.num_layers),
                              max(1, model_config.num_kv_heads // tp), model_config.head_dim, self.dtype, device)
        # A few spare rows: a request being prefilled in chunks holds one beside the running batch.
        self.req_to_token_pool = ReqToTokenPool(self.max_running_requests + 8, model_config.context_len + 1, device)
        if hasattr(self.model, "attach_cross_kv"):
            self.model.attach_cross_kv(self.max_total_tokens, self.req_to_token_pool.req_to_token.shape[0])
        logit_cap = any(getattr(m, "logit_cap", None) is not None for m in self.model.modules())
        self.attn_backend = create_attention_backend(args.attention_backend, device, logit_cap).bind(
            self.kv_pool, self.req_to_token_pool.req_to_token)
        bind_attention(self.model, self.attn_backend)
        self.sampler = Sampler()
        self.generator = torch.Generator(device=device).manual_seed(args.random_seed)
        self.graph_runner: CudaGraphRunner | None = None
        self.prefill_graph_runner: PrefillGraphRunner | None = None
        if self._use_cuda_graphs():
            self._capture_graphs()

    def _capture_graphs(self) -> None:
        """The vision tower's graphs (a model with `capture_vision_graphs`), prefill graphs (largest first: they
        need the most memory), then decode graphs, in one memory pool."""
        args, device = self.args, self.device
        pool, stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(device)
        free_before = torch.cuda.mem_get_info(device)[0]
        capture_vision = getattr(self.model, "capture_vision_graphs", None)
        if args.vision_cuda_graph_max_patches and capture_vision is not None:
            try:
                with sdpa_kernel(_CUDA_SDPA_BACKENDS):  # as the eager tower runs (embed_inputs)
                    vision = capture_vision(pool, stream, args.vision_cuda_graph_max_patches)
                if vision is not None:
                    logger.info("vision-tower CUDA graphs: %d sizes up to %d patches (%.1f s)", len(vision.buckets),
                                vision.max_patches, vision.capture_seconds)
            except Exception as exc:  # noqa: BLE001 - a tower that cannot be captured: encode eagerly, not fail
                logger.warning("vision-tower CUDA graph capture failed, encoding without graphs (%s)", exc)
                self.model.vision_graphs = None
                torch.cuda.synchronize(device)
        if (args.cuda_graph_max_prefill_tokens and hasattr(self.attn_backend, "init_graph_extend_metadata")
                and getattr(self.model, "supports_prefill_graph", True)):
            self.prefill_graph_runner = PrefillGraphRunner(self, min(args.cuda_graph_max_prefill_tokens,
                                                                     self.config.context_len))
            try:
                self.prefill_graph_runner.capture(pool, stream)
            except RuntimeError as exc:  # an operation that cannot be captured: prefill eagerly
                logger.warning("prefill CUDA graph capture failed, prefilling without graphs (%s)", exc)
                self.prefill_graph_runner = None
                torch.cuda.synchronize(device)
        self.graph_runner = CudaGraphRunner(self, min(args.cuda_graph_max_bs or 512, self.max_running_requests))
        try:
            self.graph_runner.capture(pool, stream)
        except RuntimeError as exc:  # serve eagerly rather than not at all
            logger.warning("CUDA graph capture failed, decoding without graphs (%s)", exc)
            self.graph_runner = None
            torch.cuda.synchronize(device)
        torch.cuda.synchronize(device)
        graph_mib = max(0, free_before - torch.cuda.mem_get_info(device)[0]) / 2**20
        prefill = self.prefill_graph_runner
        decode = self.graph_runner
        logger.info("CUDA graphs: decode %s, prefill %s; %.0f MiB of graph memory; KV cache of %d tokens",
                    f"{len(decode.batch_sizes)} batch sizes up to {decode.max_bs} ({decode.capture_seconds:.1f} s)"
                    if decode else "off",
                    f"{len(prefill.token_buckets)} sizes up to {prefill.max_tokens} tokens "
                    f"({prefill.capture_seconds:.1f} s)" if prefill else "off", graph_mib, self.max_total_tokens)

    def release_graphs(self) -> None:
        """Drop every captured graph after the device's work is done: before a tensor-parallel rank leaves its
        process group, whose collectives the graphs hold (NCCL then tears down without graphs that use it)."""
        if self.device.type != "cuda":
            return
        torch.cuda.synchronize(self.device)
        self.graph_runner = self.prefill_graph_runner = None
        if getattr(self.model, "vision_graphs", None) is not None:
            self.model.vision_graphs = None
        gc.collect()

    def _install_image_prep(self, checkpoint: Path) -> None:
        """The image processor in this process, for families whose images the API process sends resized, as uint8
        (--mm-image-prep, resolved as the API process resolves it; its import of torchvision is 1.4 s of start-up
        that a CPU engine of the API-side default skips). Misses go through it; it passes processed items as
        they are."""
        from mmserve.multimodal.processors import ProcessorRegistry

        spec = ProcessorRegistry.resolve(self.config.architectures)
        if spec is None or spec.image_grid is None or not self.args.images_prepared_in_engine():
            return
        from mmserve.models.loader import split_gguf
        from mmserve.multimodal.image_prep import EngineImagePrep

        prep = EngineImagePrep(split_gguf(checkpoint)[0], self.args.trust_remote_code, self.device)
        if self.device.type == "cuda":  # the first call's kernel loads, off the first image's time to first token
            side = prep.processor.patch_size * prep.processor.merge_size
            prep.processor(images=[torch.zeros(3, side, side, dtype=torch.uint8, device=self.device)],
                           do_resize=False, return_tensors="pt")
        self.model.encoder_cache.prepare = prep

    def _use_cuda_graphs(self) -> bool:
        if self.device.type != "cuda" or self.args.disable_cuda_graph or self.config.is_embedding:
            return False  # an embedding server never decodes, and its prefill steps return hidden states
        if not getattr(self.model, "supports_cuda_graph", True):
            logger.info("CUDA graphs off: %s cannot be captured", type(self.model).__name__)
            return False
        if not self.attn_backend.supports_cuda_graph:
            logger.info("CUDA graphs off: the %s attention backend cannot be captured",
                        type(self.attn_backend).__name__)
            return False
        if not moe.capturable(self.model):
            logger.info("CUDA graphs off: the %s experts run without torch's native grouped matmul, which "
                        "reads counts back to the host", self.dtype)
            return False
        return True

    def _load_model(self, checkpoint: Path) -> torch.nn.Module:
        cls = ModelRegistry.resolve(self.config.architectures)
        if self.config.is_embedding and cls.__name__.endswith("ForCausalLM"):
            # --is-embedding on a causal checkpoint (gte-Qwen2, Qwen3-Embedding): its family's decoder without the
            # LM head when there is one; otherwise the causal model returns hidden states (ForwardBatch.pooling)
            bare = cls.__name__.removesuffix("ForCausalLM") + "Model"
            cls = ModelRegistry.resolve([bare]) if bare in ModelRegistry.supported() else cls
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = cls(self.config.hf_config)
        finally:
            torch.set_default_dtype(previous)
        if self.args.load_format == "dummy":
            return _randomize(model, self.args.random_seed).eval()
        progress = LoadProgress(checkpoint)
        loaded = model.load_weights(progress.track(iterate_weights(checkpoint, self.config.hf_config,
                                                                   on_count=progress.set_total)))
        progress.finish()
        missing = {name for name, _ in model.named_parameters()} - loaded
        tied = {"lm_head.weight"} if getattr(model, "tied", False) else set()
        if missing - tied:
            raise ValueError(f"checkpoint {checkpoint} lacks weights for {sorted(missing - tied)[:8]}")
        return model.eval()

    def _kv_cache_tokens(self) -> int:
        if self.args.max_total_tokens:
            return self.args.max_total_tokens
        # More than every running request at full context could never be used.
        useful = self.max_running_requests * self.config.context_len
        paged_layers = getattr(self.model, "paged_kv_layers", self.config.num_layers)
        per_token = KVPool.bytes_per_token(paged_layers, max(1, self.config.num_kv_heads // get_tp_size()),
                                           self.config.head_dim, self.dtype)
        # a model with cross-attention slabs (Llama 3.2 Vision) takes its share of the budget per token of KV
        per_token += getattr(self.model, "cross_kv_bytes_per_token", 0)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            fraction = self.args.mem_fraction_static or 0.85
            budget = free - total * (1 - fraction)
            if budget <= per_token * 16:
                raise ValueError(f"not enough GPU memory for the KV cache: {free / 2**30:.1f} GiB free of "
                                 f"{total / 2**30:.1f} GiB; raise --mem-fraction-static or use a smaller model")
            return int(min(budget // per_token, useful))
        return int(min(_CPU_KV_BUDGET_BYTES // per_token, _CPU_KV_MAX_TOKENS, useful))

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """float32 logits of the rows in batch.logits_indices (all rows when None). A decode batch or a short
        text prefill that a captured graph covers replays it; the logits are then valid until the next forward."""
        if self.graph_runner is not None and self.graph_runner.can_run(batch):
            return self.graph_runner.replay(batch)
        if self.prefill_graph_runner is not None and self.prefill_graph_runner.can_run(batch):
            return self.prefill_graph_runner.replay(batch)
        self.attn_backend.init_forward_metadata(batch)
        return self.run_model(batch)

    def run_model(self, batch: ForwardBatch, input_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The model's forward on a batch whose attention metadata is ready (also what a CUDA graph captures);
        `input_embeds`: start from these embeddings (a model with `embed`) instead of the input ids."""
        extra = {} if input_embeds is None else {"input_embeds": input_embeds}
        if self.device.type != "cuda":
            return self.model(batch.input_ids, batch.positions, batch, **extra)
        # Every SDPA call of the step (prefill, vision towers) without cuDNN's attention: it builds a plan per new
        # shape, which put ~100 ms on the first request of each prompt length on the H100, and ran slower than
        # flash attention even for lengths it had seen (docs/benchmarks.md, "time to first token").
        with sdpa_kernel(_CUDA_SDPA_BACKENDS):
            return self.model(batch.input_ids, batch.positions, batch, **extra)

    def embed_inputs(self, batch: ForwardBatch) -> torch.Tensor:
        """A model's input embeddings for the step (`model.embed`: media encoded and placed), run eagerly."""
        if self.device.type != "cuda":
            return self.model.embed(batch.input_ids, batch)
        with sdpa_kernel(_CUDA_SDPA_BACKENDS):
            return self.model.embed(batch.input_ids, batch)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, sampling: SamplingBatch) -> SamplerOutput:
        return self.sampler(logits, sampling)


class LoadProgress:
    """Log lines while the weights stream in, for a start-up that may take minutes: one when loading starts, one
    at each tenth of the tensors (when their number is known; else every `interval_s`) if `interval_s` has passed
    since the last, and the total at the end. A small model logs only its first and last line."""

    interval_s = 2.0

    def __init__(self, checkpoint: Path):
        self.checkpoint = checkpoint
        self.total: int | None = None
        self.count = self.bytes = 0
        self.start = self.last_line = time.perf_counter()
        how = " (de-quantizing the GGUF file first)" if checkpoint.suffix == ".gguf" else ""
        logger.info("loading weights from %s%s", checkpoint, how)

    def set_total(self, total: int) -> None:
        self.total = total

    def track(self, weights: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            yield name, tensor
            self._advance(tensor.numel() * tensor.element_size())

    def _advance(self, nbytes: int) -> None:
        self.count += 1
        self.bytes += nbytes
        now = time.perf_counter()
        if now - self.last_line < self.interval_s:
            return
        so_far = f"{self.bytes / 2**30:.2f} GiB, {now - self.start:.0f} s"
        if self.total:
            if self.count % max(1, self.total // 10) and self.count != self.total:
                return
            logger.info("loading weights: %d%% (%d/%d tensors, %s)", min(100, round(100 * self.count / self.total)),
                        self.count, self.total, so_far)
        else:
            logger.info("loading weights: %d tensors (%s)", self.count, so_far)
        self.last_line = now

    def finish(self) -> None:
        logger.info("loaded %d tensors (%.2f GiB) in %.1f s", self.count, self.bytes / 2**30,
                    time.perf_counter() - self.start)


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights for --load-format dummy: small normal values, norms at one, reproducible by seed."""
    generator = None
    for name, param in model.named_parameters():
        if generator is None:
            generator = torch.Generator(device=param.device).manual_seed(seed)
        if "norm" in name:
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=generator)
    return model
