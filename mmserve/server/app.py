"""The FastAPI application: routes, the request guard (API key, body size), OpenAI-shaped errors, cancelling the
work of a client that has gone, and the engine's lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import time
from collections.abc import Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mmserve.config import ServerArgs, architectures_of
from mmserve.server import errors
from mmserve.server.embeddings_api import EmbeddingServing
from mmserve.server.errors import APIError, error_response
from mmserve.server.metrics import Metrics
from mmserve.server.openai_api import OpenAIServing, sse_with_errors
from mmserve.server.protocol import (
    AbortBody,
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    GenerateRequestBody,
    RerankRequest,
    TokenizeRequest,
)
from mmserve.tokenizer.manager import TokenizerManager

logger = logging.getLogger("mmserve.server")

_OPEN_PATHS = {"/health"}


class RequestGuard:
    """ASGI middleware in front of every route. It checks the API key (in constant time) and the body size, from
    Content-Length before anything is read and again while a chunked body streams in, so an oversize body costs
    the server at most the limit. It reads the body whole and hands it to the app as one message; later
    `receive()` calls pass through, so the app still hears of a disconnect."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_mb: int):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body_mb = max_body_mb

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"] not in _OPEN_PATHS:
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                response = error_response(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                          code="invalid_api_key")
                return await response(scope, receive, send)
        limit = self.max_body_mb * 2**20
        if int(headers.get(b"content-length", b"0")) > limit:  # h11 has checked it is a number
            return await self._too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":  # gone (or timed out) before its request was complete
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self._too_large(scope, receive, send)
            more = message.get("more_body", False)
        pending: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal pending
            if pending is None:
                return await receive()
            message, pending = pending, None
            return message

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The rest of the body is not read: the connection closes after the answer.
        response = error_response(413, f"the request body is larger than this server's limit of {self.max_body_mb} "
                                       "MiB (--max-request-body-mb)", headers={"connection": "close"})
        await response(scope, receive, send)


_CLIENT_GONE = object()


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await a route's work, or cancel it if the client disconnects first and return `_CLIENT_GONE`. The body has
    been read by now, so the next ASGI message can only be `http.disconnect`. Cancelling closes the request
    iterators, whose `finally` aborts the engine requests: a client that left stops costing anything."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    return task.result() if not task.cancelled() else _CLIENT_GONE


def model_name(args: ServerArgs) -> str:
    """The model id clients see: --served-model-name, else the model's name: a hub id as given (also for a folder
    in the hub cache), a folder's name, a .gguf file's name without its quantization tag (the default model is
    "SmolLM2-135M-Instruct", not a path into site-packages)."""
    if args.served_model_name:
        return args.served_model_name
    path = Path(os.path.expanduser(args.model_path))
    if not path.exists():
        return args.model_path  # a hub id
    path = path.resolve()
    if path.suffix == ".gguf":
        return _GGUF_QUANT.sub("", path.stem) or path.stem
    repo = path.parent.parent.name  # the hub cache: models--org--name/snapshots/<commit>
    if path.parent.name == "snapshots" and repo.startswith("models--"):
        return repo.removeprefix("models--").replace("--", "/", 1)
    return path.name


# The quantization tag that ends a GGUF file's name: "SmolLM2-135M-Instruct.Q4_1", "qwen2.5-7b-instruct-q4_k_m".
_GGUF_QUANT = re.compile(r"[.-](i?q\d\w*|f16|f32|bf16)$", re.IGNORECASE)


def create_app(args: ServerArgs) -> FastAPI:
    name = model_name(args)
    metrics = Metrics(name) if args.enable_metrics else None
    manager = TokenizerManager(args, metrics)
    serving = OpenAIServing(manager, name)
    pooling = EmbeddingServing(manager, name)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        logger.info("starting the engine process; the model loads there")
        await manager.start()
        # The bound behind the early context check decodes the whole vocabulary once: not on the event loop.
        await asyncio.get_running_loop().run_in_executor(manager.tokenize_pool, lambda: manager.max_bytes_per_token)
        info = manager.info
        host = f"[{args.host}]" if ":" in args.host else args.host
        # Logged by the server once it listens (launch_server), so a client that reads it can connect at once.
        app.state.ready_line = (f"mmserve ready: model {name}, {info.dtype} on {info.device}, context "
                                f"{info.context_len} tokens, KV cache {info.max_total_tokens} tokens, "
                                f"http://{host}:{args.port}")
        try:
            yield
        finally:
            await manager.shutdown()

    app = FastAPI(title="mmserve", lifespan=lifespan)
    app.state.manager, app.state.serving, app.state.args = manager, serving, args
    app.add_exception_handler(APIError, errors.api_error_handler)
    app.add_exception_handler(RequestValidationError, errors.validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, errors.http_error_handler)
    app.add_exception_handler(ValueError, errors.value_error_handler)
    app.add_exception_handler(Exception, errors.internal_error_handler)
    app.add_middleware(RequestGuard, api_key=args.api_key, max_body_mb=args.max_request_body_mb)

    async def respond(request: Request, work: Awaitable[Any]) -> Response:
        result = await unless_disconnected(request, work)
        if result is _CLIENT_GONE:
            return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
        if hasattr(result, "__aiter__"):  # from here on the streaming response watches for a disconnect itself
            return StreamingResponse(sse_with_errors(result), media_type="text/event-stream")
        return JSONResponse(result)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await respond(request, serving.chat(body))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await respond(request, serving.completions(body))

    @app.post("/generate")
    async def generate(body: GenerateRequestBody, request: Request):
        return await respond(request, serving.generate(body))

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request):
        return await respond(request, pooling.embeddings(body))

    @app.post("/classify")
    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request):
        return await respond(request, pooling.classify(body))

    @app.post("/v1/rerank")
    async def rerank(body: RerankRequest, request: Request):
        return await respond(request, pooling.rerank(body))

    def model_card() -> dict[str, Any]:
        info = manager.info
        return {"id": name, "object": "model", "created": created, "owned_by": "mmserve",
                "max_model_len": info.context_len if info else None}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")  # a hub id has a slash in it
    async def retrieve_model(model_id: str):
        if model_id != name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {name!r}",
                           param="model", code="model_not_found")
        return model_card()

    @app.get("/health")
    async def health():
        if manager.healthy:
            return {"status": "ok"}
        return error_response(503, f"unhealthy: {manager.engine_error or 'the engine is starting'}")

    @app.get("/server_info")
    @app.get("/get_server_info")  # SGLang's older name, which sglang-router falls back to
    async def server_info():
        stats = manager.stats
        return {"model": name, "engine": manager.info and _as_dict(manager.info),
                "stats": stats and _as_dict(stats), "in_flight": len(manager.running_ids()),
                "engine_pid": manager.engine_pid,
                # each data-parallel replica: its ranks' processes on this host, requests in flight, its gauges
                "replicas": [{"pids": [p.pid for p in r.procs], "load": r.load, "healthy": r.healthy,
                              "stats": r.stats and _as_dict(r.stats)} for r in manager.replicas],
                # SGLang's fields that a router reads (sglang-router: the data-parallel ranks behind this URL)
                "model_path": args.model_path, "tokenizer_path": args.tokenizer_path or args.model_path,
                "served_model_name": name, "tp_size": args.tp_size, "dp_size": args.dp_size}

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info():
        """SGLang's shape: what sglang-router learns of the model behind this URL."""
        config = manager.hf_config
        return {"model_path": args.model_path, "tokenizer_path": args.tokenizer_path or args.model_path,
                "served_model_name": name, "is_generation": not manager.is_embedding,
                "has_image_understanding": manager.mm_processor is not None,
                "has_audio_understanding": "audio" in getattr(manager.mm_processor, "wrapping", {}),
                "model_type": getattr(config, "model_type", None),
                "architectures": architectures_of(config), "preferred_sampling_params": None,
                "weight_version": "default"}

    @app.get("/metrics")
    async def prometheus():
        if metrics is None:
            raise APIError(404, "metrics are off; start the server with --enable-metrics")
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages")
        if body.messages is not None:
            text = await manager.render_chat_async(body.messages)
            ids = await manager.encode_async(text, add_special_tokens=False)
        else:
            ids = await manager.encode_async(body.prompt, add_special_tokens=body.add_special_tokens)
        # Millions of ids take a while to write as JSON (and FastAPI's own encoder ten times as long): not here.
        payload = {"tokens": ids, "count": len(ids), "max_model_len": manager.info.context_len}
        content = await asyncio.get_running_loop().run_in_executor(manager.tokenize_pool, json.dumps, payload)
        return Response(content, media_type="application/json")

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        vocab = manager.info.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids must be in [0, {vocab}), got {bad[:5]}", param="tokens")
        return {"prompt": await manager.decode_async(body.tokens)}

    @app.post("/abort_request")
    async def abort_request(body: AbortBody):
        return {"aborted": await manager.abort(body.rid)}

    return app


def _as_dict(struct: Any) -> dict[str, Any]:
    import msgspec

    return msgspec.to_builtins(struct)
