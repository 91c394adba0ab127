"""Errors as OpenAI reports them: the error body, the exceptions the endpoints raise, and the
handlers that turn every failure of a request into a status and that body (never a crash)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from ..async_engine import EngineOverloaded
from ..params import InvalidRequest

log = logging.getLogger(__name__)


class APIError(Exception):
    """A request refused with `status` and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


class ClientGone(Exception):
    """The client closed its connection before its response was ready."""


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, param, kind, code), status_code=status)


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
    return error_response(503, f"the server is overloaded ({exc}); retry later", None, "server_error", "overloaded")


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail))


async def _client_gone(request: Request, exc: ClientGone) -> Response:
    return Response(status_code=499)  # nobody reads it: the client closed the connection


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("request failed")
    return error_response(500, f"internal error: {exc!r}", None, "server_error")


_HANDLERS = {RequestValidationError: _invalid_body, InvalidRequest: _invalid_request, APIError: _api_error,
             EngineOverloaded: _overloaded, HTTPException: _http_error, ClientGone: _client_gone,
             Exception: _internal_error}


def add_error_handlers(app: FastAPI) -> None:
    for exc_class, handler in _HANDLERS.items():
        app.add_exception_handler(exc_class, handler)
