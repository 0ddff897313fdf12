"""Req: one request's state inside the scheduler (tokens, KV-cache ownership, sampling and stop state)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

import torch

from mmserve.runner.sampler import PenaltyState
from mmserve.sampling_params import SamplingParams
from mmserve.tokenizer.detokenizer import IncrementalDetokenizer, find_stop_string


class ReqStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(eq=False)
class Req:
    rid: str
    origin_input_ids: list[int]
    params: SamplingParams
    eos_token_ids: set[int]
    max_total_len: int  # the context length: prompt + output never exceed it
    return_logits: bool = False
    logprob_start_len: int = -1  # >= 0: report log-probs of prompt tokens from here on
    mm: Any = None  # MultimodalInputs; origin_input_ids then hold its pad values at media positions
    output_ids: list[int] = field(default_factory=list)
    status: ReqStatus = ReqStatus.WAITING
    # KV cache: req_to_token[req_pool_idx, :kv_len] are the slots of fill_ids[:kv_len]; the first
    # cache_len of them belong to the radix tree (locked through last_node), the rest to this request.
    req_pool_idx: int | None = None
    kv_len: int = 0
    cache_len: int = 0
    last_node: Any = None
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache at first admission
    admitted: bool = False
    finished_reason: dict[str, Any] | None = None
    error_status: int | None = None  # set when the engine failed the request (HTTP status for the client)
    penalty: PenaltyState | None = None
    grammar: Any = None  # constrained.grammar.Grammar: which tokens may come next, advanced by each token
    stop_detokenizer: IncrementalDetokenizer | None = None
    # produced since the last report to the front end
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[float] = field(default_factory=list)
    pending_top: list[list[tuple[int, float]]] = field(default_factory=list)
    pending_logits: list[torch.Tensor] = field(default_factory=list)
    # prompt log-probs, filled during the first prefill and reported once
    input_logprobs: list[float | None] = field(default_factory=list)
    input_top: list[list[tuple[int, float]]] = field(default_factory=list)
    input_logprobs_sent: bool = False
    # encoder-cache keys this request pinned while its prompt is prefilled in chunks (Scheduler._pin_media)
    encoder_pins: list[int] | None = None
    # an embedding request (prefill only): the prompt positions whose hidden states the pooler reads, the running
    # float32 sum of those computed so far, and the result
    pool_span: range | None = None
    pooled: torch.Tensor | None = None
    embedding: list[float] | None = None

    @property
    def wants_input_logprobs(self) -> bool:
        return self.logprob_start_len >= 0 and not self.input_logprobs_sent

    def input_logprob_rows(self, start: int, n: int) -> range:
        """Positions among [start, start + n) whose logits score a prompt token at or after logprob_start_len."""
        if self.logprob_start_len < 0:
            return range(0)
        first = max(start, self.logprob_start_len - 1, 0)
        last = min(start + n, len(self.origin_input_ids) - 1)
        return range(first, max(first, last))

    @property
    def fill_ids(self) -> list[int]:
        return self.origin_input_ids + self.output_ids

    def fill_slice(self, start: int, end: int) -> list[int]:
        """fill_ids[start:end] without building fill_ids (a step reads a few tokens of a long sequence)."""
        prompt = len(self.origin_input_ids)
        if end <= prompt:
            return self.origin_input_ids[start:end]
        if start >= prompt:
            return self.output_ids[start - prompt : end - prompt]
        return self.origin_input_ids[start:] + self.output_ids[: end - prompt]

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.origin_input_ids[-1]

    @property
    def seq_len(self) -> int:
        return len(self.origin_input_ids) + len(self.output_ids)

    @property
    def extend_len(self) -> int:
        """Tokens whose KV still has to be computed before the next token can be sampled."""
        return self.seq_len - self.kv_len

    @property
    def remaining_new_tokens(self) -> int:
        return self.params.max_new_tokens - len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None

    @property
    def held_back(self) -> bool:
        """Still short of min_new_tokens: only the length limit may end the request."""
        return len(self.output_ids) < self.params.min_new_tokens

    @property
    def can_sample_ahead(self) -> bool:
        """Whether the next token can be sampled before this step's token is known on the host (overlap
        scheduling): nothing per step is read back (log-probs, logits), and the sampler's input does not depend on
        the tokens so far (penalties count them, a seed picks noise by step, min_new_tokens masks EOS by count). A
        grammar's mask does follow the tokens, but a chained step reads the previous step's ids after launching its
        forward and before sampling (`Scheduler._chain`), so it is ready in time."""
        p = self.params
        return not (self.return_logits or p.logprobs or p.top_logprobs_num or p.needs_penalty_state
                    or p.seed is not None or self.held_back)

    def stop_ids(self, vocab_size: int) -> list[int]:
        """Token ids the sampler must not pick yet: those that would end a request still held back (EOS unless
        ignore_eos, and stop_token_ids), as vLLM's and SGLang's min_tokens; [] once min_new_tokens are out. A
        grammar allows a stop token only where its output is complete, and then nothing else: it is not held back."""
        if not self.held_back or self.grammar is not None:
            return []
        return sorted(t for t in self.eos_token_ids | set(self.params.stop_token_ids) if 0 <= t < vocab_size)

    def append_token(self, token_id: int) -> None:
        self.output_ids.append(token_id)
        self.pending_ids.append(token_id)
        if self.penalty is not None:
            self.penalty.update(token_id)
        if self.grammar is not None:
            if not self.grammar.accept(token_id):  # the mask allows only what the grammar accepts
                self.finished_reason = {"type": "abort", "message": f"token {token_id} does not follow the grammar"}
                return
            if self.grammar.terminated:  # complete, and a stop token taken: the output is whole
                self.finished_reason = {"type": "stop", "matched": token_id}
                return
        self._check_finished(token_id)

    def _check_finished(self, token_id: int) -> None:
        params = self.params
        if self.held_back:
            # The sampler kept EOS and stop ids away; a stop string ending in this stretch does not count either,
            # but the text must stay current so that one ending later is found.
            if self.stop_detokenizer is not None:
                self.stop_detokenizer.append([token_id])
            self._check_length()
            return
        if not params.ignore_eos and token_id in self.eos_token_ids:
            self.finished_reason = {"type": "stop", "matched": token_id}
        elif token_id in params.stop_token_ids:
            self.finished_reason = {"type": "stop", "matched": token_id}
        elif self.stop_detokenizer is not None and self._matched_stop_string(token_id):
            return
        else:
            self._check_length()

    def _check_length(self) -> None:
        if len(self.output_ids) >= self.params.max_new_tokens or self.seq_len >= self.max_total_len:
            self.finished_reason = {"type": "length", "length": len(self.output_ids)}

    def _matched_stop_string(self, token_id: int) -> bool:
        detok = self.stop_detokenizer
        before = len(detok.text)
        detok.append([token_id])
        hit = find_stop_string(detok.text, self.params.stop, before)
        if hit is None:
            return False
        self.finished_reason = {"type": "stop", "matched": hit[1]}
        return True

    def abort(self, message: str) -> None:
        self.finished_reason = {"type": "abort", "message": message}
