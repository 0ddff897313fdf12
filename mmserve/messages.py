"""Messages between the front end (tokenizer side) and the scheduler.

Plain data only: token ids, numbers and strings, so the same structs can cross a process boundary later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class GenerateRequest:
    rid: str
    input_ids: list[int]
    sampling_params: dict[str, Any] = field(default_factory=dict)
    return_logits: bool = False  # keep the full next-token logits of every generated position (for tests/debugging)


@dataclass
class AbortRequest:
    rid: str


@dataclass
class TokenOutput:
    """What one scheduler step produced for one request."""

    rid: str
    new_token_ids: list[int]
    finished_reason: dict[str, Any] | None  # {"type": "stop"|"length"|"abort", "matched"?: int|str, ...}
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    token_logprobs: list[float] | None = None  # one per new token
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per new token: (token id, logprob), best first
    logits: list[Any] | None = None  # float32 tensors [vocab], one per new token, when asked for
