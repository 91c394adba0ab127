"""The engine requests of one HTTP request, shared by both generation endpoints: submitted to the
`AsyncEngine` together, their outputs read back from one queue, either collected whole (while
watching for the client to leave) or sent on as server-sent events. Requests still running when
the reading stops, whatever stopped it, are aborted."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..async_engine import AsyncEngine
from ..outputs import Completion, RequestOutput
from ..params import SamplingParams
from .errors import ClientGone, error_body

Choice = Callable[[int, RequestOutput], dict]  # (choice index, output) -> a streamed chunk's choice


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


@dataclass(frozen=True)
class Batch:
    """Choice `i * n + j` is completion j of prompt i, as OpenAI numbers them."""
    runner: AsyncEngine
    request_ids: list[str]
    prompts: list[list[int]]
    n: int
    outputs: asyncio.Queue  # RequestOutputs, or the exception that failed a request

    @classmethod
    def submit(cls, runner: AsyncEngine, prefix: str, prompts: list[list[int]], params: SamplingParams) -> Batch:
        """Submit checked prompts, one request of `params.n` completions each (EngineOverloaded when
        the queue is full)."""
        batch = cls(runner, [f"{prefix}-{uuid.uuid4().hex}" for _ in prompts], prompts, params.n, asyncio.Queue())
        runner.add([(r, p, params) for r, p in zip(batch.request_ids, prompts)], batch.outputs)
        return batch

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    def header(self, kind: str, model: str) -> dict:
        """The fields every response and chunk starts with; `kind` is OpenAI's `object`."""
        return {"id": self.request_ids[0], "object": kind, "created": int(time.time()), "model": model}

    def usage(self, completion_tokens: int) -> dict:
        prompt_tokens = sum(map(len, self.prompts))
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def results(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) until every completion has finished; aborts the rest on the way out."""
        first = {r: i * self.n for i, r in enumerate(self.request_ids)}
        pending = set(range(self.num_choices))
        try:
            while pending:
                output = await self.outputs.get()
                if isinstance(output, Exception):
                    raise output
                choice = first[output.request_id] + output.index
                if output.finished:
                    pending.discard(choice)
                yield choice, output
        finally:
            self.runner.abort(list(dict.fromkeys(self.request_ids[i // self.n] for i in pending)))

    async def collect(self, request: Request) -> list[Completion]:
        """Every request's whole result; ClientGone (and the requests aborted) if the client leaves."""
        async def watch() -> None:  # a non-streaming handler is not cancelled when its client leaves
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.outputs.put_nowait(ClientGone())

        completions = [Completion(r, p, j) for r, p in zip(self.request_ids, self.prompts) for j in range(self.n)]
        watcher = asyncio.create_task(watch())
        try:
            async for i, output in self.results():
                completions[i].add(output)
        finally:
            watcher.cancel()
        return completions

    def stream(self, header: dict, choice: Choice, include_usage: bool,
               first: Sequence[dict] = ()) -> StreamingResponse:
        """Server-sent events: the `first` choices, then one chunk per output that adds something."""
        return StreamingResponse(self._events(header, choice, include_usage, first), media_type="text/event-stream")

    async def _events(self, header: dict, choice: Choice, include_usage: bool,
                      first: Sequence[dict]) -> AsyncIterator[str]:
        generated = [0] * self.num_choices
        try:
            for choice_dict in first:
                yield _sse({**header, "choices": [choice_dict]})
            async for i, output in self.results():
                generated[i] = output.num_output_tokens
                if output.text or output.logprobs or output.prompt_logprobs or output.finished:  # else held back
                    yield _sse({**header, "choices": [choice(i, output)]})
            if include_usage:
                yield _sse({**header, "choices": [], "usage": self.usage(sum(generated))})
        except RuntimeError as e:  # the engine failed this request; the status line has gone already
            yield _sse(error_body(str(e), kind="server_error"))
        yield _sse("[DONE]")
