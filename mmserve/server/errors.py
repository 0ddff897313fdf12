"""OpenAI-shaped errors: every failure the API reports is `{"error": {"message", "type", "param", "code"}}`.

As in OpenAI's API, `code` is a string naming a condition a client may act on ("invalid_api_key",
"context_length_exceeded", "model_not_found") or null; the HTTP status and `type` carry the rest."""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable",
          500: "internal_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def raw_error_response(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 error response as bytes, closing the connection: for the protocol layer, which answers
    before (or instead of) the application."""
    body = json.dumps(error_body(status, message)).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


async def api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.code)


async def value_error_handler(request: Request, exc: ValueError) -> JSONResponse:
    return error_response(400, str(exc))


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return error_response(400, f"the request body is not valid JSON: {first.get('msg', '')}")
    where = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    return error_response(400, f"{where}: {msg}" if where else msg, param=where)


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else "error"
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    return error_response(exc.status_code, message)


async def internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Anything a route did not expect: a JSON 500 without internals (the traceback goes to the server log, where
    Starlette re-raises the exception after this response)."""
    return error_response(500, f"internal server error ({type(exc).__name__}); the server log has the details")
