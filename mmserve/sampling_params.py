"""SamplingParams: the per-request decoding knobs (SGLang's names and defaults), their parsing from an API
payload, and their validation. Bad user input raises `ValueError` naming the parameter, which the server
turns into an HTTP 400."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    min_p: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    n: int = 1
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logprobs: bool = False
    top_logprobs_num: int = 0
    # token id -> bias added to its logit before sampling (OpenAI's logit_bias; greedy rows too)
    logit_bias: dict[int, float] = field(default_factory=dict)
    # EOS, stop_token_ids and stop strings cannot end the request before this many tokens (vLLM's min_tokens)
    min_new_tokens: int = 0
    # constrained decoding (SGLang's names), at most one: the output follows a JSON schema (its JSON text; an
    # object is accepted and serialised), a regular expression or an EBNF grammar
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | SamplingParams | None) -> SamplingParams:
        """Parse an API payload (or copy an existing object) into verified params."""
        if d is None:
            params = cls()
        elif isinstance(d, SamplingParams):
            # A copy, so that verify()'s normalisation never mutates the caller's object.
            params = dataclasses.replace(d, stop=list(d.stop), stop_token_ids=list(d.stop_token_ids),
                                         logit_bias=dict(d.logit_bias))
        elif isinstance(d, dict):
            unknown = sorted(str(k) for k in d if k not in _FIELD_KINDS)
            if unknown:
                raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}")
            params = cls(**{name: _coerce(name, value) for name, value in d.items()})
        else:
            raise ValueError(f"sampling_params must be an object, got {type(d).__name__}")
        params.verify()
        return params

    def verify(self) -> None:
        """Check ranges (and types, for objects built directly); normalise `stop` and `logprobs`."""
        for name in _FIELD_KINDS:
            # Re-coercion is idempotent for well-typed values, and catches directly constructed bad ones.
            setattr(self, name, _coerce(name, getattr(self, name)))
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2 <= self.presence_penalty <= 2:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.top_logprobs_num < 0:
            raise ValueError(f"top_logprobs_num must be >= 0, got {self.top_logprobs_num}")
        for s in self.stop:
            if s == "":
                raise ValueError("stop strings must be non-empty, got ''")
        for t in self.stop_token_ids:
            if t < 0:
                raise ValueError(f"stop_token_ids must be non-negative, got {t}")
        for t, bias in self.logit_bias.items():
            if t < 0:
                raise ValueError(f"logit_bias key {str(t)!r} is not a token id (a non-negative integer)")
            if not -100 <= bias <= 100:  # also refuses nan
                raise ValueError(f"logit_bias[{str(t)!r}] must be in [-100, 100], got {bias}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be <= max_new_tokens ({self.max_new_tokens}), "
                             f"got {self.min_new_tokens}")
        given = [name for name in ("json_schema", "regex", "ebnf") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} are exclusive: give one grammar")
        for name in given:
            if not getattr(self, name).strip():
                raise ValueError(f"{name} must not be empty")
        if self.top_logprobs_num > 0:
            # Asking for alternatives only makes sense together with the chosen token's log-prob.
            self.logprobs = True

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with nothing that changes the logits (bias, penalties) and no log-probs: the argmax of the raw
        logits, which the scheduler takes without building the sampler's per-row tensors. `min_new_tokens` is
        checked per step by the caller (it holds back EOS only for a while)."""
        return (self.is_greedy and not self.logit_bias and not self.needs_penalty_state and not self.logprobs
                and not self.top_logprobs_num and self.grammar is None)

    @property
    def grammar(self) -> tuple[str, str] | None:
        """(kind, text) of the request's grammar, or None."""
        for kind in ("json_schema", "regex", "ebnf"):
            if getattr(self, kind) is not None:
                return kind, getattr(self, kind)
        return None

    @property
    def needs_penalty_state(self) -> bool:
        """Whether the sampler needs this request's `PenaltyState` (seen tokens / output counts)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def nth_sample(self, i: int) -> SamplingParams:
        """Parameters of the i-th of `n` samples: n = 1 and seed + i, so seeded samples differ yet reproduce."""
        if self.n == 1:
            return self
        return dataclasses.replace(self, n=1, seed=None if self.seed is None else self.seed + i)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Expected kind of each field: "int", "float", "bool", "opt_int" (int or None), "str_list", "int_list",
# "bias_map" (token id -> number; ids as integers or as the decimal strings JSON object keys are).
_FIELD_KINDS: dict[str, str] = {
    "max_new_tokens": "int",
    "temperature": "float",
    "top_p": "float",
    "top_k": "int",
    "min_p": "float",
    "stop": "str_list",
    "stop_token_ids": "int_list",
    "ignore_eos": "bool",
    "presence_penalty": "float",
    "frequency_penalty": "float",
    "repetition_penalty": "float",
    "seed": "opt_int",
    "n": "int",
    "skip_special_tokens": "bool",
    "spaces_between_special_tokens": "bool",
    "logprobs": "bool",
    "top_logprobs_num": "int",
    "logit_bias": "bias_map",
    "min_new_tokens": "int",
    "json_schema": "schema",
    "regex": "opt_str",
    "ebnf": "opt_str",
}
assert set(_FIELD_KINDS) == {f.name for f in dataclasses.fields(SamplingParams)}


_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `"top_k": true` is a client bug, not a 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int64(name: str, value: int) -> int:
    # Python ints are unbounded; everything past this point (msgpack, torch) takes 64-bit integers.
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"{name} is out of range: {value} does not fit a 64-bit integer")
    return value


def _coerce(name: str, value: Any) -> Any:
    kind = _FIELD_KINDS[name]
    if kind == "int":
        if not _is_int(value):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return _check_int64(name, value)
    if kind == "opt_int":
        if value is not None and not _is_int(value):
            raise ValueError(f"{name} must be an integer or null, got {value!r}")
        return value if value is None else _check_int64(name, value)
    if kind == "float":
        if not (_is_int(value) or isinstance(value, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a boolean, got {value!r}")
        return value
    if kind == "str_list":
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
            raise ValueError(f"{name} must be a string or a list of strings, got {value!r}")
        return list(value)
    if kind == "int_list":
        if value is None:
            return []
        if not isinstance(value, (list, tuple)) or not all(_is_int(t) for t in value):
            raise ValueError(f"{name} must be a list of integers, got {value!r}")
        return [_check_int64(name, t) for t in value]
    if kind == "opt_str":
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value
    if kind == "schema":
        if isinstance(value, dict):
            return json.dumps(value)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} must be a JSON schema (an object, or its JSON text), got {value!r}")
        return value
    if kind == "bias_map":
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be an object mapping token ids to numbers, got {value!r}")
        return {_token_key(name, key): _bias_value(name, key, bias) for key, bias in value.items()}
    raise AssertionError(kind)


def _token_key(name: str, key: Any) -> int:
    """A token id from a JSON object key ("50256") or an int, as OpenAI's logit_bias takes them."""
    if _is_int(key):
        return _check_int64(name, key)
    if isinstance(key, str) and key.isascii() and key.isdigit():
        return _check_int64(name, int(key))
    raise ValueError(f"{name} key {str(key)!r} is not a token id (a non-negative integer)")


def _bias_value(name: str, key: Any, value: Any) -> float:
    if not (_is_int(value) or isinstance(value, float)):
        raise ValueError(f"{name}[{str(key)!r}] must be a number, got {value!r}")
    return float(value)
