"""The FastAPI application: routes, API-key check, OpenAI-shaped errors, and the engine's lifecycle."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmserve.config import ServerArgs
from mmserve.server import errors
from mmserve.server.errors import APIError, error_response
from mmserve.server.metrics import Metrics
from mmserve.server.openai_api import OpenAIServing, sse_with_errors
from mmserve.server.protocol import (
    AbortBody,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequestBody,
    TokenizeRequest,
)
from mmserve.tokenizer.manager import TokenizerManager

logger = logging.getLogger("mmserve.server")

_OPEN_PATHS = {"/health"}


def create_app(args: ServerArgs) -> FastAPI:
    model_name = args.served_model_name or args.model_path
    metrics = Metrics(model_name) if args.enable_metrics else None
    manager = TokenizerManager(args, metrics)
    serving = OpenAIServing(manager, model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await manager.start()
        info = manager.info
        logger.info("mmserve ready: model %s, %s on %s, context %d tokens, KV cache %d tokens, http://%s:%d",
                    model_name, info.dtype, info.device, info.context_len, info.max_total_tokens, args.host, args.port)
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

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if args.api_key and request.url.path not in _OPEN_PATHS:
            if request.headers.get("authorization", "") != f"Bearer {args.api_key}":
                return error_response(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                      code="invalid_api_key")
        return await call_next(request)

    def respond(result: Any):
        if hasattr(result, "__aiter__"):
            return StreamingResponse(sse_with_errors(result), media_type="text/event-stream")
        return JSONResponse(result)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        return respond(await serving.chat(body))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return respond(await serving.completions(body))

    @app.post("/generate")
    async def generate(body: GenerateRequestBody):
        return respond(await serving.generate(body))

    @app.get("/v1/models")
    async def models():
        info = manager.info
        card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "mmserve",
                "max_model_len": info.context_len if info else None}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        if manager.healthy:
            return {"status": "ok"}
        return error_response(503, f"unhealthy: {manager.engine_error or 'the engine is starting'}")

    @app.get("/get_server_info")
    async def server_info():
        stats = manager.stats
        return {"model": model_name, "engine": manager.info and _as_dict(manager.info),
                "stats": stats and _as_dict(stats), "in_flight": len(manager.running_ids()),
                "engine_pid": manager.engine_pid}

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
            ids = manager.encode_chat(body.messages)
        else:
            ids = manager.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": manager.info.context_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        vocab = manager.info.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids must be in [0, {vocab}), got {bad[:5]}", param="tokens")
        return {"prompt": manager.tokenizer.decode(body.tokens)}

    @app.post("/abort_request")
    async def abort_request(body: AbortBody):
        targets = [r for r in manager.running_ids() if r == body.rid or r.startswith(body.rid + "-")]
        for rid in targets:
            await manager.abort(rid)
        return {"aborted": targets}

    return app


def _as_dict(struct: Any) -> dict[str, Any]:
    import msgspec

    return msgspec.to_builtins(struct)
