"""EngineCore: the model, its KV cache and the scheduler for one device, driven by messages.

Transport-agnostic: the in-process `Engine` calls it from a thread, the server's engine process from a ZMQ
loop. A refused request (bad input) becomes a TokenOutput with `error_status` 400, and a request whose admission
or step fails unexpectedly one with 500 (see `Scheduler._fail_batch`), never an exception that would stop the
loop. What still raises out of `step()` cannot be pinned on a request: the engine process then exits and the
server restarts it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from mmserve.config import ModelConfig, ServerArgs
from mmserve.distributed.parallel_state import get_tp_size
from mmserve.layers.pooler import Pooler
from mmserve.messages import AbortRequest, EngineReady, EngineStats, GenerateRequest, TokenOutput
from mmserve.models.loader import generation_eos_ids, load_hf_config, load_tokenizer, resolve_model_path
from mmserve.multimodal.processors import ProcessorRegistry, ProcessorSpec
from mmserve.runner.model_runner import ModelRunner
from mmserve.scheduler.scheduler import Scheduler, SchedulerStats

logger = logging.getLogger(__name__)


def load_tokenizer_for(args: ServerArgs) -> Any:
    path = args.tokenizer_path or args.model_path
    return load_tokenizer(resolve_model_path(path, args.revision), args.trust_remote_code)


class EngineCore:
    def __init__(self, args: ServerArgs, tokenizer: Any = None):
        if args.tp_size != get_tp_size():
            raise ValueError(f"tp_size {args.tp_size} needs that many ranks in a process group (the server and "
                             f"Engine start them); this process is one of {get_tp_size()}")
        self.args = args
        self.device = args.resolved_device()
        if self.device.type == "cuda" and self.device.index is not None:
            # this thread launches every kernel of the engine; Triton launches on the current device
            torch.cuda.set_device(self.device)
        checkpoint = resolve_model_path(args.model_path, args.revision)
        hf_config = load_hf_config(checkpoint, args.trust_remote_code)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer_for(args)
        eos = generation_eos_ids(checkpoint) or _config_eos(hf_config)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.model_config = ModelConfig.from_hf(hf_config, args, self.device, eos)
        self.runner = ModelRunner(self.model_config, args, checkpoint, self.device)
        self.checkpoint = checkpoint
        # an embedding server pools each prompt's hidden states instead of generating (layers/pooler.py)
        self.pooler = (Pooler.for_model(checkpoint if checkpoint.is_dir() else checkpoint.parent, hf_config,
                                        self.model_config.architectures) if self.model_config.is_embedding else None)
        self.scheduler = Scheduler(args, self.model_config, self.runner, self.tokenizer, pooler=self.pooler)
        if self.device.type == "cuda":
            self.warm_up()

    def warm_up(self) -> SchedulerStats:
        """Prompts of assorted lengths through whole steps before the first request: alone (one prompt's dense
        prefill), together (the batched extend kernel), behind a cached prefix, then decoding. Kernel compilation
        (Triton specialises on integer arguments: 1, divisible by 16, or neither) and the allocator's first blocks
        then never land on a user's time to first token. Leaves nothing behind: the prefix cache is emptied and the
        counters start from zero. Returns the counters of the warm-up itself."""
        start = time.perf_counter()
        warm_encoder = getattr(self.runner.model, "warm_up_encoder", None)
        if warm_encoder is not None:  # a vision tower's kernels, before any user image
            warm_encoder()
        sched, vocab = self.scheduler, self.model_config.vocab_size
        # every prompt (with its cached-prefix variant's 3 more tokens and its output) fits the context and the cache
        longest = max(1, min(512, self.model_config.context_len - 8, sched.chunk_size or 512,
                             self.runner.kv_pool.size - 8))
        lengths = sorted({min(n, longest) for n in (1, 7, 16, 100, 129, longest)})
        params = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}

        def prompt(n: int, salt: int) -> list[int]:
            return [(j * 7919 + salt * 104729) % vocab for j in range(n)]

        def run(batch: list[tuple[str, list[int]]]) -> None:
            for rid, ids in batch:
                sched.add_request(GenerateRequest(rid=rid, input_ids=ids, sampling_params=params,
                                                  embed=self.pooler is not None))
            while sched.has_work():
                sched.step()

        for n in lengths:
            run([(f"warm-up-alone-{n}", prompt(n, n))])
        run([(f"warm-up-batch-{n}", prompt(n, n + 1)) for n in lengths])
        run([(f"warm-up-prefix-{n}", prompt(n, n + 1) + prompt(3, 7)) for n in lengths[-2:]])
        sched.tree.reset()
        ran, sched.stats = sched.stats, SchedulerStats()
        logger.info("warm-up: %d steps over %d prompt lengths in %.1f s", ran.steps, len(lengths),
                    time.perf_counter() - start)
        return ran

    @property
    def processor_spec(self) -> ProcessorSpec | None:
        """The processor side of the model's family (`multimodal/processors/`), by architecture name; None for a
        model that takes text only."""
        from mmserve.config import architectures_of

        return ProcessorRegistry.resolve(architectures_of(self.model_config.hf_config))

    @property
    def is_multimodal(self) -> bool:
        return self.processor_spec is not None

    def handle(self, msg: GenerateRequest | AbortRequest) -> list[TokenOutput]:
        """Take one message; returns outputs only for a refused request. Nothing a request carries can raise out
        of here: bad input is a 400, an unexpected failure while admitting it a 500 for that request alone."""
        if isinstance(msg, AbortRequest):
            self.scheduler.abort(msg.rid)
            return []
        try:
            self.scheduler.add_request(msg)
        except ValueError as exc:
            return [_refusal(msg, str(exc), 400)]
        except Exception as exc:  # noqa: BLE001
            logger.exception("admitting request %s failed", msg.rid)
            return [_refusal(msg, f"internal error while admitting this request ({type(exc).__name__}: {exc})", 500)]
        return []

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[TokenOutput]:
        return self.scheduler.step()

    def ready(self) -> EngineReady:
        return EngineReady(
            context_len=self.model_config.context_len,
            max_total_tokens=self.runner.max_total_tokens,
            max_running_requests=self.runner.max_running_requests,
            vocab_size=self.model_config.vocab_size,
            is_embedding=self.model_config.is_embedding,
            dtype=str(self.model_config.dtype).removeprefix("torch."),
            device=str(self.device),
        )

    def stats(self) -> EngineStats:
        sched = self.scheduler
        pool = self.runner.kv_pool
        return EngineStats(
            running=sched.num_running,
            waiting=len(sched.waiting),
            # slots held by requests (not free, not merely cached and evictable)
            kv_used_tokens=pool.size - pool.available_size() - sched.tree.evictable_size(),
            kv_total_tokens=pool.size,
            prompt_tokens=sched.stats.prompt_tokens,
            cached_tokens=sched.stats.cached_tokens,
            generated_tokens=sched.stats.generated_tokens,
        )


def _refusal(msg: GenerateRequest, message: str, status: int) -> TokenOutput:
    return TokenOutput(rid=msg.rid, new_token_ids=[], finished_reason={"type": "abort", "message": message},
                       prompt_tokens=len(msg.input_ids), completion_tokens=0, cached_tokens=0, error_status=status)


def _config_eos(hf_config: Any) -> set[int]:
    eos = getattr(hf_config, "eos_token_id", None)
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)
