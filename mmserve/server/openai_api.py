"""OpenAI chat/completions and SGLang /generate on top of the TokenizerManager: request -> SamplingParams,
engine outputs -> response bodies and SSE streams."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from mmserve.messages import WireMultimodal
from mmserve.multimodal.processor import media_parts
from mmserve.sampling_params import SamplingParams
from mmserve.server.errors import APIError, error_body
from mmserve.server.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequestBody
from mmserve.tokenizer.chat_template import check_template_kwargs, validate_messages
from mmserve.tokenizer.manager import TokenizerManager
from mmserve.tokenizer.request_state import RequestState

logger = logging.getLogger(__name__)

_PASS_THROUGH = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                 "repetition_penalty", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
                 "stop_token_ids")
_MAX_N = 128
_MAX_TOP_LOGPROBS = 20


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class OpenAIServing:
    def __init__(self, manager: TokenizerManager, model_name: str):
        self.manager = manager
        self.model_name = model_name
        self.tokenizer = manager.tokenizer

    # ----- shared -----

    def _check_unsupported(self, body: Any) -> None:
        for name in ("regex", "json_schema", "ebnf"):
            if getattr(body, name, None) is not None:
                raise APIError(400, f"{name} (constrained decoding) is not supported yet", param=name)
        fmt = getattr(body, "response_format", None)
        if fmt and fmt.get("type") not in (None, "text"):
            raise APIError(400, f"response_format {fmt.get('type')!r} is not supported yet", param="response_format")
        if not 1 <= body.n <= _MAX_N:
            raise APIError(400, f"n must be in [1, {_MAX_N}], got {body.n}", param="n")

    def _params(self, body: Any, max_new_tokens: int, logprobs: bool, top_logprobs: int) -> SamplingParams:
        values: dict[str, Any] = {"max_new_tokens": max_new_tokens, "logprobs": logprobs,
                                  "top_logprobs_num": top_logprobs}
        for name in _PASS_THROUGH:
            if getattr(body, name, None) is not None:
                values[name] = getattr(body, name)
        if body.stop is not None:
            values["stop"] = body.stop
        try:
            return SamplingParams.from_dict(values)
        except ValueError as exc:
            name = str(exc).split(" ", 1)[0]
            raise APIError(400, str(exc), param=name if name in values else None) from exc

    def _budget(self, prompt_len: int, max_tokens: int | None, param: str, prompt_param: str = "prompt",
                expanded: bool = False) -> int:
        """max_new_tokens for a prompt; refuses what cannot fit the context with the numbers."""
        context = self.manager.info.context_len
        if prompt_len >= context:
            how = "is too long after expanding multimodal tokens: it has" if expanded else "has"
            raise APIError(400, f"the prompt {how} {prompt_len} tokens, but the model's context length is {context} "
                                "tokens; shorten the prompt", param=prompt_param, code="context_length_exceeded")
        if max_tokens is None:
            return context - prompt_len
        if max_tokens < 0:
            raise APIError(400, f"{param} must be >= 0, got {max_tokens}", param=param)
        if prompt_len + max_tokens > context:
            raise APIError(400, f"this model's context length is {context} tokens, but {prompt_len + max_tokens} were "
                                f"requested ({prompt_len} in the prompt, {max_tokens} to generate); lower {param}",
                           param=param, code="context_length_exceeded")
        return max_tokens

    def _check_size(self, text: str, param: str) -> None:
        """Refuse a prompt whose UTF-8 size alone proves it exceeds the context, before spending seconds of CPU
        tokenizing it: no token stands for more than `max_bytes_per_token` bytes."""
        per_token = self.manager.max_bytes_per_token
        context = self.manager.info.context_len
        if per_token is None or len(text) * 4 <= context * per_token:  # 1 to 4 bytes a character
            return
        size = len(text.encode("utf-8"))
        if size > context * per_token:
            raise APIError(400, f"the prompt is {size} bytes of UTF-8 text, more than the model's context length of "
                                f"{context} tokens can hold (no token of this tokenizer stands for more than "
                                f"{per_token:g} bytes); shorten the prompt", param=param,
                           code="context_length_exceeded")

    async def _encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        self._check_size(text, param)
        return await self.manager.encode_async(text, add_special_tokens=add_special_tokens)

    def _copies(self, rid: str, ids: list[int], params: SamplingParams, n: int,
                start: int = -1) -> list[tuple[str, list[int], SamplingParams, int]]:
        """n jobs for one prompt (seed + i keeps seeded samples distinct and reproducible)."""
        return [(rid if n == 1 else f"{rid}-{i}", ids, dataclasses.replace(params, n=n).nth_sample(i), start)
                for i in range(n)]

    def _check_ids(self, ids: list[int], param: str) -> None:
        vocab = self.manager.info.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", param=param)

    def _submit_all(self, rid: str, jobs: list[tuple[str, list[int], SamplingParams, int]],
                    mm: WireMultimodal | None = None) -> list[AsyncIterator[RequestState]]:
        """Submit every job of the request `rid` (all validated beforehand) as one group: all or none, and
        `/abort_request` with `rid` reaches exactly these."""
        return self.manager.submit_group(rid, jobs, mm)

    async def _finals(self, gens: list[AsyncIterator[RequestState]]) -> list[RequestState]:
        async def last(gen: AsyncIterator[RequestState]) -> RequestState:
            final = None
            async for state in gen:
                final = state
            return final

        return list(await asyncio.gather(*(last(g) for g in gens)))

    def _usage(self, states: list[RequestState], prompt_tokens: int) -> dict[str, Any]:
        completion = sum(len(s.output_ids) for s in states)
        cached = max((s.last.cached_tokens for s in states if s.last), default=0)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # ----- chat -----

    async def chat(self, body: ChatCompletionRequest):
        self._check_unsupported(body)
        kwargs = dict(body.chat_template_kwargs or {})
        try:
            check_template_kwargs(self.tokenizer, kwargs)
        except ValueError as exc:
            raise APIError(400, str(exc), param="chat_template_kwargs") from exc
        if body.tools:
            kwargs["tools"] = body.tools
        try:
            validate_messages(body.messages)  # before anything reads them
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        media = media_parts(body.messages)
        if media and self.manager.mm_processor is None:
            raise APIError(400, f"{self.model_name} is a text model: it takes no images or other media",
                           param="messages")
        try:
            text = await self.manager.render_chat_async(body.messages, **kwargs)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        mm = None
        if media:
            self._check_size(text, "messages")  # the placeholders only grow it
            ids, mm = await self.manager.process_media(text, media)
        else:
            ids = await self._encode(text, "messages", add_special_tokens=False)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        top = body.top_logprobs or 0
        if not 0 <= top <= _MAX_TOP_LOGPROBS:
            raise APIError(400, f"top_logprobs must be in [0, {_MAX_TOP_LOGPROBS}], got {top}", param="top_logprobs")
        if top and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        params = self._params(body, self._budget(len(ids), max_tokens, param, "messages", expanded=mm is not None),
                              body.logprobs, top)
        rid = body.rid or f"chatcmpl-{uuid.uuid4().hex}"
        self.manager.check_capacity(body.n)
        gens = self._submit_all(rid, self._copies(rid, ids, params, body.n), mm)
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self._chat_stream(rid, created, await _primed(gens), len(ids), include_usage)
        states = await self._finals(gens)
        choices = [{
            "index": i,
            "message": {"role": "assistant", "content": s.visible_text()},
            "logprobs": self._chat_logprobs(s, 0) if body.logprobs else None,
            "finish_reason": _finish(s),
        } for i, s in enumerate(states)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": choices, "usage": self._usage(states, len(ids))}

    def _chat_logprobs(self, state: RequestState, start: int) -> dict[str, Any]:
        content = []
        for i in range(start, len(state.token_logprobs)):
            token = self._token_text(state.output_ids[i])
            entry = {"token": token, "logprob": state.token_logprobs[i], "bytes": list(token.encode()),
                     "top_logprobs": []}
            if i < len(state.top_logprobs):
                for tid, lp in state.top_logprobs[i]:
                    t = self._token_text(tid)
                    entry["top_logprobs"].append({"token": t, "logprob": lp, "bytes": list(t.encode())})
            content.append(entry)
        return {"content": content}

    async def _chat_stream(self, rid: str, created: int, gens, prompt_tokens: int,
                           include_usage: bool) -> AsyncIterator[str]:
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name}
        for i in range(len(gens)):
            yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
        finals: dict[int, RequestState] = {}
        sent_logprobs = [0] * len(gens)
        async for i, state in _merge(gens):
            if i in finals:  # a queued update of a stream already closed
                continue
            n_before = sent_logprobs[i]
            text, _ = state.take_delta()
            logprobs = None
            if state.params.logprobs:
                logprobs = self._chat_logprobs(state, n_before)
                sent_logprobs[i] = len(state.token_logprobs)
            if text or logprobs and logprobs["content"] or state.finished:
                yield sse({**base, "choices": [{"index": i, "delta": {"content": text} if text else {},
                                                "logprobs": logprobs,
                                                "finish_reason": _finish(state) if state.finished else None}]})
            if state.finished:
                finals[i] = state
        if include_usage:
            yield sse({**base, "choices": [], "usage": self._usage(list(finals.values()), prompt_tokens)})
        yield SSE_DONE

    # ----- completions -----

    async def _prompts(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            return [await self._encode(prompt, "prompt")]
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            self._check_ids(prompt, "prompt")
            return [list(prompt)]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return [await self._encode(p, "prompt") for p in prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(p, list) and p for p in prompt):
            for p in prompt:
                self._check_ids(p, "prompt")
            return [list(p) for p in prompt]
        raise APIError(400, "prompt must be a non-empty string, list of strings, or (list of) token id lists",
                       param="prompt")

    async def completions(self, body: CompletionRequest):
        self._check_unsupported(body)
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of is not supported", param="best_of")
        top = body.logprobs
        if top is not None and not 0 <= top <= _MAX_TOP_LOGPROBS:
            raise APIError(400, f"logprobs must be in [0, {_MAX_TOP_LOGPROBS}], got {top}", param="logprobs")
        prompts = await self._prompts(body.prompt)
        if body.stream and len(prompts) > 1:
            raise APIError(400, "streaming takes a single prompt", param="prompt")
        rid = body.rid or f"cmpl-{uuid.uuid4().hex}"
        self.manager.check_capacity(body.n * len(prompts))
        jobs = []
        for p_idx, ids in enumerate(prompts):
            params = self._params(body, self._budget(len(ids), body.max_tokens, "max_tokens"), top is not None,
                                  top or 0)
            start = 0 if body.echo and top is not None else -1
            sub = rid if len(prompts) == 1 else f"{rid}-p{p_idx}"
            jobs.extend(self._copies(sub, ids, params, body.n, start))
        gens = self._submit_all(rid, jobs)
        created = int(time.time())
        if body.stream:
            return self._completion_stream(rid, created, await _primed(gens), prompts[0], body)
        states = await self._finals(gens)
        choices = []
        for i, s in enumerate(states):
            prompt_ids = prompts[i // body.n]
            text = s.visible_text()
            if body.echo:
                text = self.tokenizer.decode(prompt_ids) + text
            choices.append({"index": i, "text": text, "finish_reason": _finish(s),
                            "logprobs": self._completion_logprobs(s, prompt_ids, body.echo) if top is not None
                            else None})
        usage = self._usage(states, sum(len(p) for p in prompts))
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": choices, "usage": usage}

    def _completion_logprobs(self, state: RequestState, prompt_ids: list[int], echo: bool,
                             start: int = 0) -> dict[str, Any]:
        tokens: list[int] = []
        lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        if echo and start == 0:
            tokens.extend(prompt_ids)
            lps.extend(state.input_token_logprobs or [None] * len(prompt_ids))
            for t in state.input_top_logprobs or [[] for _ in prompt_ids]:
                tops.append({self._token_text(tid): lp for tid, lp in t} or None)
        for i in range(start, len(state.token_logprobs)):
            tokens.append(state.output_ids[i])
            lps.append(state.token_logprobs[i])
            tops.append({self._token_text(tid): lp for tid, lp in state.top_logprobs[i]}
                        if i < len(state.top_logprobs) else None)
        texts = [self._token_text(t) for t in tokens]
        offsets, pos = [], 0
        for t in texts:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    async def _completion_stream(self, rid: str, created: int, gens, prompt_ids: list[int],
                                 body: CompletionRequest) -> AsyncIterator[str]:
        base = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}
        finals: dict[int, RequestState] = {}
        echoed = [False] * len(gens)
        sent = [0] * len(gens)
        async for i, state in _merge(gens):
            if i in finals:
                continue
            text, _ = state.take_delta()
            logprobs = None
            if body.logprobs is not None:
                logprobs = self._completion_logprobs(state, prompt_ids, body.echo and not echoed[i], sent[i])
                sent[i] = len(state.token_logprobs)
            if body.echo and not echoed[i]:
                text = self.tokenizer.decode(prompt_ids) + text
                echoed[i] = True
            yield sse({**base, "choices": [{"index": i, "text": text, "logprobs": logprobs,
                                            "finish_reason": _finish(state) if state.finished else None}]})
            if state.finished:
                finals[i] = state
        if body.stream_options and body.stream_options.include_usage:
            yield sse({**base, "choices": [], "usage": self._usage(list(finals.values()), len(prompt_ids))})
        yield SSE_DONE

    # ----- SGLang native -----

    async def generate(self, body: GenerateRequestBody):
        if (body.text is None) == (body.input_ids is None):
            raise APIError(400, "give exactly one of text and input_ids")
        single = isinstance(body.text, str) or (body.input_ids is not None and body.input_ids
                                                and isinstance(body.input_ids[0], int))
        mm = None
        if body.image_data is not None:
            if not isinstance(body.text, str):
                raise APIError(400, "image_data goes with a single text prompt", param="image_data")
            images = body.image_data if isinstance(body.image_data, list) else [body.image_data]
            self._check_size(body.text, "text")
            ids, mm = await self.manager.process_media(body.text, [("image", src) for src in images])
            prompts = [ids]
        elif body.text is not None:
            prompts = [await self._encode(t, "text") for t in ([body.text] if single else body.text)]
        else:
            prompts = [list(body.input_ids)] if single else [list(p) for p in body.input_ids]
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "the prompt is empty")
        for p in prompts if mm is None else []:  # media placeholders may lie outside the text vocabulary
            self._check_ids(p, "input_ids")
            if body.logprob_start_len >= len(p):
                raise APIError(400, f"logprob_start_len {body.logprob_start_len} must be < the prompt length {len(p)}",
                               param="logprob_start_len")
        values = dict(body.sampling_params or {})
        if body.return_logprob:
            values.setdefault("logprobs", True)
        if body.top_logprobs_num:
            values.setdefault("top_logprobs_num", body.top_logprobs_num)
        try:
            params = SamplingParams.from_dict(values)
        except ValueError as exc:
            raise APIError(400, str(exc), param="sampling_params") from exc
        if params.n != 1:
            raise APIError(400, "/generate takes n == 1; send several prompts instead", param="sampling_params.n")
        rid = body.rid or uuid.uuid4().hex
        if body.stream:
            if len(prompts) != 1:
                raise APIError(400, "streaming takes a single prompt")
            [gen] = self._submit_all(rid, [(rid, prompts[0], params, body.logprob_start_len)], mm)
            return self._generate_stream((await _primed([gen]))[0])
        self.manager.check_capacity(len(prompts))
        gens = self._submit_all(rid, [(rid if single else f"{rid}-{i}", p, params, body.logprob_start_len)
                                      for i, p in enumerate(prompts)], mm)
        results = [s.result() for s in await self._finals(gens)]
        return results[0] if single else results

    async def _generate_stream(self, gen: AsyncIterator[RequestState]) -> AsyncIterator[str]:
        async for state in gen:
            yield sse(state.chunk())
        yield SSE_DONE


async def _primed(gens: list[AsyncIterator[RequestState]]) -> list[AsyncIterator[RequestState]]:
    """Wait for every stream's first output before the HTTP response starts, so a request the engine refuses
    still gets a JSON error status rather than a broken event stream."""
    firsts = await asyncio.gather(*(anext(g) for g in gens), return_exceptions=True)
    failed = next((f for f in firsts if isinstance(f, BaseException)), None)
    if failed is not None:
        for g in gens:
            await g.aclose()
        raise failed

    async def resume(first: RequestState, gen: AsyncIterator[RequestState]) -> AsyncIterator[RequestState]:
        try:
            yield first
            async for state in gen:
                yield state
        finally:
            await gen.aclose()

    return [resume(f, g) for f, g in zip(firsts, gens, strict=True)]


async def sse_with_errors(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """An error after the stream started (e.g. the engine died, the server is stopping) ends it with an
    OpenAI-shaped error event and [DONE] instead of cutting it."""
    try:
        async for event in events:
            yield event
    except APIError as exc:
        yield sse(error_body(exc.status, exc.message, exc.param, exc.code))
        yield SSE_DONE
    except Exception as exc:
        logger.exception("a stream failed")
        yield sse(error_body(500, f"internal server error ({type(exc).__name__}); the server log has the details"))
        yield SSE_DONE


def _finish(state: RequestState) -> str | None:
    reason = state.last.finished_reason if state.last else None
    return None if reason is None else reason["type"]


async def _merge(gens: list[AsyncIterator[RequestState]]) -> AsyncIterator[tuple[int, RequestState]]:
    """Interleave several request streams as (index, state) in arrival order; closes them all on exit."""
    if len(gens) == 1:
        try:
            async for state in gens[0]:
                yield 0, state
        finally:
            await gens[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: AsyncIterator[RequestState]) -> None:
        try:
            async for state in gen:
                await queue.put((i, state, None))
        except Exception as exc:  # forwarded to the consumer
            await queue.put((i, None, exc))
        finally:
            await queue.put((i, None, StopAsyncIteration()))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    done = 0
    try:
        while done < len(gens):
            i, state, exc = await queue.get()
            if isinstance(exc, StopAsyncIteration):
                done += 1
            elif exc is not None:
                raise exc
            else:
                yield i, state
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
