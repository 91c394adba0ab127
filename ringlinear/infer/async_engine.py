"""The engine on a thread of its own, fed by coroutines.

Coroutines on the event loop submit requests and aborts as commands; the engine thread runs them
between steps, steps while there is work and sleeps when there is none, and hands each step's
outputs back to the loop, where they go to the queue of the HTTP request that asked. With
`warm_up`, the thread first runs `Engine.warm_up` (requests submitted meanwhile wait), and `ready`
turns true when it is done.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

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
    unfinished: int  # of its n completions
    last_token: dict[int, float] = field(default_factory=dict)  # by completion


class AsyncEngine:
    def __init__(self, engine: Engine, max_queued: int, metrics: Metrics, warm_up: bool = False):
        self.engine, self.metrics = engine, metrics
        self.max_in_flight = engine.scheduler.max_num_seqs + max_queued  # sequences: a request counts n
        self.warm_up = warm_up
        self.ready = not warm_up
        self.warm_up_seconds: float | None = None
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
        """Sequences in flight: a request's unfinished completions."""
        return sum(tracked.unfinished for tracked in self._requests.values())

    def add(self, requests: list[tuple[str, list[int], SamplingParams]], outputs: asyncio.Queue) -> None:
        """Submit checked requests whose outputs go to `outputs`; all or none (EngineOverloaded when
        they would fit later)."""
        count = sum(params.n for _, _, params in requests)
        self.check_count(len(requests), count // len(requests))
        if self.num_in_flight + count > self.max_in_flight:
            self.metrics.rejected.inc()
            raise EngineOverloaded(f"{self.num_in_flight} sequences in flight, the bound is {self.max_in_flight}")
        now = time.monotonic()
        for request_id, prompt_ids, params in requests:
            self._requests[request_id] = _Tracked(outputs, now, params.n)
            self._submit(lambda r=request_id, p=prompt_ids, s=params: self._engine_add(r, p, s))

    def check_count(self, count: int, n: int = 1) -> None:
        """InvalidRequest if `count` prompts of `n` completions each, submitted together, could never
        be in flight at once."""
        if count * n > self.max_in_flight:
            raise InvalidRequest("prompt" if n == 1 else "n",
                                 f"{count} prompts × n={n} completions in one request; this server holds at most "
                                 f"{self.max_in_flight} sequences at once (running and queued)")

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
                last = tracked.last_token.get(output.index)
                if not tracked.last_token:  # the request's first token
                    self.metrics.ttft.observe(now - tracked.arrival)
                elif last is not None:  # a completion's next one (a fork's first has no gap to measure)
                    self.metrics.itl.observe(now - last)
                tracked.last_token[output.index] = now
            if output.finished:
                tracked.unfinished -= 1
                self.metrics.requests.labels(output.finish_reason).inc()
                self.metrics.latency.observe(now - tracked.arrival)
                if tracked.unfinished == 0:
                    del self._requests[output.request_id]
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
        if self.warm_up:
            self.warm_up_seconds = engine.warm_up()
            self.ready = True
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
