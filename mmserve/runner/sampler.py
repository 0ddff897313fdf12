"""The sampler: turns a batch of next-token logits [B, V] into token ids, following each request's
SamplingParams with Hugging Face `generate` semantics, plus the log-probs the API can return.

It owns three things: `PenaltyState` (per-request token history for penalties, kept across steps by the
request), `SamplingBatch` (the per-step parameter tensors the scheduler builds once per forward), and
`Sampler` (the pure function from logits to `SamplerOutput`).

Order of operations, per row (transformers' processor order):
  1. log-probs of the RAW logits (only if some row asks for them);
  2. one [B, V] bias: `logit_bias` (HF's single-token `sequence_bias`), and -inf on the tokens that would end a
     request still short of its `min_new_tokens` (HF's `min_new_tokens`: EOS and stop ids);
  3. repetition penalty over prompt + output tokens (HF), then presence/frequency over output tokens (OpenAI),
     then -inf on the tokens a row's grammar does not allow next (constrained decoding);
  4. greedy rows: argmax of the biased, penalised logits;
  5. other rows: temperature, top-k, top-p, min-p (HF order and semantics), then an exponential race
     argmax(p / E), E ~ Exp(1), which samples from p without normalising it or doing a cumsum search.

Reproducibility: a row with a `seed` draws its noise on CPU from a generator seeded by (seed, step), so its
tokens do not depend on the other rows of the batch, its position, the device, or a later recomputation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch

from mmserve.constrained.grammar import allowed_tokens, new_bitmask
from mmserve.sampling_params import SamplingParams

# Temperatures this small are already argmax in practice; the floor keeps logits / T finite.
_MIN_TEMPERATURE = 1e-6


@dataclass
class PenaltyState:
    """Token history of one request, on the logits' device. Built once from the prompt; `update` per token."""

    seen: torch.Tensor  # bool [V]: prompt and output tokens (HF's repetition penalty looks at all input_ids)
    output_counts: torch.Tensor  # int32 [V]: output tokens only (OpenAI's presence/frequency penalties)

    @classmethod
    def create(cls, prompt_ids: list[int], vocab_size: int, device: torch.device | str) -> PenaltyState:
        if prompt_ids and not (0 <= min(prompt_ids) and max(prompt_ids) < vocab_size):
            bad = next(t for t in prompt_ids if not 0 <= t < vocab_size)
            raise ValueError(f"prompt token id {bad} is out of range for vocab_size {vocab_size}")
        seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        if prompt_ids:
            seen[torch.tensor(prompt_ids, dtype=torch.long, device=device)] = True
        output_counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)
        return cls(seen=seen, output_counts=output_counts)

    def update(self, token_id: int) -> None:
        self.seen[token_id] = True
        self.output_counts[token_id] += 1


@dataclass
class SamplingBatch:
    """Per-step parameter tensors for B rows, built once per forward so that the sampler is all tensor ops."""

    batch_size: int
    vocab_size: int
    temperatures: torch.Tensor  # float32 [B, 1]; 1.0 on greedy rows so that dividing is harmless
    top_ks: torch.Tensor  # int64 [B, 1]; V where disabled
    top_ps: torch.Tensor  # float32 [B, 1]; +inf where disabled, so the top-p test never removes anything
    min_ps: torch.Tensor  # float32 [B, 1]
    repetition_penalties: torch.Tensor  # float32 [B, 1]
    presence_penalties: torch.Tensor  # float32 [B, 1]
    frequency_penalties: torch.Tensor  # float32 [B, 1]
    greedy_mask: torch.Tensor  # bool [B]
    seen: torch.Tensor | None  # bool [B, V] when some row has a repetition penalty
    output_counts: torch.Tensor | None  # float32 [B, V] when some row has a presence/frequency penalty
    logit_bias: torch.Tensor | None  # float32 [B, V] when some row has a logit_bias or suppressed tokens
    allowed: torch.Tensor | None  # bool [B, V] when some row follows a grammar: the tokens it may take next
    seeded_rows: torch.Tensor | None  # int64 [S]: sampled (non-greedy) rows that carry a seed
    seeded_noise: torch.Tensor | None  # float32 [S, V]: their Exp(1) noise, drawn on CPU from (seed, step)
    generator: torch.Generator | None  # noise of the unseeded rows (on the logits' device); None: default RNG
    all_greedy: bool
    need_top_k: bool
    need_top_p: bool
    need_min_p: bool
    need_repetition_penalty: bool
    need_presence_frequency: bool
    need_logprobs: bool
    max_top_logprobs_num: int

    @property
    def need_penalties(self) -> bool:
        return self.need_repetition_penalty or self.need_presence_frequency

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        penalty_states: list[PenaltyState | None],
        steps: list[int],
        vocab_size: int,
        device: torch.device | str,
        generator: torch.Generator | None = None,
        stop_ids: list[Collection[int]] | None = None,
        grammars: list[Any] | None = None,
    ) -> SamplingBatch:
        """`steps[i]`: tokens request i has generated so far; with its seed, it picks that row's noise.

        `penalty_states[i]` may be None only for rows whose params need no penalty state. `stop_ids[i]`: the
        token ids that would end request i (its EOS ids unless ignore_eos, and its stop_token_ids); they get
        -inf while `steps[i] < min_new_tokens`. None: no row is held back. `grammars[i]`: request i's grammar
        (`constrained.grammar.Grammar`) or None; its row may take only the tokens the grammar allows next."""
        b = len(params)
        if len(penalty_states) != b or len(steps) != b or (stop_ids is not None and len(stop_ids) != b):
            raise ValueError(f"params, penalty_states, steps and stop_ids must have one entry per row, got "
                             f"{b}, {len(penalty_states)}, {len(steps)}, {b if stop_ids is None else len(stop_ids)}")
        device = torch.device(device)

        greedy = [p.is_greedy for p in params]
        temps = [1.0 if g else max(p.temperature, _MIN_TEMPERATURE)
                 for p, g in zip(params, greedy, strict=True)]
        top_ks = [vocab_size if p.top_k in (-1, 0) else min(p.top_k, vocab_size) for p in params]
        top_ps = [p.top_p if p.top_p < 1.0 else float("inf") for p in params]
        min_ps = [p.min_p for p in params]
        # Sampling filters only matter on rows that sample.
        sampled = [p for p, g in zip(params, greedy, strict=True) if not g]
        need_top_k = any(p.top_k not in (-1, 0) and p.top_k < vocab_size for p in sampled)
        need_top_p = any(p.top_p < 1.0 for p in sampled)
        need_min_p = any(p.min_p > 0.0 for p in sampled)
        need_rep = any(p.repetition_penalty != 1.0 for p in params)
        need_pf = any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params)

        seen = output_counts = None
        if need_rep or need_pf:
            for i, (p, s) in enumerate(zip(params, penalty_states, strict=True)):
                if s is None and p.needs_penalty_state:
                    raise ValueError(f"row {i} has penalties but no PenaltyState")
            if need_rep:
                no_seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
                seen = torch.stack([no_seen if s is None else s.seen for s in penalty_states])
            if need_pf:
                no_counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)
                output_counts = torch.stack(
                    [no_counts if s is None else s.output_counts for s in penalty_states]).float()

        logit_bias = _bias_tensor(params, steps, stop_ids, vocab_size, device)
        allowed = None
        if grammars is not None and any(g is not None for g in grammars):
            bitmask = new_bitmask(b, vocab_size, pin=device.type == "cuda")
            for i, g in enumerate(grammars):
                if g is not None:
                    g.fill(bitmask, i)
            allowed = allowed_tokens(bitmask.to(device, non_blocking=True), vocab_size)

        seeded_idx = [i for i, p in enumerate(params) if p.seed is not None and not greedy[i]]
        seeded_rows = seeded_noise = None
        if seeded_idx:
            noise = torch.empty(len(seeded_idx), vocab_size, dtype=torch.float32)
            for j, i in enumerate(seeded_idx):
                g = torch.Generator(device="cpu")
                g.manual_seed(_row_seed(params[i].seed, steps[i]))
                noise[j].exponential_(generator=g)
            seeded_rows = torch.tensor(seeded_idx, dtype=torch.long, device=device)
            seeded_noise = noise.to(device)

        # One host-to-device copy for all float columns; each field is a [B, 1] view of it.
        floats = torch.tensor(
            [temps, top_ps, min_ps, [p.repetition_penalty for p in params],
             [p.presence_penalty for p in params], [p.frequency_penalty for p in params]],
            dtype=torch.float32,
        ).reshape(6, b).t().contiguous().to(device)

        return cls(
            batch_size=b,
            vocab_size=vocab_size,
            temperatures=floats[:, 0:1],
            top_ks=torch.tensor(top_ks, dtype=torch.long).view(b, 1).to(device),
            top_ps=floats[:, 1:2],
            min_ps=floats[:, 2:3],
            repetition_penalties=floats[:, 3:4],
            presence_penalties=floats[:, 4:5],
            frequency_penalties=floats[:, 5:6],
            greedy_mask=torch.tensor(greedy, dtype=torch.bool).to(device),
            seen=seen,
            output_counts=output_counts,
            logit_bias=logit_bias,
            allowed=allowed,
            seeded_rows=seeded_rows,
            seeded_noise=seeded_noise,
            generator=generator,
            all_greedy=all(greedy),
            need_top_k=need_top_k,
            need_top_p=need_top_p,
            need_min_p=need_min_p,
            need_repetition_penalty=need_rep,
            need_presence_frequency=need_pf,
            need_logprobs=any(p.logprobs or p.top_logprobs_num > 0 for p in params),
            max_top_logprobs_num=max((p.top_logprobs_num for p in params), default=0),
        )


def _bias_tensor(params: list[SamplingParams], steps: list[int], stop_ids: list[Collection[int]] | None,
                 vocab_size: int, device: torch.device) -> torch.Tensor | None:
    """The rows' sparse biases as one dense [B, V] tensor (one scatter), or None when no row has any."""
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    for i, p in enumerate(params):
        if p.logit_bias:
            rows.extend([i] * len(p.logit_bias))
            cols.extend(p.logit_bias)
            values.extend(p.logit_bias.values())
        if stop_ids is not None and steps[i] < p.min_new_tokens and stop_ids[i]:
            rows.extend([i] * len(stop_ids[i]))
            cols.extend(stop_ids[i])
            values.extend([float("-inf")] * len(stop_ids[i]))
    if not rows:
        return None
    if not 0 <= min(cols) <= max(cols) < vocab_size:
        bad = next(t for t in cols if not 0 <= t < vocab_size)
        raise ValueError(f"token id {bad} in logit_bias or stop ids is out of range for vocab_size {vocab_size}")
    bias = torch.zeros(len(params), vocab_size, dtype=torch.float32, device=device)
    index = torch.tensor([rows, cols], dtype=torch.long).to(device)
    # accumulate: a token both biased and held back sums to -inf, whatever the order of the duplicates
    bias.index_put_((index[0], index[1]), torch.tensor(values, dtype=torch.float32).to(device), accumulate=True)
    return bias


def _row_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed from (seed, step): stable across processes (unlike hash()) and well mixed,
    so neighbouring steps or seeds do not get correlated streams."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class SamplerOutput:
    next_token_ids: torch.Tensor  # int64 [B]
    logprobs: torch.Tensor | None  # float32 [B]: the chosen token's log-prob under the raw model distribution
    top_logprob_ids: torch.Tensor | None  # int64 [B, K], K = max top_logprobs_num (rows use a prefix)
    top_logprobs: torch.Tensor | None  # float32 [B, K]


class Sampler:
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape != (batch.batch_size, batch.vocab_size):
            raise ValueError(f"logits must be [{batch.batch_size}, {batch.vocab_size}], "
                             f"got {tuple(logits.shape)}")
        logits = logits.float()

        raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.need_logprobs else None

        logits = _adjust_logits(logits, batch)
        greedy_ids = logits.argmax(dim=-1)
        if batch.all_greedy:
            next_ids = greedy_ids
        else:
            next_ids = torch.where(batch.greedy_mask, greedy_ids, _sample(logits, batch))

        out = SamplerOutput(next_token_ids=next_ids, logprobs=None, top_logprob_ids=None, top_logprobs=None)
        if raw_logprobs is not None:
            out.logprobs = raw_logprobs.gather(1, next_ids.unsqueeze(1)).squeeze(1)
            k = min(batch.max_top_logprobs_num, batch.vocab_size)
            if k > 0:
                top = torch.topk(raw_logprobs, k, dim=-1, sorted=True)
                out.top_logprobs, out.top_logprob_ids = top.values, top.indices
        return out


def _adjust_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Bias (logit_bias, min_new_tokens), penalties, then the grammars' masks: what greedy rows take the argmax
    of."""
    if batch.logit_bias is not None:
        logits = logits + batch.logit_bias
    logits = _apply_penalties(logits, batch)
    if batch.allowed is not None:
        logits = logits.masked_fill(~batch.allowed, float("-inf"))
    return logits


def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    if batch.seen is not None:
        # HF: each seen token is penalised once, pushing it towards zero probability whatever its sign.
        rep = batch.repetition_penalties
        penalised = torch.where(logits < 0, logits * rep, logits / rep)
        logits = torch.where(batch.seen, penalised, logits)
    if batch.output_counts is not None:
        counts = batch.output_counts
        logits = logits - batch.frequency_penalties * counts - batch.presence_penalties * (counts > 0).float()
    return logits


def _sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """One token per row from the filtered, tempered distribution (greedy rows get a throwaway draw)."""
    scaled = logits / batch.temperatures
    noise = torch.empty_like(scaled).exponential_(generator=batch.generator)
    if batch.seeded_rows is not None:
        noise[batch.seeded_rows] = batch.seeded_noise
    # A zero draw would turn p / E into inf or nan and win the race regardless of p.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)

    if not (batch.need_top_k or batch.need_top_p):
        probs = torch.softmax(scaled, dim=-1)
        if batch.need_min_p:
            probs = _min_p_filter(probs, batch.min_ps)
        return (probs / noise).argmax(dim=-1)

    # top-k and top-p both work on the descending order; do everything there and map back at the end.
    values, order = scaled.sort(dim=-1, descending=True)
    if batch.need_top_k:
        # HF keeps every token tied with the k-th largest, hence a value threshold rather than a position cut.
        kth = values.gather(1, batch.top_ks - 1)
        values = values.masked_fill(values < kth, float("-inf"))
    probs = torch.softmax(values, dim=-1)
    if batch.need_top_p:
        # HF removes tokens whose ascending cumulative mass is <= 1 - top_p, i.e. keeps a token iff the mass
        # strictly before it (descending) is < top_p: the smallest set reaching top_p, at least the top token.
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(mass_before >= batch.top_ps, 0.0)
    if batch.need_min_p:
        # The ratio to the top probability is unchanged by the renormalisation HF does after top-k/top-p.
        probs = _min_p_filter(probs, batch.min_ps)
    # The race is invariant to scaling p, so the filtered probs need no renormalisation.
    choice = (probs / noise.gather(1, order)).argmax(dim=-1, keepdim=True)
    return order.gather(1, choice).squeeze(1)


def _min_p_filter(probs: torch.Tensor, min_ps: torch.Tensor) -> torch.Tensor:
    threshold = min_ps * probs.amax(dim=-1, keepdim=True)
    return probs.masked_fill(probs < threshold, 0.0)
