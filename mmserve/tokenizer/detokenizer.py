"""Streaming detokenization: `IncrementalDetokenizer` turns a growing list of output token ids into text
pieces in O(1) work per token, and the stop-string helpers (`find_stop_string`, `stop_holdback`) that let a
streaming response end at a stop string without ever showing part of it.

How the incremental decode works. Decoding one token at a time is wrong for two reasons: byte-level BPE
splits multi-byte UTF-8 characters across tokens (a lone piece decodes to U+FFFD), and SentencePiece-style
decoders strip the leading space of the first token of whatever they decode. So each step decodes a short
window `ids[prefix_offset:]` and compares it with the decode of `ids[prefix_offset:read_offset]` (the tokens
already shown, kept as left context): the new text is what the window adds. When the window's text ends in
U+FFFD, a character is still incomplete and nothing is emitted until later tokens complete it. After an
emission the window slides (prefix_offset = old read_offset, read_offset = end), so it stays a few tokens
long whatever the length of the output.
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens used as left context for the first output token: enough for a leading-space decision and
# for a multi-byte character split over several byte tokens.
_PROMPT_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Streams the text of one request's output.

    `append(ids)` returns the newly readable text; `finish()` flushes what was held back. After
    `finish()`, `text` equals a full decode of `output_ids` with the same options, exactly.

    Fix-up: if the streamed pieces are not a prefix of that full decode (possible only with decoders that
    are not additive over windows, e.g. a SentencePiece leading space that the prompt context preserved
    but a standalone decode strips, or a tokenizer with clean_up_tokenization_spaces), streamed text cannot
    be taken back. `finish()` then returns just the flushed remainder of the incremental decode, replaces
    `text` with the full decode, and sets `corrected = True`, so non-streaming responses stay exact.
    """

    def __init__(
        self,
        tokenizer: Any,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        prompt_ids: list[int] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.text: str = ""
        self.output_ids: list[int] = []
        self.corrected: bool = False
        self.finished: bool = False
        context = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:]) if prompt_ids else []
        self._ids: list[int] = context  # context tokens, then every output token
        self._prefix_offset = 0
        self._read_offset = len(context)

    def _decode(self, ids: list[int]) -> str:
        kwargs: dict[str, Any] = {"skip_special_tokens": self.skip_special_tokens}
        # Only slow tokenizers ever read this flag; passing the default would trip decoders that reject
        # unknown keyword arguments.
        if not self.spaces_between_special_tokens:
            kwargs["spaces_between_special_tokens"] = False
        return self.tokenizer.decode(ids, **kwargs)

    def _window_text(self, flush: bool) -> str:
        """Text the current window adds to what was emitted; '' while a character is incomplete."""
        if self._read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or (not flush and new_text.endswith(_REPLACEMENT_CHAR)):
            # Nothing readable yet (an incomplete character, or tokens that decode to nothing): keep the
            # window where it is so the tokens are decoded again together with the ones that follow.
            return ""
        # For additive decoders new_text starts with prefix_text; otherwise slicing by length is the best
        # estimate, and finish() repairs `text` against the full decode.
        piece = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return piece

    def append(self, token_ids: list[int]) -> str:
        if self.finished:
            raise RuntimeError("append() after finish()")
        self.output_ids.extend(token_ids)
        self._ids.extend(token_ids)
        piece = self._window_text(flush=False)
        self.text += piece
        return piece

    def finish(self) -> str:
        """Flush held-back text and make `text` exactly the full decode of `output_ids`."""
        if self.finished:
            return ""
        self.finished = True
        piece = self._window_text(flush=True)
        streamed = self.text + piece
        full = self._decode(self.output_ids)
        if full.startswith(streamed):
            piece += full[len(streamed) :]
        else:
            self.corrected = True
        self.text = full
        return piece


def find_stop_string(text: str, stops: list[str], search_from: int = 0) -> tuple[int, str] | None:
    """Earliest occurrence `(index, stop)` of any stop string ending after `search_from`, or None.

    Pass `search_from` = the length of the text already checked: a stop string that was split across tokens
    is then found once its last piece arrives, and text already checked is not searched again. Among stops
    starting at the same index, the first in `stops` wins."""
    best: tuple[int, str] | None = None
    for stop in stops:
        if not stop:
            continue
        # An occurrence ending after search_from starts at search_from - len(stop) + 1 or later.
        idx = text.find(stop, max(0, search_from - len(stop) + 1))
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, stop)
    return best


def stop_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string.

    A streaming response withholds that many trailing characters: they might be the start of a stop string
    that is trimmed once it completes, and a client must never see part of it."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest
