"""The gate every HTTP request passes before any route sees it, its body unread: a server shutting
down answers 503, a missing or wrong API key 401 (on every path but /health and /metrics, open as
in vLLM), and a body over --max-request-bytes 413 (by its Content-Length, or once more than that
has arrived). Behind the gate, an unexpected exception becomes a 500 that keeps the connection."""

from __future__ import annotations

import logging
import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import RETRY_AFTER, BodyTooLarge, error_response, too_large
from .state import ServerState

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/metrics"})


class Gate:
    def __init__(self, app: ASGIApp, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, self._limited(receive), tracked_send)
        except Exception as e:
            log.exception("request failed")
            if not started:  # else the client sees its response cut short
                await error_response(500, f"internal error: {e!r}", None, "server_error")(scope, receive, send)

    def _refusal(self, scope: Scope):
        state = self.state
        if state.shutdown.draining and scope["path"] != "/metrics":
            return error_response(503, "the server is shutting down", None, "server_error", "shutting_down",
                                  RETRY_AFTER)
        headers = dict(scope["headers"])
        if state.api_key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            # constant time: how long a wrong key takes must not tell how much of it was right
            if not secrets.compare_digest(given, f"Bearer {state.api_key}".encode()):
                return error_response(401, "a valid API key is required (Authorization: Bearer KEY)", None,
                                      "authentication_error", "invalid_api_key")
        length = headers.get(b"content-length", b"")  # uvicorn has refused a length that is not a number
        if length and int(length) > state.max_request_bytes:  # refused unread
            return too_large(state.max_request_bytes)
        return None

    def _limited(self, receive: Receive) -> Receive:
        """`receive`, raising BodyTooLarge once the body (sent without a length, or longer than it
        said) goes over the limit."""
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.state.max_request_bytes:
                    raise BodyTooLarge(self.state.max_request_bytes)
            return message

        return limited
