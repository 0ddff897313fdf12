"""ForwardBatch: everything one model forward needs, flattened over the requests of a step.

Tokens of all requests are concatenated on one axis (no padding). An EXTEND step runs new prompt tokens
(a whole prompt, a chunk of one, or a recomputation after retraction) on top of a cached prefix; a DECODE
step runs exactly one token per request.

Bidirectional spans (`bidirectional_spans`) are runs of a request's tokens that see each other both ways in the
layers that ask for it (`AttentionType.DECODER_BIDIRECTIONAL`: one image's placeholder tokens in Gemma 3); every
other pair of tokens stays causal. They are given in token indices of the request's sequence (its KV positions,
not rotary positions), so a span may lie in the cached prefix, in this step, or in a later chunk; only the spans
that hold queries of this step change anything.

A noun of the ground floor: it imports nothing of mmserve and holds tensors and numbers, no objects (the attention
backend got the KV pool and the request-to-token table when it was built; models reach the backend through their
`Attention` layers, which the runner binds to it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

import torch


class ForwardMode(Enum):
    EXTEND = auto()
    DECODE = auto()


@dataclass
class ForwardBatch:
    mode: ForwardMode
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T], or [3, T] for models with 3-D rotary positions
    out_cache_loc: torch.Tensor  # [T] KV slots that this step's tokens are written to
    req_pool_indices: torch.Tensor  # [B] rows of req_to_token
    seq_lens: torch.Tensor  # [B] KV length of each request after this step
    seq_lens_cpu: list[int]
    extend_lens_cpu: list[int]  # new tokens of each request in this step (1 for decode)
    logits_indices: torch.Tensor | None  # rows of the hidden states whose logits are needed (None: all)
    # an embedding server's step: the model returns those rows' final hidden states (a score head: its scores)
    # instead of logits, for the pooler
    pooling: bool = False
    attn_metadata: Any = field(default=None)  # filled by the backend's init_forward_metadata
    mm_inputs: list[Any] | None = None  # per request: MultimodalInputs or None (EXTEND steps only)
    # per request: sorted, disjoint [start, end) token indices that attend bidirectionally (None: no request has any)
    bidirectional_spans: list[list[tuple[int, int]]] | None = None

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def prefix_lens_cpu(self) -> list[int]:
        return [s - e for s, e in zip(self.seq_lens_cpu, self.extend_lens_cpu, strict=True)]

    def span_last_keys(self) -> list[int] | None:
        """Per query token of the step, the last key position it sees in a bidirectional layer: its own position,
        or the last token of the span it lies in (None when no span holds a query of this step).

        Touching spans merge into one, as transformers' Gemma 3 groups a contiguous run of image tokens. A span
        that holds a query must end within the step: its later tokens have no keys yet, so the scheduler must not
        end a chunk inside a span."""
        if self.bidirectional_spans is None:
            return None
        last: list[int] = []
        found = False
        for spans, seq_len, n in zip(self.bidirectional_spans, self.seq_lens_cpu, self.extend_lens_cpu, strict=True):
            prefix = seq_len - n
            offset = len(last)
            last.extend(range(prefix, seq_len))
            for start, end in _merge_touching(spans):
                lo, hi = max(start, prefix), min(end, seq_len)
                if lo >= hi:
                    continue
                assert end <= seq_len, f"bidirectional span [{start}, {end}) is cut by the step's end at {seq_len}"
                last[offset + lo - prefix : offset + hi - prefix] = [end - 1] * (hi - lo)
                found = True
        return last if found else None


def _merge_touching(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        assert start < end and (not merged or start >= merged[-1][1]), f"spans must be sorted and disjoint: {spans}"
        if merged and start == merged[-1][1]:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged
