"""Messages between the front end (tokenizer side) and the scheduler.

msgspec structs: plain data (token ids, numbers, strings) that cross the ZMQ socket between the API server
and the engine process as msgpack, and are passed as objects when the engine runs in-process. No pickle.
"""

from __future__ import annotations

from typing import Any

import msgspec


class WireTensor(msgspec.Struct):
    dtype: str
    shape: list[int]
    data: bytes


class WireItem(msgspec.Struct):
    modality: str
    features: dict[str, WireTensor]
    offset: int
    length: int
    hash: int


class WireMultimodal(msgspec.Struct):
    """MultimodalInputs as raw bytes (mmserve.multimodal.inputs.to_wire / from_wire)."""

    items: list[WireItem]
    mrope_positions: WireTensor | None = None
    mrope_delta: int = 0


class GenerateRequest(msgspec.Struct, tag=True):
    rid: str
    input_ids: list[int]
    sampling_params: dict[str, Any] = msgspec.field(default_factory=dict)
    # >= 0: also return the log-probs of the prompt tokens from this position on (OpenAI `echo` + `logprobs`)
    logprob_start_len: int = -1
    return_logits: bool = False  # keep full next-token logits in TokenOutput.logits (in-process only)
    mm_inputs: WireMultimodal | None = None  # media of the prompt; input_ids hold their placeholder tokens
    embed: bool = False  # pool the prompt (an embedding server) instead of generating; sampling_params unused


class AbortRequest(msgspec.Struct, tag=True):
    rid: str


class TokenOutput(msgspec.Struct, tag=True):
    """What one scheduler step produced for one request."""

    rid: str
    new_token_ids: list[int]
    finished_reason: dict[str, Any] | None  # {"type": "stop"|"length"|"abort", "matched"?: int|str, ...}
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    token_logprobs: list[float] | None = None  # one per new token
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per new token: (token id, logprob), best first
    input_token_logprobs: list[float | None] | None = None  # per prompt token from logprob_start_len (sent once)
    input_top_logprobs: list[list[tuple[int, float]]] | None = None
    logits: Any = None  # list of float32 tensors [vocab], one per new token (in-process only)
    error_status: int | None = None  # a refused request: HTTP status; the reason is in finished_reason
    embedding: list[float] | None = None  # an embed request's pooled vector (a score head: one score per label)


class EngineReady(msgspec.Struct, tag=True):
    """Sent once by the engine process when it can take requests."""

    context_len: int
    max_total_tokens: int
    max_running_requests: int
    vocab_size: int
    dtype: str
    device: str
    is_embedding: bool = False  # pools prompts (/v1/embeddings) instead of generating


class EngineStats(msgspec.Struct, tag=True):
    """Scheduler gauges, sent with every batch of outputs."""

    running: int
    waiting: int
    kv_used_tokens: int
    kv_total_tokens: int
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int


class OutputBatch(msgspec.Struct, tag=True):
    outputs: list[TokenOutput]
    stats: EngineStats


ToEngine = GenerateRequest | AbortRequest
FromEngine = OutputBatch | EngineReady
