"""RequestState: the front end's view of one request, shared by the in-process Engine and the API server.

It folds the scheduler's TokenOutputs into detokenized text, trims a matched stop string, holds back a tail
that could still become a stop string while streaming, and builds SGLang-shaped results and stream chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmserve.messages import TokenOutput
from mmserve.sampling_params import SamplingParams
from mmserve.tokenizer.detokenizer import IncrementalDetokenizer, find_stop_string, stop_holdback


@dataclass
class RequestState:
    rid: str
    params: SamplingParams
    prompt_ids: list[int]
    detokenizer: IncrementalDetokenizer
    output_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    input_token_logprobs: list[float | None] | None = None
    input_top_logprobs: list[list[tuple[int, float]]] | None = None
    logits: list[Any] = field(default_factory=list)
    last: TokenOutput | None = None
    sent_text_len: int = 0
    sent_ids_len: int = 0
    # Text before this offset came while min_new_tokens held the request back: a stop string ending there did not
    # end it (scheduler/req.py), so it does not cut the text either.
    stop_search_from: int = 0
    # Fold in ids only and detokenize once when the request finishes: for a caller that reads the text only at
    # the end (the in-process Engine's non-streaming generate), which keeps per-token work off its thread.
    defer_text: bool = False
    detokenized: int = 0  # output ids already given to the detokenizer

    @classmethod
    def create(cls, rid: str, params: SamplingParams, prompt_ids: list[int], tokenizer: Any) -> RequestState:
        detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens, params.spaces_between_special_tokens,
                                       prompt_ids=prompt_ids)
        return cls(rid, params, prompt_ids, detok)

    @property
    def finished(self) -> bool:
        return self.last is not None and self.last.finished_reason is not None

    def absorb(self, out: TokenOutput) -> None:
        self.last = out
        self.output_ids.extend(out.new_token_ids)
        if out.token_logprobs:
            self.token_logprobs.extend(out.token_logprobs)
        if out.top_logprobs:
            self.top_logprobs.extend(out.top_logprobs)
        if out.input_token_logprobs is not None:
            self.input_token_logprobs = out.input_token_logprobs
            self.input_top_logprobs = out.input_top_logprobs
        if out.logits:
            self.logits.extend(out.logits)
        if self.defer_text and out.finished_reason is None:
            return
        new = self.output_ids[self.detokenized :]
        # Stop strings count from the min_new_tokens-th token on: find the text before it.
        held = self.params.min_new_tokens - 1 - self.detokenized
        if held > 0:
            self.detokenizer.append(new[:held])
            self.stop_search_from = len(self.detokenizer.text)
            self.detokenizer.append(new[held:])
        else:
            self.detokenizer.append(new)
        self.detokenized = len(self.output_ids)
        if out.finished_reason is not None:
            self.detokenizer.finish()

    def visible_text(self) -> str:
        """The text a client may see: cut at a matched stop string; while unfinished, without a tail that could
        still turn into one."""
        text, stops = self.detokenizer.text, self.params.stop
        if stops:
            hit = find_stop_string(text, stops, self.stop_search_from)
            if hit is not None:
                return text[: hit[0]]
            if not self.finished:
                return text[: len(text) - stop_holdback(text, stops)]
        return text

    def take_delta(self) -> tuple[str, list[int]]:
        """Text and token ids not yet handed out by a stream."""
        visible = self.visible_text()
        text, self.sent_text_len = visible[self.sent_text_len :], len(visible)
        ids, self.sent_ids_len = self.output_ids[self.sent_ids_len :], len(self.output_ids)
        return text, ids

    def meta(self) -> dict[str, Any]:
        out = self.last
        meta: dict[str, Any] = {
            "id": self.rid,
            "prompt_tokens": out.prompt_tokens if out else len(self.prompt_ids),
            "completion_tokens": len(self.output_ids),
            "cached_tokens": out.cached_tokens if out else 0,
            "finish_reason": out.finished_reason if out else None,
        }
        if self.params.logprobs:
            meta["output_token_logprobs"] = list(zip(self.token_logprobs, self.output_ids, strict=False))
        if self.params.top_logprobs_num:
            meta["output_top_logprobs"] = [list(t) for t in self.top_logprobs]
        if self.input_token_logprobs is not None:
            meta["input_token_logprobs"] = list(zip(self.input_token_logprobs, self.prompt_ids[-len(
                self.input_token_logprobs):] if self.input_token_logprobs else [], strict=False))
            meta["input_top_logprobs"] = self.input_top_logprobs
        if self.logits:
            meta["logits"] = self.logits
        return meta

    def result(self) -> dict[str, Any]:
        return {"text": self.visible_text(), "output_ids": list(self.output_ids), "meta_info": self.meta()}

    def chunk(self) -> dict[str, Any]:
        text, ids = self.take_delta()
        return {"text": text, "output_ids": ids, "finished": self.finished, "meta_info": self.meta()}
