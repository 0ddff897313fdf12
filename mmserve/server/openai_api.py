"""OpenAI chat/completions and SGLang /generate on top of the TokenizerManager: request -> SamplingParams,
engine outputs -> response bodies and SSE streams."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from mmserve.constrained.grammar import grammar_error
from mmserve.messages import WireMultimodal
from mmserve.multimodal.processor import media_parts
from mmserve.sampling_params import SamplingParams
from mmserve.server.errors import APIError, error_body
from mmserve.server.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequestBody
from mmserve.server.reasoning import PARSERS as REASONING_PARSERS
from mmserve.server.reasoning import ReasoningFormat, ReasoningStream, split_reasoning
from mmserve.server.tool_parser import PARSERS as TOOL_PARSERS
from mmserve.server.tool_parser import (
    PartialCall,
    ToolCall,
    ToolParser,
    ToolStream,
    function_of,
    named_partial,
    named_schema,
    parse_required,
    required_schema,
)
from mmserve.tokenizer.chat_template import check_template_kwargs, validate_messages
from mmserve.tokenizer.manager import TokenizerManager
from mmserve.tokenizer.request_state import RequestState

logger = logging.getLogger(__name__)

_PASS_THROUGH = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                 "repetition_penalty", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
                 "stop_token_ids", "logit_bias")
# Constrained decoding, by the names clients send it under: SGLang's fields, vLLM's (older guided_* and newer
# structured_outputs keys), each -> (the sampling parameter, how its value becomes that parameter's text)
_GRAMMAR_FIELDS = {"json_schema": "json_schema", "regex": "regex", "ebnf": "ebnf", "guided_json": "json_schema",
                   "guided_regex": "regex", "guided_grammar": "ebnf", "guided_choice": "choice"}
_STRUCTURED_OUTPUTS = {"json": "json_schema", "regex": "regex", "grammar": "ebnf", "choice": "choice"}
_MAX_N = 128


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class OpenAIServing:
    def __init__(self, manager: TokenizerManager, model_name: str):
        self.manager = manager
        self.model_name = model_name
        self.tokenizer = manager.tokenizer
        # the engine's bound (--max-logprobs), checked here too so the 400 names the OpenAI parameter
        self.max_logprobs = manager.args.max_logprobs
        parser = manager.args.reasoning_parser
        self.reasoning = REASONING_PARSERS[parser] if parser else None
        tools = manager.args.tool_call_parser
        self.tool_parser = TOOL_PARSERS[tools]() if tools else None

    # ----- shared -----

    def _check_unsupported(self, body: Any) -> None:
        if getattr(body, "use_beam_search", None):
            raise APIError(400, "use_beam_search is not supported: this server has no beam search",
                           param="use_beam_search")
        if getattr(body, "media_io_kwargs", None):
            raise APIError(400, "media_io_kwargs is not supported yet: media are loaded with the server's settings",
                           param="media_io_kwargs")
        for name in ("functions", "function_call"):  # OpenAI's deprecated names for tools and tool_choice
            if getattr(body, name, None) not in (None, "none", []):
                raise APIError(400, f"{name} is not supported: this server does not produce function calls",
                               param=name)
        plp = getattr(body, "prompt_logprobs", None)
        if plp is not None:
            if not 0 <= plp <= self.max_logprobs:
                raise APIError(400, f"prompt_logprobs must be in [0, {self.max_logprobs}], got {plp}",
                               param="prompt_logprobs")
            if body.stream:
                raise APIError(400, "prompt_logprobs are not available when stream=true", param="prompt_logprobs")
        if not 1 <= body.n <= _MAX_N:
            raise APIError(400, f"n must be in [1, {_MAX_N}], got {body.n}", param="n")

    def _tool_mode(self, body: ChatCompletionRequest) -> tuple[str, str | None]:
        """("none" | "auto" | "required" | "named", the named function) from `tools` and `tool_choice`."""
        tools, choice = body.tools or [], body.tool_choice
        for i, tool in enumerate(tools):
            try:
                function_of(tool)
            except ValueError as exc:
                raise APIError(400, f"tools[{i}]: {exc}", param="tools") from exc
        if choice is None:
            choice = "auto" if tools else "none"
        if choice == "none":
            return "none", None
        if not tools:
            raise APIError(400, f"tool_choice {json.dumps(choice)} needs tools", param="tool_choice")
        if choice == "auto":
            if self.tool_parser is None:
                raise APIError(400, "tool_choice \"auto\" needs the server started with --tool-call-parser (the "
                                    "model's format of writing calls); \"required\", a named function and "
                                    "\"none\" work without it", param="tool_choice")
            return "auto", None
        if choice == "required":
            return "required", None
        fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise APIError(400, 'tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                                '{"name": ...}}', param="tool_choice")
        try:
            named_schema(tools, name)
        except ValueError as exc:
            raise APIError(400, str(exc), param="tool_choice") from exc
        return "named", name

    def _grammar(self, body: Any, tool_schema: dict[str, Any] | None = None) -> dict[str, str]:
        """The request's grammar as one sampling parameter ({} for none): from `response_format`, SGLang's
        `json_schema` / `regex` / `ebnf`, or vLLM's `guided_*` and `structured_outputs`; checked here, so a
        schema or pattern that does not parse is a 400 naming its field."""
        given: list[tuple[str, str, Any]] = []  # (field, kind, value)
        fmt = getattr(body, "response_format", None)
        if fmt is not None:
            if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
                raise APIError(400, "response_format.type must be text, json_object or json_schema",
                               param="response_format")
            if fmt["type"] == "json_object":
                given.append(("response_format", "json_schema", {"type": "object"}))
            elif fmt["type"] == "json_schema":
                spec = fmt.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                    raise APIError(400, 'response_format.json_schema must be an object with a "schema" object',
                                   param="response_format")
                given.append(("response_format", "json_schema", spec.get("schema", {})))
        for name, kind in _GRAMMAR_FIELDS.items():
            if getattr(body, name, None) is not None:
                given.append((name, kind, getattr(body, name)))
        if tool_schema is not None:
            given.append(("tool_choice", "json_schema", tool_schema))
        outputs = getattr(body, "structured_outputs", None)
        if outputs is not None:
            if not isinstance(outputs, dict) or set(outputs) - set(_STRUCTURED_OUTPUTS):
                raise APIError(400, f"structured_outputs takes one of {', '.join(_STRUCTURED_OUTPUTS)}",
                               param="structured_outputs")
            given += [("structured_outputs", _STRUCTURED_OUTPUTS[k], v) for k, v in outputs.items() if v is not None]
        if not given:
            return {}
        if len(given) > 1:
            raise APIError(400, f"give one grammar, got {', '.join(sorted({f for f, _, _ in given}))}",
                           param=given[1][0])
        field, kind, value = given[0]
        if kind == "choice":
            if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
                raise APIError(400, f"{field} choice must be a non-empty list of non-empty strings", param=field)
            kind, value = "regex", "|".join(re.escape(c) for c in value)
        if kind == "json_schema" and isinstance(value, dict):
            value = json.dumps(value)
        if not isinstance(value, str) or not value.strip():
            raise APIError(400, f"{field} must be a non-empty {'JSON schema' if kind == 'json_schema' else 'string'}",
                           param=field)
        error = grammar_error(kind, value)
        if error is not None:
            raise APIError(400, error, param=field)
        return {kind: value}

    def _params(self, body: Any, max_new_tokens: int, logprobs: bool, top_logprobs: int,
                tool_schema: dict[str, Any] | None = None) -> SamplingParams:
        values: dict[str, Any] = {"max_new_tokens": max_new_tokens, "logprobs": logprobs,
                                  "top_logprobs_num": top_logprobs, **self._grammar(body, tool_schema)}
        for name in _PASS_THROUGH:
            if getattr(body, name, None) is not None:
                values[name] = getattr(body, name)
        if body.stop is not None:
            values["stop"] = body.stop
        if body.min_tokens is not None:
            if not 0 <= body.min_tokens <= max_new_tokens:
                raise APIError(400, f"min_tokens must be in [0, max_tokens ({max_new_tokens})], got {body.min_tokens}",
                               param="min_tokens")
            values["min_new_tokens"] = body.min_tokens
        try:
            params = SamplingParams.from_dict(values)
        except ValueError as exc:
            name = str(exc).split(" ", 1)[0].split("[", 1)[0]
            raise APIError(400, str(exc), param=name if name in values else None) from exc
        self._check_bias(params, "logit_bias")
        return params

    def _check_bias(self, params: SamplingParams, param: str) -> None:
        vocab = self.manager.info.vocab_size
        bad = next((t for t in params.logit_bias if not t < vocab), None)
        if bad is not None:
            raise APIError(400, f"logit_bias key {str(bad)!r} is outside the vocabulary [0, {vocab})", param=param)

    def _truncate(self, ids: list[int], keep: int | None, param: str, media: bool = False) -> list[int]:
        """vLLM's truncate_prompt_tokens: k >= 1 keeps the prompt's last k tokens, -1 its last context-length
        tokens (which leaves no room to generate); None keeps it whole."""
        if keep is None:
            return ids
        context = self.manager.info.context_len
        if keep != -1 and not 1 <= keep <= context:
            raise APIError(400, f"truncate_prompt_tokens must be -1 (the context length) or in [1, the context length "
                                f"{context}], got {keep}", param="truncate_prompt_tokens")
        keep = context if keep == -1 else keep
        if len(ids) <= keep:
            return ids
        if media:
            raise APIError(400, f"truncate_prompt_tokens {keep} would cut this prompt of {len(ids)} tokens, which "
                                "holds images or video; shorten the conversation instead",
                           param="truncate_prompt_tokens")
        return ids[-keep:]

    def _prompt_logprobs(self, state: RequestState, prompt_ids: list[int], k: int) -> list[dict[str, Any] | None]:
        """vLLM's prompt_logprobs: None for the first token, then for each prompt token a dict token id ->
        {logprob, rank, decoded_token} of the top k and the token itself (first). A token outside the top
        log-probs the engine returned has rank null."""
        lps = state.input_token_logprobs or []
        tops = state.input_top_logprobs or []
        out: list[dict[str, Any] | None] = [None]
        for pos in range(1, len(prompt_ids)):
            tid = prompt_ids[pos]
            top = tops[pos] if pos < len(tops) else []
            rank = next((r for r, (t, _) in enumerate(top, 1) if t == tid), None)
            entry = {str(tid): {"logprob": lps[pos] if pos < len(lps) else None, "rank": rank,
                                "decoded_token": self._token_text(tid)}}
            for r, (t, lp) in enumerate(top[:k], 1):
                entry.setdefault(str(t), {"logprob": lp, "rank": r, "decoded_token": self._token_text(t)})
            out.append(entry)
        return out

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

    async def _encode(self, text: str, param: str, add_special_tokens: bool = True,
                      check_size: bool = True) -> list[int]:
        if check_size:  # not when the prompt will be truncated: a long prompt is then what the client expects
            self._check_size(text, param)
        return await self.manager.encode_async(text, add_special_tokens=add_special_tokens)

    def _copies(self, rid: str, ids: list[int], params: SamplingParams, n: int, start: int = -1,
                first_start: int | None = None) -> list[tuple[str, list[int], SamplingParams, int]]:
        """n jobs for one prompt (seed + i keeps seeded samples distinct and reproducible); `first_start`, when
        given, is the first copy's logprob_start_len (prompt log-probs are the same for every copy)."""
        return [(rid if n == 1 else f"{rid}-{i}", ids, dataclasses.replace(params, n=n).nth_sample(i),
                 first_start if i == 0 and first_start is not None else start) for i in range(n)]

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
        # vLLM's top-level fields; chat_template_kwargs (SGLang's way to give them) win, as in vLLM
        kwargs = {"add_generation_prompt": body.add_generation_prompt,
                  "continue_final_message": body.continue_final_message, **kwargs}
        mode, named = self._tool_mode(body)
        if body.tools:
            kwargs["tools"] = body.tools
        try:
            validate_messages(body.messages)  # before anything reads them
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        _check_image_detail(body.messages)
        media = media_parts(body.messages)
        if media and self.manager.mm_processor is None:
            raise APIError(400, f"{self.model_name} is a text model: it takes no images or other media",
                           param="messages")
        settings = self.manager.media_settings(body.mm_processor_kwargs)
        try:
            text = await self.manager.render_chat_async(body.messages, **kwargs)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        mm = None
        if media:
            self._check_size(text, "messages")  # the placeholders only grow it
            ids, mm = await self.manager.process_media(text, media, settings)
        else:
            ids = await self._encode(text, "messages", add_special_tokens=False,
                                     check_size=body.truncate_prompt_tokens is None)
        ids = self._truncate(ids, body.truncate_prompt_tokens, "messages", media=mm is not None)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        top = body.top_logprobs or 0
        if not 0 <= top <= self.max_logprobs:
            raise APIError(400, f"top_logprobs must be in [0, {self.max_logprobs}], got {top}", param="top_logprobs")
        if top and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        plp = body.prompt_logprobs
        tool_schema = (required_schema(body.tools) if mode == "required" else
                       named_schema(body.tools, named) if mode == "named" else None)
        params = self._params(body, self._budget(len(ids), max_tokens, param, "messages", expanded=mm is not None),
                              body.logprobs or plp is not None, _engine_top(top, plp), tool_schema)
        rid = body.rid or f"chatcmpl-{uuid.uuid4().hex}"
        self.manager.check_capacity(body.n)
        gens = self._submit_all(rid, self._copies(rid, ids, params, body.n, first_start=None if plp is None else 0),
                                mm)
        created = int(time.time())
        reasoning = self.reasoning if body.separate_reasoning else None
        tools = _Tools(mode, named, self.tool_parser)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self._chat_stream(rid, created, await _primed(gens), len(ids), include_usage,
                                     top if body.logprobs else None, reasoning, tools)
        states = await self._finals(gens)
        choices = []
        for i, s in enumerate(states):
            message = self._message(s.visible_text(), reasoning)
            finish = _finish(s)
            if mode != "none":
                message["content"], calls = tools.parse(message["content"])
                if calls:
                    message["tool_calls"] = [c.to_openai() for c in calls]
                    finish = tools.finish_reason(finish)
            choices.append({"index": i, "message": message,
                            "logprobs": self._chat_logprobs(s, 0, top) if body.logprobs else None,
                            "finish_reason": finish})
        response = {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                    "choices": choices, "usage": self._usage(states, len(ids))}
        if plp is not None:
            response["prompt_logprobs"] = self._prompt_logprobs(states[0], ids, plp)
        return response

    @staticmethod
    def _message(text: str, reasoning: ReasoningFormat | None) -> dict[str, Any]:
        if reasoning is None:
            return {"role": "assistant", "content": text}
        thought, content = split_reasoning(reasoning, text)
        return {"role": "assistant", "content": content, "reasoning_content": thought}

    def _chat_logprobs(self, state: RequestState, start: int, k: int) -> dict[str, Any]:
        content = []
        for i in range(start, len(state.token_logprobs)):
            token = self._token_text(state.output_ids[i])
            entry = {"token": token, "logprob": state.token_logprobs[i], "bytes": list(token.encode()),
                     "top_logprobs": []}
            if i < len(state.top_logprobs):
                for tid, lp in state.top_logprobs[i][:k]:
                    t = self._token_text(tid)
                    entry["top_logprobs"].append({"token": t, "logprob": lp, "bytes": list(t.encode())})
            content.append(entry)
        return {"content": content}

    async def _chat_stream(self, rid: str, created: int, gens, prompt_tokens: int, include_usage: bool,
                           top_logprobs: int | None, reasoning: ReasoningFormat | None = None,
                           tools: _Tools | None = None) -> AsyncIterator[str]:
        """`top_logprobs`: None without logprobs, else the alternatives per token. `reasoning`: split each
        choice's text into reasoning_content and content deltas. `tools`: read each choice's calls (content
        stops where one may start; each call streams as a first delta with its name, then its arguments' text)."""
        splitters = [ReasoningStream(reasoning) if reasoning else None for _ in gens]
        calls_of = [tools.stream() if tools is not None and tools.mode != "none" else None for _ in gens]
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
            if top_logprobs is not None:
                logprobs = self._chat_logprobs(state, n_before, top_logprobs)
                sent_logprobs[i] = len(state.token_logprobs)
            thought = ""
            if splitters[i] is not None:
                thought, text = splitters[i].feed(text, final=state.finished)
            calls: list[dict[str, Any]] = []
            if calls_of[i] is not None:
                text, calls = calls_of[i].feed(text, final=state.finished)
            delta = {**({"reasoning_content": thought} if thought else {}), **({"content": text} if text else {})}
            finish = _finish(state) if state.finished else None
            if calls:
                delta["tool_calls"] = calls
            if state.finished and calls_of[i] is not None and calls_of[i].called:
                finish = tools.finish_reason(finish)
            if delta or logprobs and logprobs["content"] or state.finished:
                yield sse({**base, "choices": [{"index": i, "delta": delta,
                                                "logprobs": logprobs, "finish_reason": finish}]})
            if state.finished:
                finals[i] = state
        if include_usage:
            yield sse({**base, "choices": [], "usage": self._usage(list(finals.values()), prompt_tokens)})
        yield SSE_DONE

    # ----- completions -----

    async def _prompts(self, prompt: Any, truncate: int | None = None) -> list[list[int]]:
        """The prompts' token ids, each cut to its last `truncate` tokens (truncate_prompt_tokens) if given."""
        self._truncate([], truncate, "prompt")  # a bad value is refused before any tokenizing
        check_size = truncate is None
        if isinstance(prompt, str):
            prompts = [await self._encode(prompt, "prompt", check_size=check_size)]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            self._check_ids(prompt, "prompt")
            prompts = [list(prompt)]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = [await self._encode(p, "prompt", check_size=check_size) for p in prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and p for p in prompt):
            for p in prompt:
                self._check_ids(p, "prompt")
            prompts = [list(p) for p in prompt]
        else:
            raise APIError(400, "prompt must be a non-empty string, list of strings, or (list of) token id lists",
                           param="prompt")
        return [self._truncate(p, truncate, "prompt") for p in prompts]

    async def completions(self, body: CompletionRequest):
        self._check_unsupported(body)
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of is not supported", param="best_of")
        top = body.logprobs
        if top is not None and not 0 <= top <= self.max_logprobs:
            raise APIError(400, f"logprobs must be in [0, {self.max_logprobs}], got {top}", param="logprobs")
        plp = body.prompt_logprobs
        prompts = await self._prompts(body.prompt, body.truncate_prompt_tokens)
        rid = body.rid or f"cmpl-{uuid.uuid4().hex}"
        self.manager.check_capacity(body.n * len(prompts))
        jobs = []
        for p_idx, ids in enumerate(prompts):
            params = self._params(body, self._budget(len(ids), body.max_tokens, "max_tokens"),
                                  top is not None or plp is not None, _engine_top(top or 0, plp))
            start = 0 if body.echo and top is not None else -1
            sub = rid if len(prompts) == 1 else f"{rid}-p{p_idx}"
            jobs.extend(self._copies(sub, ids, params, body.n, start, first_start=None if plp is None else 0))
        gens = self._submit_all(rid, jobs)
        created = int(time.time())
        if body.stream:  # choice index = prompt index * n + sample index, as the non-streamed choices
            return self._completion_stream(rid, created, await _primed(gens), prompts, body)
        states = await self._finals(gens)
        choices = []
        prompt_logprobs: dict[int, list[dict[str, Any] | None]] = {}
        for i, s in enumerate(states):
            p_idx = i // body.n
            prompt_ids = prompts[p_idx]
            text = s.visible_text()
            if body.echo:
                text = self.tokenizer.decode(prompt_ids) + text
            choice = {"index": i, "text": text, "finish_reason": _finish(s),
                      "logprobs": self._completion_logprobs(s, prompt_ids, body.echo, top) if top is not None
                      else None}
            if plp is not None:  # the prompt's first copy scored it
                if p_idx not in prompt_logprobs:
                    prompt_logprobs[p_idx] = self._prompt_logprobs(states[p_idx * body.n], prompt_ids, plp)
                choice["prompt_logprobs"] = prompt_logprobs[p_idx]
            choices.append(choice)
        usage = self._usage(states, sum(len(p) for p in prompts))
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": choices, "usage": usage}

    def _completion_logprobs(self, state: RequestState, prompt_ids: list[int], echo: bool, k: int,
                             start: int = 0) -> dict[str, Any]:
        """OpenAI's legacy logprobs with `k` alternatives per token (the engine may have returned more)."""
        tokens: list[int] = []
        lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        if echo and start == 0:
            tokens.extend(prompt_ids)
            lps.extend(state.input_token_logprobs or [None] * len(prompt_ids))
            for t in state.input_top_logprobs or [[] for _ in prompt_ids]:
                tops.append({self._token_text(tid): lp for tid, lp in t[:k]} or None)
        for i in range(start, len(state.token_logprobs)):
            tokens.append(state.output_ids[i])
            lps.append(state.token_logprobs[i])
            tops.append({self._token_text(tid): lp for tid, lp in state.top_logprobs[i][:k]}
                        if i < len(state.top_logprobs) else None)
        texts = [self._token_text(t) for t in tokens]
        offsets, pos = [], 0
        for t in texts:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    async def _completion_stream(self, rid: str, created: int, gens, prompts: list[list[int]],
                                 body: CompletionRequest) -> AsyncIterator[str]:
        """gens[i] is choice i: sample i % n of prompt i // n."""
        base = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}
        finals: dict[int, RequestState] = {}
        echoed = [False] * len(gens)
        sent = [0] * len(gens)
        async for i, state in _merge(gens):
            if i in finals:
                continue
            prompt_ids = prompts[i // body.n]
            text, _ = state.take_delta()
            logprobs = None
            if body.logprobs is not None:
                logprobs = self._completion_logprobs(state, prompt_ids, body.echo and not echoed[i], body.logprobs,
                                                     sent[i])
                sent[i] = len(state.token_logprobs)
            if body.echo and not echoed[i]:
                text = self.tokenizer.decode(prompt_ids) + text
                echoed[i] = True
            yield sse({**base, "choices": [{"index": i, "text": text, "logprobs": logprobs,
                                            "finish_reason": _finish(state) if state.finished else None}]})
            if state.finished:
                finals[i] = state
        if body.stream_options and body.stream_options.include_usage:
            yield sse({**base, "choices": [], "usage": self._usage(list(finals.values()),
                                                                   sum(len(p) for p in prompts))})
        yield SSE_DONE

    # ----- SGLang native -----

    async def generate(self, body: GenerateRequestBody):
        if (body.text is None) == (body.input_ids is None):
            raise APIError(400, "give exactly one of text and input_ids")
        single = isinstance(body.text, str) or (body.input_ids is not None and body.input_ids
                                                and isinstance(body.input_ids[0], int))
        settings = self.manager.media_settings(body.mm_processor_kwargs)
        mm = None
        if body.image_data is not None or body.audio_data is not None:
            if not isinstance(body.text, str):
                param = "image_data" if body.image_data is not None else "audio_data"
                raise APIError(400, f"{param} goes with a single text prompt", param=param)
            media = [(modality, src) for modality, data in (("image", body.image_data), ("audio", body.audio_data))
                     for src in ([] if data is None else data if isinstance(data, list) else [data])]
            self._check_size(body.text, "text")
            ids, mm = await self.manager.process_media(body.text, media, settings)
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
        if params.grammar is not None:
            error = grammar_error(*params.grammar)
            if error is not None:
                raise APIError(400, error, param=f"sampling_params.{params.grammar[0]}")
        self._check_bias(params, "sampling_params.logit_bias")
        if params.n != 1:
            raise APIError(400, "/generate takes n == 1; send several prompts instead", param="sampling_params.n")
        rid = body.rid or uuid.uuid4().hex
        self.manager.check_capacity(len(prompts))
        gens = self._submit_all(rid, [(rid if single else f"{rid}-{i}", p, params, body.logprob_start_len)
                                      for i, p in enumerate(prompts)], mm)
        if body.stream:
            return self._generate_stream(await _primed(gens), single)
        results = [s.result() for s in await self._finals(gens)]
        return results[0] if single else results

    async def _generate_stream(self, gens: list[AsyncIterator[RequestState]], single: bool) -> AsyncIterator[str]:
        """SGLang's shape: each event is one prompt's chunk; for a batch the chunk carries that prompt's `index`."""
        finished: set[int] = set()
        async for i, state in _merge(gens):
            if i in finished:  # a queued update of a stream already closed
                continue
            chunk = state.chunk()
            if not single:
                chunk["index"] = i
            yield sse(chunk)
            if state.finished:
                finished.add(i)
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


def _engine_top(top: int, prompt_logprobs: int | None) -> int:
    """The top log-probs to ask the engine for: it returns one number for prompt and output tokens alike, so the
    larger of the two (at least 1 with prompt log-probs: the prompt token's rank when it is the favourite)."""
    return top if prompt_logprobs is None else max(top, prompt_logprobs, 1)


def _check_image_detail(messages: list[dict[str, Any]]) -> None:
    """OpenAI's image_url.detail (low/high) picks a resolution; here every image goes at the model processor's own,
    so anything but "auto" would be ignored: refuse it instead."""
    for m, message in enumerate(messages):
        content = message.get("content")
        for p, part in enumerate(content if isinstance(content, list) else []):
            image = part.get("image_url") if isinstance(part, dict) else None
            detail = image.get("detail") if isinstance(image, dict) else None
            if detail not in (None, "auto"):
                raise APIError(400, f"image_url.detail {json.dumps(detail)} is not supported: images are sent at the "
                                    "model processor's resolution whatever the detail, so low and high would change "
                                    'nothing; leave detail out or use "auto"',
                               param=f"messages[{m}].content[{p}].image_url.detail")


@dataclass
class _Tools:
    """How a chat request's answers become tool calls: parsed in the model's format (`auto`), or read from the
    JSON the grammar held them to (`required`: a list of calls; `named`: the function's arguments)."""

    mode: str
    named: str | None
    parser: ToolParser | None

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.mode == "auto":
            return self.parser.parse(text)
        if self.mode == "required":
            calls = parse_required(text)
            return (None, calls) if calls else (text, [])
        if self.mode == "named":
            try:
                args = json.loads(text)
            except ValueError:
                return text, []  # cut short by max_tokens
            return None, [ToolCall(self.named, json.dumps(args, ensure_ascii=False))]
        return text, []

    def finish_reason(self, finish: str | None) -> str | None:
        # OpenAI's: "tool_calls" when the model chose to call, "stop" when tool_choice named the function
        return "stop" if self.mode == "named" else "tool_calls"

    def stream(self) -> ToolStream:
        return ToolStream(self.parser) if self.mode == "auto" else ToolStream(_WholeAnswer(self))


class _WholeAnswer(ToolParser):
    """For `required` and named calls: the whole answer is the call(s), kept until it ends."""

    def __init__(self, tools: _Tools):
        self.tools = tools

    def call_starts(self, text: str) -> int | None:
        return 0

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        return self.tools.parse(text)

    def partial(self, text: str) -> list[PartialCall]:
        return named_partial(self.tools.named, text) if self.tools.mode == "named" else super().partial(text)


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
