"""Scheduler: continuous batching over the paged KV cache with a radix prefix cache.

Each `step()` runs one batch: a prefill (EXTEND) batch when waiting requests can be admitted or a chunked
prefill is in progress, otherwise a decode batch of every running request. Requests join and leave at
every step. When a decode step cannot get KV slots even after evicting the prefix cache, the newest
running requests are retracted: their KV goes back to the cache (evictable) and they wait at the front
of the queue to be recomputed from prompt + output so far, so their output is unchanged.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmserve.cache.radix_cache import RadixCache
from mmserve.config import ModelConfig, ServerArgs
from mmserve.constrained.grammar import GrammarCompiler
from mmserve.forward_batch import ForwardBatch, ForwardMode
from mmserve.layers.pooler import Pooler
from mmserve.messages import GenerateRequest, TokenOutput
from mmserve.multimodal.inputs import MultimodalInputs, from_wire
from mmserve.runner.model_runner import ModelRunner
from mmserve.runner.sampler import PenaltyState, SamplingBatch
from mmserve.sampling_params import SamplingParams
from mmserve.scheduler.policy import order_waiting
from mmserve.scheduler.req import Req, ReqStatus
from mmserve.tokenizer.detokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)

# Admission keeps room for the tokens running requests are expected to generate: this fraction of what
# they may still produce. Too high wastes memory, too low causes retractions; retraction raises it again.
_INIT_NEW_TOKEN_RATIO = 0.5
_MIN_NEW_TOKEN_RATIO = 0.1
_NEW_TOKEN_RATIO_DECAY = 0.002
_MAX_RESERVE_PER_REQ = 4096


@dataclass
class SchedulerStats:
    steps: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    overlapped_steps: int = 0  # decode steps launched before the previous step's ids were read
    mixed_steps: int = 0  # prefill steps that also decoded the running requests (--enable-mixed-chunk)
    retractions: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0


@dataclass
class _InflightDecode:
    """A decode step launched and not yet read back (overlap scheduling)."""

    reqs: list[Req]
    next_ids: torch.Tensor  # [B] sampled ids on the device: a chained step's input ids
    host_ids: torch.Tensor  # [B] their copy in pinned host memory, complete once `ready` has passed
    ready: torch.cuda.Event | None  # None on the CPU, where nothing runs asynchronously


class Scheduler:
    def __init__(self, args: ServerArgs, model_config: ModelConfig, runner: ModelRunner, tokenizer=None,
                 pooler: Pooler | None = None):
        self.args = args
        self.pooler = pooler  # an embedding server: every request is prefilled and pooled, never decoded
        self.model_config = model_config
        self.runner = runner
        self.tokenizer = tokenizer  # for stop strings and grammars
        self._grammars: GrammarCompiler | None = None
        self.device = runner.device
        self.kv_pool = runner.kv_pool
        self.req_pool = runner.req_to_token_pool
        self.tree = RadixCache(self.kv_pool, disable=args.disable_radix_cache)
        self.chunk_size = args.resolved_chunked_prefill_size()
        self.max_running = runner.max_running_requests
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.chunked: Req | None = None  # a request whose prompt is being prefilled over several steps
        self.reqs: dict[str, Req] = {}
        self.new_token_ratio = _INIT_NEW_TOKEN_RATIO
        self.stats = SchedulerStats()
        self._step_committed = True  # False while a step's placed slots hold no computed KV yet
        self._mrope = getattr(runner.model, "uses_mrope", False)
        # Gemma 3: each image's tokens see each other both ways, so prefill steps carry the spans (and end no chunk
        # inside one)
        self._bidirectional = bool(getattr(runner.model, "bidirectional_media", False))
        self._pin = self.device.type == "cuda"  # host staging in pinned memory, so copies to the GPU never wait
        # the decode step's device inputs ([token, kv_len, row(, M-RoPE position)] x B) and its new slots
        self._decode_inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        # overlap scheduling (see step()); on the CPU nothing runs asynchronously, so it would only cost a step's
        # work per finished request (tests turn it on to check the bookkeeping)
        self.overlap = self.device.type == "cuda" and not args.disable_overlap_schedule
        self._inflight: _InflightDecode | None = None
        # a vision-language model's encoder outputs by media hash: the step's encoder work is budgeted from it
        self.encoder_cache = getattr(runner.model, "encoder_cache", None)
        # told when a request's row is freed: a model that keeps per-request state by row (Llama 3.2 Vision's images)
        self._row_released = getattr(runner.model, "release_row", None)
        # an item's encoder output rows, where they are not its placeholder tokens (Llama 3.2 Vision: one token, all
        # of the image's tiles through the tower)
        self._encoder_cost_of = getattr(runner.model, "encoder_cost", None)
        # a model that keeps running requests' encoder states in slabs of its own (Llama 3.2 Vision) admits a request
        # only while its new media fit there beside the running ones'
        self._cross_rows_needed = getattr(runner.model, "cross_rows_needed", None)

    # ----- requests in and out -----

    def add_request(self, request: GenerateRequest) -> None:
        """Validate and queue a request; bad input raises ValueError with the user's words."""
        if request.embed != (self.pooler is not None):
            raise ValueError("this server serves an embedding model: use /v1/embeddings (Engine.encode), not "
                             "generation" if self.pooler is not None else
                             "this server serves a generative model: it has no embeddings (start one with "
                             "--is-embedding)")
        # an embedding request generates nothing, so it reserves no room for output
        params = SamplingParams.from_dict(request.sampling_params if not request.embed else {"max_new_tokens": 0})
        if request.rid in self.reqs:
            raise ValueError(f"duplicate request id {request.rid!r}")
        prompt_len = len(request.input_ids)
        if prompt_len == 0:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        self._check_params(params, vocab)
        mm = None
        if request.mm_inputs is not None:
            device = self.device if self.args.keep_mm_feature_on_device else "cpu"
            mm = from_wire(request.mm_inputs, device)
        input_ids = mm.padded_ids(request.input_ids) if mm is not None else list(request.input_ids)
        media = {i for item in (mm.items if mm else []) for i in range(item.offset, item.end)}
        if any(not 0 <= t < vocab for i, t in enumerate(input_ids) if i not in media):
            raise ValueError(f"input_ids must be in [0, {vocab})")
        context = self.model_config.context_len
        if prompt_len >= context + request.embed:
            expanded = " after expanding multimodal tokens" if request.mm_inputs is not None else ""
            room = "" if request.embed else " (room must remain for at least one output token)"
            raise ValueError(f"the prompt is too long{expanded}: {prompt_len} tokens, but the context length is "
                             f"{context} tokens{room}")
        max_new = min(params.max_new_tokens, context - prompt_len, self._position_room(mm, prompt_len))
        if prompt_len + max_new > self.kv_pool.size:
            raise ValueError(f"the request needs {prompt_len + max_new} tokens of KV cache ({prompt_len} prompt + "
                             f"{max_new} max_new_tokens) but the cache holds {self.kv_pool.size}; "
                             "lower max_new_tokens or raise --max-total-tokens")
        eos = set() if params.ignore_eos else set(self.model_config.eos_token_ids)
        if not -1 <= request.logprob_start_len < prompt_len:
            raise ValueError(f"logprob_start_len {request.logprob_start_len} must be -1 (none) or in [0, the prompt "
                             f"length {prompt_len})")
        req = Req(request.rid, input_ids, params, eos, context, request.return_logits,
                  logprob_start_len=request.logprob_start_len, mm=mm)
        # Penalties and stop strings look at the prompt as the client wrote it: media placeholders are the model's
        # own tokens there (as transformers' input_ids have them), not the pad values that stand for their content.
        if params.needs_penalty_state:
            req.penalty = PenaltyState.create(list(request.input_ids), vocab, self.device)
        if params.grammar is not None:
            req.grammar = self._grammar_compiler().grammar(*params.grammar)
        if params.stop:
            if self.tokenizer is None:
                raise ValueError("stop strings need a tokenizer")
            req.stop_detokenizer = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens,
                                                          params.spaces_between_special_tokens,
                                                          prompt_ids=list(request.input_ids))
        if request.embed:
            req.pool_span = self.pooler.span(input_ids)
        elif max_new == 0 and req.logprob_start_len < 0:  # with prompt log-probs, the prompt still runs
            req.finished_reason = {"type": "length", "length": 0}
        self.reqs[req.rid] = req
        self.waiting.append(req)

    def _grammar_compiler(self) -> GrammarCompiler:
        """Built at the first request with a grammar (the tokenizer's token table takes a moment)."""
        if self._grammars is None:
            if self.tokenizer is None:
                raise ValueError("constrained decoding (json_schema, regex, ebnf) needs a tokenizer")
            self._grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size,
                                             self.model_config.eos_token_ids)
        return self._grammars

    def _check_params(self, params: SamplingParams, vocab: int) -> None:
        """Limits that depend on the server or the model (SamplingParams checks the rest)."""
        if params.top_logprobs_num > self.args.max_logprobs:
            raise ValueError(f"top_logprobs_num must be <= {self.args.max_logprobs} (the server's --max-logprobs), "
                             f"got {params.top_logprobs_num}")
        bad = next((t for t in params.stop_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"stop_token_ids must be in [0, {vocab}), got {bad}")
        bad = next((t for t in params.logit_bias if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"logit_bias key {str(bad)!r} is outside the vocabulary [0, {vocab})")

    def _position_room(self, mm: MultimodalInputs | None, prompt_len: int) -> int:
        """How many tokens may follow the prompt before a rotary position passes the model's table.

        Plain prompts use positions 0..len-1, which the context check bounds. M-RoPE positions of media can run
        far ahead of the token count (a video's time axis grows with its duration, not its frames), so they are
        checked by value."""
        if mm is None or mm.mrope_positions is None or not self.model_config.max_position:
            return self.model_config.context_len
        last = int(mm.mrope_positions.max())
        room = self.model_config.max_position - 1 - last
        if room < 1:
            raise ValueError(f"the media in this prompt span rotary positions up to {last}, past the model's "
                             f"{self.model_config.max_position} positions (a video too long, or declared at a "
                             "very low frame rate); send a shorter video or fewer frames")
        return room

    def abort(self, rid: str) -> None:
        req = self.reqs.get(rid)
        if req is not None and not req.finished:
            req.abort("aborted by the client")

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked or self._inflight)

    @property
    def num_running(self) -> int:
        return len(self.running) + (self.chunked is not None)

    # ----- one step -----

    def step(self) -> list[TokenOutput]:
        """Run one batch and return what each affected request produced.

        With overlap scheduling a decode step is launched and left running: the next call launches the step after
        it from the sampled ids still on the device, and only then reads the first step's ids and does its
        bookkeeping (stop checks, finishing, outputs) while the GPU works on the second. A step that needs the ids
        on the host first (a prefill, a retraction, sampling that depends on them) waits for them instead."""
        prev, self._inflight = self._inflight, None
        if prev is not None:
            if self._can_chain(prev):
                self._chain(prev)
                return self._collect_outputs()
            self._process_decode(prev)
        self._drop_finished_before_running()
        # decode rows mixed into a prefill step take part of its token budget: not more than half of it
        mixed = self.args.enable_mixed_chunk and 0 < len(self.running) <= self._prefill_budget() // 2
        batch = self._schedule_prefill(reserve=len(self.running) if mixed else 0)
        mode = ForwardMode.EXTEND
        if batch and mixed:
            batch += self._mixed_decode_rows()
        if not batch:
            batch, mode = self._schedule_decode(), ForwardMode.DECODE
        if batch:
            self._step_committed = False
            try:
                if mode == ForwardMode.DECODE and self.overlap and all(r.can_sample_ahead for r, _ in batch):
                    self._inflight = self._launch_decode(batch)
                else:
                    self._run(batch, mode)
            except Exception as exc:  # noqa: BLE001 - one batch's failure must not end the engine
                self._fail_batch(batch, exc)
        return self._collect_outputs()

    # ----- overlap scheduling -----

    def _can_chain(self, prev: _InflightDecode) -> bool:
        """Whether the step after `prev` can be launched before `prev`'s ids are read: only more decoding of the
        same requests (nothing waiting, or no free row for it), with free slots at hand (no eviction, no
        retraction)."""
        keep = [r for r in prev.reqs if not r.finished]
        nothing_to_admit = not self.waiting or len(self.running) >= self.max_running
        return (self.overlap and bool(keep) and nothing_to_admit and self.chunked is None
                and all(r.can_sample_ahead for r in keep) and self.kv_pool.available_size() >= len(keep))

    def _chain(self, prev: _InflightDecode) -> None:
        keep = [i for i, r in enumerate(prev.reqs) if not r.finished]  # aborted ones drop out now
        reqs = [prev.reqs[i] for i in keep]
        input_ids = prev.next_ids
        if len(keep) < len(prev.reqs):
            input_ids = input_ids[torch.tensor(keep, dtype=torch.int64, device=self.device)]
        self.new_token_ratio = max(_MIN_NEW_TOKEN_RATIO, self.new_token_ratio - _NEW_TOKEN_RATIO_DECAY)
        batch = self._place_decode(reqs)
        self._step_committed = False
        self.stats.overlapped_steps += 1
        # A grammar's next mask needs `prev`'s tokens: they are read after this step's forward is launched and
        # before it samples, so the host's reading and mask filling run while the GPU computes the forward.
        processed = False

        def read_prev() -> None:
            nonlocal processed
            self._process_decode(prev)
            processed = True

        needs_prev = any(r.grammar is not None for r in reqs)
        try:
            self._inflight = self._launch_decode(batch, input_ids, before_sampling=read_prev if needs_prev else None)
        except Exception as exc:  # noqa: BLE001 - as in step()
            self._fail_batch(batch, exc)
        if not processed:
            self._process_decode(prev)

    def _launch_decode(self, batch: list[tuple[Req, int]], input_ids: torch.Tensor | None = None,
                       before_sampling: Callable[[], None] | None = None) -> _InflightDecode:
        """Run a decode step and sample on the device without waiting: the ids come back to pinned host memory
        behind an event. `input_ids` on the device replace the requests' last tokens (a chained step);
        `before_sampling` runs between launching the forward and sampling."""
        forward = self._decode_batch(batch)
        if input_ids is not None:
            forward.input_ids = input_ids
        logits = self.runner.forward(forward)
        self.stats.steps += 1
        self.stats.decode_steps += 1
        reqs = [req for req, _ in batch]
        for req in reqs:
            req.kv_len += 1
        self._step_committed = True
        if before_sampling is not None:
            before_sampling()
        if all(r.params.is_plain_greedy for r in reqs):
            next_ids = logits.argmax(dim=-1)
        else:  # sampling that does not depend on this step's ids (Req.can_sample_ahead)
            next_ids = self.runner.sample(logits, self._sampling_batch(reqs)).next_token_ids
        if self.device.type != "cuda":
            return _InflightDecode(reqs, next_ids, next_ids, None)
        host = torch.empty(next_ids.shape, dtype=next_ids.dtype, pin_memory=True)
        host.copy_(next_ids, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _InflightDecode(reqs, next_ids, host, ready)

    def _process_decode(self, prev: _InflightDecode) -> None:
        """Read a launched step's ids and append them; requests that finish leave (their KV, including what a
        chained step is computing now, goes to the prefix cache: later steps read it after it is written)."""
        if prev.ready is not None:
            prev.ready.synchronize()
        for req, token in zip(prev.reqs, prev.host_ids.tolist(), strict=True):
            if req.finished:  # aborted since the launch, or finished by the step before: its token is dropped
                continue
            req.append_token(token)
            self.stats.generated_tokens += 1
        for req in prev.reqs:
            if req.finished and req.status != ReqStatus.FINISHED:
                self.running.remove(req)
                self._release(req)

    def _fail_batch(self, batch: list[tuple[Req, int]], exc: Exception) -> None:
        """A step raised: end the requests it ran with a 500 and free everything they held, so the engine goes on.

        The step's placed slots (past kv_len) hold no valid KV when the forward failed; they are freed, and the
        computed prefix goes to the radix cache as on any finish. Requests outside the batch are untouched."""
        logger.exception("a step of %d request(s) failed; aborting them: %s", len(batch),
                         ", ".join(req.rid for req, _ in batch))
        message = (f"internal error while running this request ({type(exc).__name__}: {exc}); the request was "
                   "aborted and the server keeps serving")
        for req, n in batch:
            if req.req_pool_idx is not None and not self._step_committed:
                placed = self.req_pool.req_to_token[req.req_pool_idx, req.kv_len : req.kv_len + n]
                self.kv_pool.free(placed.clone())
            req.abort(message)
            req.error_status = 500
            if req in self.running:
                self.running.remove(req)
            if self.chunked is req:
                self.chunked = None
            self._release(req)

    def _drop_finished_before_running(self) -> None:
        """Requests aborted (or with nothing to generate) while waiting or running leave now."""
        for req in [r for r in self.waiting if r.finished]:
            self.waiting.remove(req)
            self._release(req)
        for req in [r for r in self.running if r.finished]:
            self.running.remove(req)
            self._release(req)
        if self.chunked is not None and self.chunked.finished:
            self._release(self.chunked)
            self.chunked = None

    # ----- KV cache bookkeeping -----

    def _alloc_slots(self, n: int) -> torch.Tensor | None:
        if self.kv_pool.available_size() < n:
            self.tree.evict(n - self.kv_pool.available_size())
        return self.kv_pool.alloc(n)

    def _available_tokens(self) -> int:
        return self.kv_pool.available_size() + self.tree.evictable_size()

    def _admit(self, req: Req) -> bool:
        """Give a waiting request a req_to_token row and its cached prefix; False when no row is free."""
        row = self.req_pool.alloc()
        if row is None:
            return False
        # Prompt log-probs need the logits of every prompt position, so such a request computes its prefix; an
        # embedding request computes its pool span (all of a mean-pooled prompt).
        key = req.fill_ids[:-1] if not req.wants_input_logprobs else []
        if req.pool_span is not None:
            key = key[: req.pool_span.start]
        slots, node = self.tree.match_prefix(key)
        self.tree.inc_lock_ref(node)
        req.req_pool_idx, req.last_node = row, node
        req.kv_len = req.cache_len = len(slots)
        self.req_pool.req_to_token[row, : len(slots)] = slots
        if not req.admitted:
            req.cached_tokens = len(slots)
            req.admitted = True
            self.stats.cached_tokens += len(slots)
            self.stats.prompt_tokens += len(req.origin_input_ids)
        return True

    def _cache_prefix(self, req: Req, finished: bool) -> None:
        """Hand the request's computed KV to the radix tree; duplicates of what the tree already had are freed.

        Unfinished requests keep the new tree node locked and continue on the tree's slots.
        """
        if self.tree.disable and not finished:
            return  # nothing is shared: the request keeps owning its slots
        row = self.req_pool.req_to_token[req.req_pool_idx]
        key = req.fill_ids[: req.kv_len]
        slots = row[: req.kv_len].clone()
        already = self.tree.insert(key, slots)
        if already > req.cache_len:
            self.kv_pool.free(slots[req.cache_len : already])
        self.tree.dec_lock_ref(req.last_node)
        if finished:
            req.last_node, req.cache_len = None, 0
            return
        tree_slots, node = self.tree.match_prefix(key)
        self.tree.inc_lock_ref(node)
        row[: len(tree_slots)] = tree_slots
        req.last_node, req.cache_len = node, len(tree_slots)

    def _release(self, req: Req) -> None:
        """A request leaves the engine: its KV goes to the prefix cache, its row back to the pool."""
        self._unpin_media(req)
        if req.req_pool_idx is not None:
            self._cache_prefix(req, finished=True)
            self._free_row(req.req_pool_idx)
            req.req_pool_idx, req.kv_len = None, 0
        req.status = ReqStatus.FINISHED

    def _free_row(self, row: int) -> None:
        if self._row_released is not None:
            self._row_released(row)
        self.req_pool.free(row)

    def _retract(self, req: Req) -> None:
        self._unpin_media(req)
        self._cache_prefix(req, finished=True)
        self._free_row(req.req_pool_idx)
        req.req_pool_idx, req.kv_len, req.status = None, 0, ReqStatus.WAITING
        self.waiting.appendleft(req)
        self.stats.retractions += 1

    # ----- building batches -----

    def _reserved_tokens(self, reqs: list[Req]) -> int:
        return int(sum(min(r.remaining_new_tokens, _MAX_RESERVE_PER_REQ) for r in reqs) * self.new_token_ratio)

    def _prefill_budget(self) -> int:
        """Most tokens one prefill step computes."""
        return self.args.max_prefill_tokens if self.chunk_size is None else min(self.args.max_prefill_tokens,
                                                                                self.chunk_size)

    # ----- media: the encoder's share of a step -----

    def _encoder_rows(self, req: Req, n: int, counted: set[int]) -> list[int]:
        """Keys of the media items that req's next n tokens would send through the encoder this step: items
        overlapping those tokens that are neither cached nor already counted for the step."""
        if req.mm is None or self.encoder_cache is None:
            return []
        start, end = req.kv_len, req.kv_len + n
        return [item.hash for item in req.mm.items if item.offset < end and item.end > start
                and item.hash not in self.encoder_cache and item.hash not in counted]

    def _encoder_cost(self, req: Req, keys: list[int]) -> int:
        cost = self._encoder_cost_of or (lambda item: item.length)
        lengths = {item.hash: cost(item) for item in req.mm.items} if keys else {}
        return sum(lengths[k] for k in keys)

    def _pin_media(self, req: Req, n: int) -> None:
        """A prompt continues in later chunks: keep its media items from this chunk on in the encoder cache until
        its last chunk has run, so no later chunk encodes an item twice."""
        if req.mm is None or self.encoder_cache is None or req.encoder_pins is not None:
            return
        req.encoder_pins = [item.hash for item in req.mm.items if item.end > req.kv_len + n]
        self.encoder_cache.pin(req.encoder_pins)

    def _unpin_media(self, req: Req) -> None:
        if req.encoder_pins is not None:
            self.encoder_cache.unpin(req.encoder_pins)
            req.encoder_pins = None

    def _schedule_prefill(self, reserve: int = 0) -> list[tuple[Req, int]]:
        """(request, tokens to extend) pairs for a prefill step, or [] when nothing can be admitted. `reserve`
        tokens of the step's budget are kept for decode rows mixed in (--enable-mixed-chunk). Media items the step
        would encode count against --max-encoder-tokens-per-step (by their placeholder tokens, i.e. encoder
        output rows): a request whose new items would pass it waits for a later step, unless nothing else runs."""
        budget = self._prefill_budget() - reserve
        encoder_budget = self.args.max_encoder_tokens_per_step or self._prefill_budget()
        counted: set[int] = set()
        picked: list[tuple[Req, int]] = []
        reserved = self._reserved_tokens(self.running)
        if self.chunked is not None:
            req, self.chunked = self.chunked, None
            n = self._chunk_len(req, min(req.extend_len, budget))
            keys = self._encoder_rows(req, n, counted)
            counted.update(keys)
            encoder_budget -= self._encoder_cost(req, keys)
            slots = self._alloc_slots(n)
            if slots is None:  # cannot happen: admission reserved the whole prompt
                raise RuntimeError("KV cache exhausted during a chunked prefill")
            self._place(req, slots, n)
            picked.append((req, n))
            budget -= n
            # the rest of its prompt arrives in later steps: keep room for it
            reserved += req.extend_len - n + self._reserved_tokens([req])
        if not self.waiting or budget <= 0:
            return picked
        queue = order_waiting(list(self.waiting), self.args.schedule_policy, self._cached_prefix_len)
        cross_free = self.runner.model.cross_rows_free() if self._cross_rows_needed is not None else 0
        cross_counted: set[int] = set()
        for req in queue:
            if budget <= 0 or len(self.running) + len(picked) >= self.max_running:
                break
            if not self._admit(req):
                break
            need = req.extend_len
            # The whole prompt (not just this chunk) must fit beside what running requests will generate.
            if need + self._reserved_tokens([req]) + reserved > self._available_tokens() and (picked or self.running):
                self._unadmit(req)
                break
            if self._cross_rows_needed is not None:
                rows = self._cross_rows_needed(req.mm, cross_counted)
                if rows > cross_free and (picked or self.running):  # alone, it runs (its states kept outside)
                    self._unadmit(req)
                    break
                cross_free -= rows
            n = self._chunk_len(req, min(need, budget))
            keys = self._encoder_rows(req, n, counted)
            cost = self._encoder_cost(req, keys)
            if cost > encoder_budget and picked:
                self._unadmit(req)
                break
            slots = self._alloc_slots(n)
            if slots is None:
                self._unadmit(req)
                break
            self.waiting.remove(req)
            self._place(req, slots, n)
            picked.append((req, n))
            counted.update(keys)
            encoder_budget -= cost
            reserved += self._reserved_tokens([req])
            budget -= n
            if n < need:
                self._pin_media(req, n)
                break  # this one continues as the chunked request; nothing more fits this step
        return picked

    def _media_spans(self, req: Req) -> list[tuple[int, int]]:
        """req's bidirectional spans (its media items' placeholder runs, touching ones merged, as the attention
        merges them); none unless the model asks for them."""
        spans: list[tuple[int, int]] = []
        if not self._bidirectional or req.mm is None:
            return spans
        for item in req.mm.items:
            if spans and item.offset == spans[-1][1]:
                spans[-1] = (spans[-1][0], item.end)
            else:
                spans.append((item.offset, item.end))
        return spans

    def _chunk_len(self, req: Req, n: int) -> int:
        """n new tokens of req, moved so that the chunk ends at no point inside a bidirectional span (whose later
        tokens would have no keys yet): it ends before a span that starts within it, or runs to the end of a span
        it starts in, past the step's budget if that is what the span needs."""
        start, end = req.kv_len, req.kv_len + n
        for lo, hi in self._media_spans(req):
            if lo < end < hi:
                return lo - start if lo > start else hi - start
        return n

    def _cached_prefix_len(self, req: Req) -> int:
        slots, _ = self.tree.match_prefix(req.fill_ids[:-1])
        return len(slots)

    def _unadmit(self, req: Req) -> None:
        self.tree.dec_lock_ref(req.last_node)
        self.req_pool.free(req.req_pool_idx)
        req.req_pool_idx, req.last_node, req.kv_len, req.cache_len = None, None, 0, 0

    def _place(self, req: Req, slots: torch.Tensor, n: int) -> None:
        self.req_pool.req_to_token[req.req_pool_idx, req.kv_len : req.kv_len + n] = slots
        req.status = ReqStatus.RUNNING

    def _mixed_decode_rows(self) -> list[tuple[Req, int]]:
        """The running requests' next tokens as rows of a prefill step (--enable-mixed-chunk), so that a long
        prompt does not stall their decoding; none when their slots would need an eviction past what is free."""
        if self.kv_pool.available_size() + self.tree.evictable_size() < len(self.running):
            return []
        slots = self._alloc_slots(len(self.running))
        if slots is None:
            return []
        self.stats.mixed_steps += 1
        for i, req in enumerate(self.running):
            self._place(req, slots[i : i + 1], 1)
        return [(req, 1) for req in self.running]

    def _schedule_decode(self) -> list[tuple[Req, int]]:
        if not self.running:
            return []
        self.new_token_ratio = max(_MIN_NEW_TOKEN_RATIO, self.new_token_ratio - _NEW_TOKEN_RATIO_DECAY)
        while self._available_tokens() < len(self.running) and len(self.running) > 1:
            self._retract(self.running.pop())
            self.new_token_ratio = _INIT_NEW_TOKEN_RATIO
        return self._place_decode(self.running)

    def _place_decode(self, reqs: list[Req]) -> list[tuple[Req, int]]:
        slots = self._alloc_slots(len(reqs))
        if slots is None:
            raise RuntimeError("KV cache exhausted with a single running request")
        # One host-to-device copy of the step's per-request integers and one write of the new slots into the
        # request-to-token table: no per-request tensor work, whatever the batch size.
        rows = [[r.last_token for r in reqs], [r.kv_len for r in reqs], [r.req_pool_idx for r in reqs]]
        if self._mrope:  # a generated token's M-RoPE position: its index plus the request's media offset
            rows.append([r.kv_len + (r.mm.mrope_delta if r.mm is not None else 0) for r in reqs])
        host = torch.tensor(rows, dtype=torch.int64, pin_memory=self._pin)
        dev = host.to(self.device, non_blocking=True)
        self.req_pool.req_to_token[dev[2], dev[1]] = slots
        self._decode_inputs = (dev, slots)
        return [(req, 1) for req in reqs]

    # ----- running a batch -----

    def _run(self, batch: list[tuple[Req, int]], mode: ForwardMode) -> None:
        if self.pooler is not None:
            return self._run_pooled(batch)
        if mode == ForwardMode.DECODE:
            forward, prompt_rows, prompt_scored, sampled = self._decode_batch(batch), [], [], [r for r, _ in batch]
        else:
            forward, prompt_rows, prompt_scored, sampled = self._extend_batch(batch)
        logits = self.runner.forward(forward)
        self.stats.steps += 1
        if mode == ForwardMode.DECODE:
            self.stats.decode_steps += 1
        else:
            self.stats.prefill_steps += 1
        if prompt_scored:
            self._record_input_logprobs(prompt_scored, logits[: len(prompt_rows)])
        for req, n in batch:
            req.kv_len += n
        self._step_committed = True
        if sampled:
            self._sample_and_append(sampled, logits[len(prompt_rows) :])
        self._after_step(batch, mode, set(sampled))

    def _run_pooled(self, batch: list[tuple[Req, int]]) -> None:
        """An embedding server's prefill step: the model returns the hidden states (a score head: the scores) of
        the positions each request's pool span has in this step; they are summed into the request, and a request
        whose prompt is complete gets its pooled vector and finishes."""
        forward = self._extend_batch(batch)[0]
        rows: list[int] = []
        counts: list[int] = []  # each request's pooled rows in this step
        offset = 0
        for req, n in batch:
            start, end = max(req.kv_len, req.pool_span.start), min(req.kv_len + n, req.pool_span.stop)
            rows.extend(range(offset + start - req.kv_len, offset + end - req.kv_len))
            counts.append(max(0, end - start))
            offset += n
        forward.logits_indices = torch.tensor(rows, dtype=torch.int64).to(self.device, non_blocking=True)
        forward.pooling = True
        out = self.runner.forward(forward)
        self.stats.steps += 1
        self.stats.prefill_steps += 1
        row = 0
        done: set[Req] = set()
        for (req, n), count in zip(batch, counts, strict=True):
            req.pooled = Pooler.accumulate(req.pooled, out[row : row + count])
            row += count
            req.kv_len += n
            if req.kv_len == req.seq_len and not req.finished:
                vector = self.pooler.finish(req.pooled, len(req.pool_span))
                req.embedding, req.pooled = vector.tolist(), None
                req.finished_reason = {"type": "stop", "matched": None}
                done.add(req)
        self._step_committed = True
        self._after_step(batch, ForwardMode.EXTEND, done)

    def _extend_batch(self, batch: list[tuple[Req, int]]) -> tuple[ForwardBatch, list[int], list, list[Req]]:
        """The prefill step's inputs: (batch, rows scored for prompt log-probs, their requests, requests sampled)."""
        input_ids: list[int] = []
        positions: list[int] = []
        # The model returns logits for prompt-scoring rows first (request by request), then one sampling row
        # per request that completes its KV this step.
        prompt_rows: list[int] = []
        prompt_scored: list[tuple[Req, range]] = []
        sample_rows: list[int] = []
        sampled: list[Req] = []
        offset = 0
        mrope = self._mrope
        for req, n in batch:
            input_ids.extend(req.fill_slice(req.kv_len, req.kv_len + n))
            if mrope:
                positions.append(req.mm.positions(req.kv_len, req.kv_len + n) if req.mm is not None else
                                 torch.arange(req.kv_len, req.kv_len + n).expand(3, -1))
            else:
                positions.extend(range(req.kv_len, req.kv_len + n))
            if req.wants_input_logprobs:
                scored = req.input_logprob_rows(req.kv_len, n)
                prompt_rows.extend(offset + p - req.kv_len for p in scored)
                prompt_scored.append((req, scored))
            offset += n
            if req.kv_len + n == req.seq_len:  # this step completes the request's KV: sample its next token
                sample_rows.append(offset - 1)
                sampled.append(req)
        seq_lens = [req.kv_len + n for req, n in batch]
        device = self.device
        forward = ForwardBatch(
            mode=ForwardMode.EXTEND,
            input_ids=torch.tensor(input_ids, dtype=torch.int64).to(device, non_blocking=True),
            positions=(torch.cat(positions, dim=1) if mrope else torch.tensor(positions, dtype=torch.int64)).to(
                device, non_blocking=True),
            out_cache_loc=torch.cat([
                self.req_pool.req_to_token[req.req_pool_idx, req.kv_len : req.kv_len + n] for req, n in batch
            ]),
            req_pool_indices=torch.tensor([r.req_pool_idx for r, _ in batch], dtype=torch.int64).to(device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int64).to(device, non_blocking=True),
            seq_lens_cpu=seq_lens,
            extend_lens_cpu=[n for _, n in batch],
            logits_indices=torch.tensor(prompt_rows + sample_rows, dtype=torch.int64).to(device, non_blocking=True),
            mm_inputs=[req.mm for req, _ in batch],
            bidirectional_spans=self._step_spans([req for req, _ in batch]),
        )
        return forward, prompt_rows, prompt_scored, sampled

    def _step_spans(self, reqs: list[Req]) -> list[list[tuple[int, int]]] | None:
        """Per request of a prefill step, its bidirectional spans; None when no request has any."""
        spans = [self._media_spans(req) for req in reqs]
        return spans if any(spans) else None

    def _decode_batch(self, batch: list[tuple[Req, int]]) -> ForwardBatch:
        """The decode step's inputs, from what `_schedule_decode` already put on the device."""
        dev, slots = self._decode_inputs
        self._decode_inputs = None
        seq_lens_cpu = [req.kv_len + 1 for req, _ in batch]
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=dev[0],
            positions=dev[3].expand(3, -1) if self._mrope else dev[1],
            out_cache_loc=slots,
            req_pool_indices=dev[2],
            seq_lens=dev[1] + 1,
            seq_lens_cpu=seq_lens_cpu,
            extend_lens_cpu=[1] * len(batch),
            logits_indices=None,  # every row samples
        )

    def _record_input_logprobs(self, scored: list[tuple[Req, range]], logits: torch.Tensor) -> None:
        """Log-probs of prompt tokens; the logits at position p score the prompt token at p + 1."""
        row = 0
        for req, positions in scored:
            if not req.input_logprobs and req.logprob_start_len == 0:
                req.input_logprobs.append(None)  # the first prompt token has nothing before it to score it
                req.input_top.append([])
            if not positions:
                continue
            chunk = torch.log_softmax(logits[row : row + len(positions)], dim=-1)
            row += len(positions)
            targets = torch.tensor([req.origin_input_ids[p + 1] for p in positions], device=chunk.device)
            targets = targets.clamp(max=chunk.shape[1] - 1)  # media pad values score as nothing in particular
            req.input_logprobs.extend(chunk.gather(1, targets[:, None]).squeeze(1).tolist())
            k = req.params.top_logprobs_num
            if not k:
                req.input_top.extend([] for _ in positions)
                continue
            top = chunk.topk(min(k, chunk.shape[1]), dim=-1)
            for ids, vals in zip(top.indices.tolist(), top.values.tolist(), strict=True):
                req.input_top.append(list(zip(ids, vals, strict=True)))

    def _sampling_batch(self, reqs: list[Req]) -> SamplingBatch:
        vocab = self.model_config.vocab_size
        return SamplingBatch.build([r.params for r in reqs], [r.penalty for r in reqs],
                                   [len(r.output_ids) for r in reqs], vocab, self.device, self.runner.generator,
                                   stop_ids=[r.stop_ids(vocab) for r in reqs],
                                   # a request that finished in the step before (its row's token is dropped) has
                                   # no next mask
                                   grammars=[None if r.finished else r.grammar for r in reqs])

    def _sample_and_append(self, reqs: list[Req], logits: torch.Tensor) -> None:
        logprobs = top_ids = top_vals = None
        if all(r.params.is_plain_greedy and not r.held_back for r in reqs):
            # a benchmark's or an eval's case: one argmax and one copy to the host, no per-row sampler tensors
            next_ids = logits.argmax(dim=-1).tolist()
        else:
            out = self.runner.sample(logits, self._sampling_batch(reqs))
            next_ids = out.next_token_ids.tolist()
            logprobs = out.logprobs.tolist() if out.logprobs is not None else None
            top_ids = out.top_logprob_ids.tolist() if out.top_logprob_ids is not None else None
            top_vals = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        for i, req in enumerate(reqs):
            if req.finished:  # aborted while this step ran
                continue
            if req.remaining_new_tokens <= 0:  # max_new_tokens=0: the prompt was only scored
                req.finished_reason = {"type": "length", "length": 0}
                continue
            if req.params.logprobs or req.params.top_logprobs_num:
                req.pending_logprobs.append(logprobs[i])
                k = req.params.top_logprobs_num
                req.pending_top.append(list(zip(top_ids[i][:k], top_vals[i][:k], strict=True)) if k else [])
            if req.return_logits:
                req.pending_logits.append(logits[i].detach().to("cpu", copy=True))
            req.append_token(next_ids[i])
            self.stats.generated_tokens += 1

    def _after_step(self, batch: list[tuple[Req, int]], mode: ForwardMode, sampled: set[Req]) -> None:
        decoding = set(self.running) if mode == ForwardMode.EXTEND else set()  # decode rows of a mixed step
        for req, _ in batch:
            if req in decoding:
                if req.finished:
                    self.running.remove(req)
                    self._release(req)
            elif mode == ForwardMode.EXTEND:
                if req.finished:
                    self._release(req)
                    continue
                self._cache_prefix(req, finished=False)
                if req not in sampled:  # a prompt chunk: the rest of the prompt follows next step
                    self.chunked = req
                else:
                    self._unpin_media(req)  # its prompt is done: the encoder outputs served their chunks
                    self.running.append(req)
            elif req.finished:
                self.running.remove(req)
                self._release(req)

    @staticmethod
    def _input_logprobs_once(req: Req) -> dict:
        if req.logprob_start_len < 0 or req.input_logprobs_sent or not (req.output_ids or req.finished):
            return {}  # not asked for, already sent, or the prompt is still being scored
        req.input_logprobs_sent = True
        return {"input_token_logprobs": req.input_logprobs, "input_top_logprobs": req.input_top}

    def _collect_outputs(self) -> list[TokenOutput]:
        outputs = []
        for rid in list(self.reqs):
            req = self.reqs[rid]
            if not (req.pending_ids or req.finished):
                continue
            if req.finished and req.status != ReqStatus.FINISHED:
                continue  # an aborted request is reported once it has left its batch
            outputs.append(TokenOutput(
                rid=rid,
                new_token_ids=req.pending_ids,
                finished_reason=req.finished_reason,
                prompt_tokens=len(req.origin_input_ids),
                completion_tokens=len(req.output_ids),
                cached_tokens=req.cached_tokens,
                embedding=req.embedding,
                token_logprobs=req.pending_logprobs if (req.params.logprobs or req.params.top_logprobs_num) else None,
                top_logprobs=req.pending_top if req.params.top_logprobs_num else None,
                logits=req.pending_logits if req.return_logits else None,
                error_status=req.error_status,
                **self._input_logprobs_once(req),
            ))
            req.pending_ids, req.pending_logprobs, req.pending_top, req.pending_logits = [], [], [], []
            if req.finished:
                del self.reqs[rid]
        return outputs
