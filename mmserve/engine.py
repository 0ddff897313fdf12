"""Engine: the in-process Python API. Loads a model, runs the scheduler in a background thread, and turns
prompts into text (tokenizing, detokenizing incrementally, trimming stop strings, streaming).

    with Engine(model_path="path/to/model") as engine:
        engine.generate("The capital of France is", {"temperature": 0, "max_new_tokens": 16})
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from mmserve.config import ModelConfig, ServerArgs
from mmserve.messages import AbortRequest, GenerateRequest, TokenOutput
from mmserve.models.loader import (
    generation_eos_ids,
    load_hf_config,
    load_tokenizer,
    resolve_model_path,
)
from mmserve.runner.model_runner import ModelRunner
from mmserve.sampling_params import SamplingParams
from mmserve.scheduler.scheduler import Scheduler
from mmserve.tokenizer.detokenizer import IncrementalDetokenizer, find_stop_string, stop_holdback

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05


@dataclass
class _RequestState:
    """Front-end view of one request: its detokenized text so far and what was already handed out."""

    rid: str
    params: SamplingParams
    prompt_ids: list[int]
    detokenizer: IncrementalDetokenizer
    outputs: queue.Queue = field(default_factory=queue.Queue)
    output_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    sent_text_len: int = 0
    sent_ids_len: int = 0


class Engine:
    """Generate with a model in this process. Keyword arguments are the server's flags (see ServerArgs)."""

    def __init__(self, **kwargs: Any):
        self.args = ServerArgs(**kwargs)
        self.device = self.args.resolved_device()
        checkpoint = resolve_model_path(self.args.model_path, self.args.revision)
        hf_config = load_hf_config(checkpoint, self.args.trust_remote_code)
        tok_path = resolve_model_path(self.args.tokenizer_path, self.args.revision) if self.args.tokenizer_path \
            else checkpoint
        self.tokenizer = load_tokenizer(tok_path, self.args.trust_remote_code)
        eos = generation_eos_ids(checkpoint) or _config_eos(hf_config)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.model_config = ModelConfig.from_hf(hf_config, self.args, self.device, eos)
        self.runner = ModelRunner(self.model_config, self.args, checkpoint, self.device)
        self.scheduler = Scheduler(self.args, self.model_config, self.runner, self.tokenizer)
        self._inbox: queue.Queue = queue.Queue()
        self._states: dict[str, _RequestState] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="mmserve-scheduler", daemon=True)
        self._thread.start()
        logger.info("engine ready: %s, %s, context %d, KV cache %d tokens", self.args.model_path,
                    str(self.model_config.dtype).removeprefix("torch."), self.model_config.context_len,
                    self.runner.max_total_tokens)

    # ----- public API -----

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        stream: bool = False,
        return_logits: bool = False,
    ) -> dict[str, Any] | list[Any] | Iterator[dict[str, Any]]:
        """Generate for one prompt (a dict back) or a list of prompts (a list back, in order).

        With `n` > 1 a prompt gives a list of n results. With `stream=True` (one prompt, n == 1) an iterator
        of chunks whose "text" pieces concatenate to the final text.
        """
        single = (prompt is not None and isinstance(prompt, str)) or (
            input_ids is not None and len(input_ids) > 0 and isinstance(input_ids[0], int))
        if prompt is not None and input_ids is not None:
            raise ValueError("give either prompt or input_ids, not both")
        if prompt is None and input_ids is None:
            raise ValueError("give a prompt or input_ids")
        if single:
            token_lists = [list(input_ids) if input_ids is not None else self._encode(prompt)]
        elif input_ids is not None:
            token_lists = [list(ids) for ids in input_ids]
        else:
            token_lists = [self._encode(p) for p in prompt]
        params_list = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(token_lists)
        if len(params_list) != len(token_lists):
            raise ValueError(f"got {len(params_list)} sampling_params for {len(token_lists)} prompts")
        parsed = [SamplingParams.from_dict(p) for p in params_list]
        if stream:
            if len(token_lists) != 1 or parsed[0].n != 1:
                raise ValueError("stream=True takes one prompt with n == 1")
            return self._stream(self._submit(token_lists[0], parsed[0], return_logits))
        groups = [[self._submit(ids, _nth_copy(p, i), return_logits) for i in range(p.n)]
                  for ids, p in zip(token_lists, parsed, strict=True)]
        results = [[self._wait(state) for state in group] for group in groups]
        results = [group[0] if len(group) == 1 else group for group in results]
        return results[0] if single else results

    def chat(self, messages: list[dict[str, Any]], sampling_params: dict[str, Any] | None = None,
             stream: bool = False, **template_kwargs: Any):
        """Apply the tokenizer's chat template (with the generation prompt) and generate."""
        ids = self.apply_chat_template(messages, **template_kwargs)
        return self.generate(input_ids=ids, sampling_params=sampling_params, stream=stream)

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        if not messages:
            raise ValueError("messages must not be empty")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("this tokenizer has no chat template")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def abort(self, rid: str) -> None:
        self._inbox.put(AbortRequest(rid))

    def shutdown(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._thread.join(timeout=30)
        # Drop the model and the KV cache now rather than whenever the Engine object is collected.
        del self.scheduler, self.runner
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ----- front end -----

    def _encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"prompt must be a string, got {type(text).__name__}")
        return self.tokenizer.encode(text)

    def _submit(self, ids: list[int], params: SamplingParams, return_logits: bool) -> _RequestState:
        if self._error is not None or self._stopped.is_set():
            raise RuntimeError("the engine is not running") from self._error
        rid = uuid.uuid4().hex
        detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens,
                                       params.spaces_between_special_tokens, prompt_ids=ids)
        state = _RequestState(rid, params, ids, detok)
        with self._lock:
            self._states[rid] = state
        self._inbox.put(GenerateRequest(rid, ids, params.to_dict(), return_logits))
        return state

    def _next(self, state: _RequestState) -> TokenOutput | BaseException:
        while True:
            try:
                return state.outputs.get(timeout=1.0)
            except queue.Empty:
                if self._error is not None:
                    return RuntimeError(f"the engine stopped: {self._error!r}")

    def _absorb(self, state: _RequestState, out: TokenOutput) -> str:
        """Fold one scheduler output into the request's state; returns the newly readable text."""
        state.output_ids.extend(out.new_token_ids)
        if out.token_logprobs:
            state.token_logprobs.extend(out.token_logprobs)
        if out.top_logprobs:
            state.top_logprobs.extend(out.top_logprobs)
        if out.logits:
            state.logits.extend(out.logits)
        piece = state.detokenizer.append(out.new_token_ids)
        if out.finished_reason is not None:
            piece += state.detokenizer.finish()
        return piece

    def _visible_text(self, state: _RequestState, finished_reason: dict | None) -> str:
        """The text a client may see: cut at a matched stop string, and while streaming without the tail that
        could still turn into a stop string."""
        text, stops = state.detokenizer.text, state.params.stop
        if stops:
            hit = find_stop_string(text, stops, 0)
            if hit is not None:
                return text[: hit[0]]
            if finished_reason is None:
                return text[: len(text) - stop_holdback(text, stops)]
        return text

    def _result(self, state: _RequestState, out: TokenOutput) -> dict[str, Any]:
        return {
            "text": self._visible_text(state, out.finished_reason),
            "output_ids": list(state.output_ids),
            "meta_info": self._meta(state, out),
        }

    def _meta(self, state: _RequestState, out: TokenOutput) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "id": state.rid,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "cached_tokens": out.cached_tokens,
            "finish_reason": out.finished_reason,
        }
        if state.params.logprobs or state.params.top_logprobs_num:
            meta["output_token_logprobs"] = list(zip(state.token_logprobs, state.output_ids, strict=False))
        if state.params.top_logprobs_num:
            meta["output_top_logprobs"] = [list(t) for t in state.top_logprobs]
        if state.logits:
            meta["logits"] = state.logits
        return meta

    def _wait(self, state: _RequestState) -> dict[str, Any]:
        while True:
            out = self._next(state)
            if isinstance(out, BaseException):
                raise out
            self._absorb(state, out)
            if out.finished_reason is not None:
                return self._result(state, out)

    def _stream(self, state: _RequestState) -> Iterator[dict[str, Any]]:
        finished = False
        try:
            while not finished:
                out = self._next(state)
                if isinstance(out, BaseException):
                    raise out
                self._absorb(state, out)
                finished = out.finished_reason is not None
                visible = self._visible_text(state, out.finished_reason)
                delta, state.sent_text_len = visible[state.sent_text_len :], len(visible)
                ids, state.sent_ids_len = state.output_ids[state.sent_ids_len :], len(state.output_ids)
                yield {"text": delta, "output_ids": ids, "finished": finished, "meta_info": self._meta(state, out)}
        finally:
            if not finished:  # the consumer stopped early: free the request's resources
                self.abort(state.rid)

    # ----- scheduler thread -----

    def _loop(self) -> None:
        scheduler = self.scheduler
        try:
            while not self._stopped.is_set():
                self._drain_inbox(block=not scheduler.has_work())
                if scheduler.has_work():
                    self._deliver(scheduler.step())
        except BaseException as exc:  # surface the failure to every waiting caller
            logger.exception("scheduler loop failed")
            self._error = exc

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        for msg in itertools.chain([item], _drain(self._inbox)):
            if isinstance(msg, AbortRequest):
                self.scheduler.abort(msg.rid)
                continue
            try:
                self.scheduler.add_request(msg)
            except ValueError as exc:
                self._fail(msg.rid, exc)

    def _fail(self, rid: str, exc: BaseException) -> None:
        with self._lock:
            state = self._states.pop(rid, None)
        if state is not None:
            state.outputs.put(exc)

    def _deliver(self, outputs: list[TokenOutput]) -> None:
        for out in outputs:
            with self._lock:
                state = self._states.get(out.rid) if out.finished_reason is None else self._states.pop(out.rid, None)
            if state is not None:
                state.outputs.put(out)


def _nth_copy(params: SamplingParams, i: int) -> SamplingParams:
    """The i-th of n samples: its own seed (seed + i) so n seeded samples differ but stay reproducible."""
    if params.n == 1:
        return params
    return dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + i)


def _drain(q: queue.Queue) -> Iterator[Any]:
    while True:
        try:
            yield q.get_nowait()
        except queue.Empty:
            return


def _config_eos(hf_config: Any) -> set[int]:
    eos = getattr(hf_config, "eos_token_id", None)
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)
