"""Shutting down without cutting a stream. On the first SIGTERM or SIGINT uvicorn stops accepting
connections and the `Gate` answers any request that still arrives with 503, while those in flight
go on for up to `timeout` seconds; then, or at the next signal, the rest end with an error event
and [DONE] (a 503 when not streamed), and the server exits."""

from __future__ import annotations

import asyncio
import logging
from types import FrameType

import uvicorn
from fastapi import FastAPI

from ..async_engine import AsyncEngine
from .errors import ShuttingDown

log = logging.getLogger(__name__)

FLUSH_TIME = 5.0  # seconds after the last requests end for their responses to be sent before uvicorn cancels them


class Shutdown:
    def __init__(self, runner: AsyncEngine, timeout: float):
        self.runner, self.timeout = runner, timeout
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Called on the server's event loop, where `signal` hands its work."""
        self._loop = asyncio.get_running_loop()

    def signal(self) -> None:
        """A shutdown signal: the first drains, the next ends what is left now. Any thread."""
        if self._loop is not None:  # else the app has not started: nothing is in flight
            self._loop.call_soon_threadsafe(self._next_phase)

    def _next_phase(self) -> None:
        if self.draining:
            self._end_requests()
            return
        self.draining = True
        log.info("shutting down: %d requests in flight get up to %g s", self.runner.num_in_flight, self.timeout)
        self._loop.call_later(self.timeout, self._end_requests)

    def _end_requests(self) -> None:
        if self.runner.num_in_flight:
            log.info("shutting down: ending the %d requests still in flight", self.runner.num_in_flight)
        self.runner.fail_all(ShuttingDown("the server is shutting down"))


class Server(uvicorn.Server):
    """uvicorn's server, whose shutdown signals go through `Shutdown`: never uvicorn's forced exit,
    which cuts the open streams without an end event."""

    def __init__(self, config: uvicorn.Config, drain: Shutdown):
        super().__init__(config)
        self.drain = drain  # not `shutdown`: uvicorn.Server's own method

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            super().handle_exit(sig, frame)
        self.drain.signal()


def server(app: FastAPI, **config) -> Server:
    """A `Server` for an app of `create_app` (`config`: uvicorn.Config's options); uvicorn's own
    limit, behind ours, lets the last responses be sent."""
    shutdown = app.state.server.shutdown
    return Server(uvicorn.Config(app, timeout_graceful_shutdown=shutdown.timeout + FLUSH_TIME, **config), shutdown)
