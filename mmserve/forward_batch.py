"""ForwardBatch: everything one model forward needs, flattened over the requests of a step.

Tokens of all requests are concatenated on one axis (no padding). An EXTEND step runs new prompt tokens
(a whole prompt, a chunk of one, or a recomputation after retraction) on top of a cached prefix; a DECODE
step runs exactly one token per request.

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
    attn_metadata: Any = field(default=None)  # filled by the backend's init_forward_metadata
    mm_inputs: list[Any] | None = None  # per request: MultimodalInputs or None (EXTEND steps only)

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def prefix_lens_cpu(self) -> list[int]:
        return [s - e for s, e in zip(self.seq_lens_cpu, self.extend_lens_cpu, strict=True)]
