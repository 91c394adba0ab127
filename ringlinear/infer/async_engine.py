"""The engine on a thread of its own, fed by coroutines.

Coroutines on the event loop submit requests and aborts as commands; the engine thread runs them
between steps, steps while there is work and sleeps when there is none, and hands each step's
outputs back to the loop, where they go to the queue of the HTTP request that asked.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .engine import Engine
from .metrics import Metrics
from .outputs import RequestOutput
from .params import InvalidRequest, SamplingParams

log = logging.getLogger(__name__)

MAX_QUEUED = 1024  # requests waiting beyond the running batch before new ones get 503


class EngineOverloaded(Exception):
    """More requests in flight than the engine runs plus the queue holds."""


@dataclass
class _Tracked:
    queue: asyncio.Queue
    arrival: float
    last_token: float | None = None


class AsyncEngine:
    def __init__(self, engine: Engine, max_queued: int, metrics: Metrics):
        self.engine, self.metrics = engine, metrics
        self.max_in_flight = engine.scheduler.max_num_seqs + max_queued
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._requests: dict[str, _Tracked] = {}  # touched on the event loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ringlinear-engine", daemon=True)

    # -- event loop side ------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()
        self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def num_in_flight(self) -> int:
        return len(self._requests)

    def add(self, requests: list[tuple[str, list[int], SamplingParams]], outputs: asyncio.Queue) -> None:
        """Submit checked requests whose outputs go to `outputs`; all or none (EngineOverloaded when
        they would fit later)."""
        self.check_count(len(requests))
        if self.num_in_flight + len(requests) > self.max_in_flight:
            self.metrics.rejected.inc()
            raise EngineOverloaded(f"{self.num_in_flight} requests in flight, the bound is {self.max_in_flight}")
        now = time.monotonic()
        for request_id, prompt_ids, params in requests:
            self._requests[request_id] = _Tracked(outputs, now)
            self._submit(lambda r=request_id, p=prompt_ids, s=params: self._engine_add(r, p, s))

    def check_count(self, count: int) -> None:
        """InvalidRequest if `count` requests submitted together could never be in flight at once."""
        if count > self.max_in_flight:
            raise InvalidRequest("prompt", f"{count} prompts in one request; this server holds at most "
                                 f"{self.max_in_flight} requests at once (running and queued)")

    def abort(self, request_ids: list[str]) -> None:
        """Drop requests whose client is gone; their slots are free after the current step."""
        for request_id in request_ids:
            if self._requests.pop(request_id, None) is not None:
                self._submit(lambda r=request_id: self.engine.abort(r))

    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self._wakeup.set()

    def _deliver(self, outputs: list[RequestOutput], stats: dict[str, float]) -> None:
        now = time.monotonic()
        for output in outputs:
            tracked = self._requests.get(output.request_id)
            if tracked is None:
                continue  # aborted meanwhile
            if output.token_ids:
                since = tracked.arrival if tracked.last_token is None else tracked.last_token
                (self.metrics.ttft if tracked.last_token is None else self.metrics.itl).observe(now - since)
                tracked.last_token = now
            if output.finished:
                del self._requests[output.request_id]
                self.metrics.requests.labels(output.finish_reason).inc()
                self.metrics.latency.observe(now - tracked.arrival)
            tracked.queue.put_nowait(output)
        self.metrics.update(stats)

    def fail_all(self, error: Exception) -> None:
        """End every request in flight with `error` (their streams send it as their last event)."""
        for tracked in self._requests.values():
            tracked.queue.put_nowait(error)
        self.abort(list(self._requests))

    def _fail(self, request_ids: list[str], error: Exception) -> None:
        for request_id in request_ids:
            tracked = self._requests.pop(request_id, None)
            if tracked is not None:
                tracked.queue.put_nowait(error)

    # -- engine thread --------------------------------------------------------------------------

    def _engine_add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        try:
            self.engine.add_request(request_id, prompt_ids, params)
        except Exception as error:  # checked before submission, so this is a bug: fail the request only
            log.exception("adding request %s failed", request_id)
            self._loop.call_soon_threadsafe(self._fail, [request_id], error)

    def _run(self) -> None:
        engine = self.engine
        while not self._stopping:
            self._wakeup.clear()
            while not self._commands.empty():
                self._commands.get()()
            if not engine.has_unfinished():
                self._loop.call_soon_threadsafe(self.metrics.update, engine.stats())
                self._wakeup.wait()
                continue
            try:
                outputs = engine.step()
            except Exception as error:  # a failed step fails its requests, not the server nor the queue
                log.exception("engine step failed")
                # Requests are checked in full before they get here, so this is a bug or the device
                # failing. The step may have written the cache of every running sequence without
                # sampling its token, so those end; the waiting ones have not been touched and stay.
                failed = [seq.request_id for seq in engine.scheduler.running]
                for request_id in failed:
                    engine.abort(request_id)
                self._loop.call_soon_threadsafe(self._fail, failed, RuntimeError(f"engine step failed: {error!r}"))
                continue
            self._loop.call_soon_threadsafe(self._deliver, outputs, engine.stats())
