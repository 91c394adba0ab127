"""Errors as OpenAI reports them: the error body, the exceptions the endpoints raise, and the
handlers that turn every failure of a request into a status and that body (never a crash)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from ..async_engine import EngineOverloaded
from ..params import InvalidRequest


class APIError(Exception):
    """A request refused with `status` and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


class ClientGone(Exception):
    """The client closed its connection before its response was ready."""


class ShuttingDown(RuntimeError):
    """The server stopped serving before this request finished."""


class BodyTooLarge(HTTPException):
    """A body over --max-request-bytes (raised while it is read, so FastAPI passes it on as it is)."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over this server's limit of {limit} bytes (--max-request-bytes)")


RETRY_AFTER = {"Retry-After": "1"}  # seconds: requests in flight finish, and queue slots free, at every step


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, param, kind, code), status_code=status, headers=headers)


@contextmanager
def field_names(names: dict[str, str]) -> Iterator[None]:
    """Report an invalid sampling value under the field name the request used."""
    try:
        yield
    except InvalidRequest as e:
        raise InvalidRequest(names.get(e.param, e.param), str(e)) from None


async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ())]
    if len(loc) > 1 and loc[0] == "body" and first["type"] != "json_invalid":
        return error_response(400, f"{loc[1]}: {first['msg']}", loc[1])
    return error_response(400, "the body must be a JSON object, sent with Content-Type: application/json", "body")


async def _invalid_request(request: Request, exc: InvalidRequest) -> JSONResponse:
    return error_response(400, str(exc), exc.param)


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.kind, exc.code)


async def _overloaded(request: Request, exc: EngineOverloaded) -> JSONResponse:
    return error_response(503, f"the server is overloaded ({exc}); retry later", None, "server_error", "overloaded",
                          RETRY_AFTER)


async def _shutting_down(request: Request, exc: ShuttingDown) -> JSONResponse:
    return error_response(503, str(exc), None, "server_error", "shutting_down")


def too_large(limit: int) -> JSONResponse:
    """The 413 of a body over the limit; the connection closes, as the rest of the body is not read."""
    return error_response(413, BodyTooLarge(limit).detail, "body", headers={"Connection": "close"})


async def _too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
    return too_large(request.app.state.server.max_request_bytes)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail))


async def _client_gone(request: Request, exc: ClientGone) -> Response:
    return Response(status_code=499)  # nobody reads it: the client closed the connection


# Any other exception is the `Gate`'s: a handler for Exception would run in Starlette's outermost
# middleware, which re-raises after answering, and uvicorn then drops the connection.
_HANDLERS = {RequestValidationError: _invalid_body, InvalidRequest: _invalid_request, APIError: _api_error,
             EngineOverloaded: _overloaded, ShuttingDown: _shutting_down, BodyTooLarge: _too_large,
             HTTPException: _http_error,
             ClientGone: _client_gone}


def add_error_handlers(app: FastAPI) -> None:
    for exc_class, handler in _HANDLERS.items():
        app.add_exception_handler(exc_class, handler)
