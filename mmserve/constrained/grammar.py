"""Constrained decoding with xgrammar: a request's JSON schema, regular expression or EBNF grammar becomes a
matcher that says, before each token, which tokens may come next (a bitmask over the vocabulary, applied to the
logits before sampling) and follows the tokens sampled.

- `grammar_error(kind, text)`: parse a grammar without a tokenizer, for a 400 in the API process before the engine
  sees the request (None when it parses).
- `GrammarCompiler`: the engine's compiler for one tokenizer and vocabulary (its token table built once), with
  compiled grammars cached by their text, so a schema sent again compiles once.
- `Grammar`: one request's matcher: `fill(bitmask, row)` before a step samples, `accept(token)` after, and
  `terminated` once the grammar is complete and a stop token accepted.

JSON schemas compile without free whitespace (`", "` and `": "` between items): a random or unsure model could
otherwise spend its whole budget on spaces, and compact JSON is what a caller parses anyway. Properties a schema
does not list are not allowed unless the schema says so (xgrammar's strict mode), as in OpenAI's strict outputs.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Collection
from typing import Any

import torch

KINDS = ("json_schema", "regex", "ebnf")
_CACHE_ENTRIES = 256
_JSON_SEPARATORS = (", ", ": ")


def _message(exc: Exception) -> str:
    """xgrammar's error without its source location prefix ("[12:00:00] /project/cpp/x.cc:83: ")."""
    return re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", str(exc)).strip()


def _parse(kind: str, text: str) -> Any:
    import xgrammar as xgr

    if kind == "json_schema":
        return xgr.Grammar.from_json_schema(text, any_whitespace=False, separators=_JSON_SEPARATORS)
    if kind == "regex":
        return xgr.Grammar.from_regex(text)
    if kind == "ebnf":
        return xgr.Grammar.from_ebnf(text)
    raise AssertionError(kind)


def grammar_error(kind: str, text: str) -> str | None:
    """Why `text` is not a valid grammar of `kind` (json_schema, regex, ebnf), or None."""
    try:
        _parse(kind, text)
    except (RuntimeError, ValueError, TypeError) as exc:
        return f"invalid {kind}: {_message(exc)}"
    return None


class GrammarCompiler:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Collection[int]):
        import xgrammar as xgr

        stops = sorted(t for t in stop_token_ids if 0 <= t < vocab_size)
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stops or None)
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.vocab_size = vocab_size
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, kind: str, text: str) -> Any:
        """The compiled grammar (cached by kind and text); ValueError naming the problem when it is not valid."""
        key = (kind, text)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            compiled = self._compiler.compile_grammar(_parse(kind, text))
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"invalid {kind}: {_message(exc)}") from exc
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > _CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return compiled

    def grammar(self, kind: str, text: str) -> Grammar:
        return Grammar(self.compile(kind, text))


class Grammar:
    """One request's position in its grammar."""

    def __init__(self, compiled: Any):
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(compiled)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Set row `row` of an int32 bitmask [B, ceil(V / 32)] (host memory) to the tokens allowed next."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advance past a sampled token; False when the grammar does not allow it (the mask should have kept it
        from being sampled)."""
        return self._matcher.accept_token(token_id)

    @property
    def terminated(self) -> bool:
        return self._matcher.is_terminated()


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [B, V] from an int32 bitmask [B, ceil(V / 32)] (bit j of word w: token 32 w + j)."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask.unsqueeze(-1) >> bits) & 1).bool().flatten(1)[:, :vocab_size]


def new_bitmask(rows: int, vocab_size: int, pin: bool = False) -> torch.Tensor:
    """An int32 bitmask with every token allowed (all bits set), on the host (pinned: for a copy to the GPU that
    does not wait)."""
    return torch.full((rows, -(-vocab_size // 32)), -1, dtype=torch.int32, pin_memory=pin)
