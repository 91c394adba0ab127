"""OpenAI-compatible HTTP server on FastAPI + uvicorn: /v1/completions and /v1/chat/completions
(streamed over server-sent events or not), /v1/models, /health and Prometheus /metrics.

Every bad request gets a 4xx with an OpenAI error body naming the field; a client that goes away
has its requests aborted at once (their slots and pages are free after the current step); beyond
the running batch requests queue, and beyond `max_queued` more they get 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .async_engine import MAX_QUEUED, AsyncEngine, EngineOverloaded
from .chat import ChatTemplate
from .engine import Engine
from .metrics import Metrics
from .outputs import Completion, RequestOutput, TokenLogprob
from .params import InvalidRequest, SamplingParams
from .protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


class ClientGone(Exception):
    pass


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
           code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


@contextmanager
def _field_names(names: dict[str, str]):
    """Report an invalid sampling value under the field name the request used."""
    try:
        yield
    except InvalidRequest as e:
        raise InvalidRequest(names.get(e.param, e.param), str(e)) from None


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def create_app(engine: Engine, model_name: str, chat_template: ChatTemplate | None = None,
               api_key: str | None = None, max_queued: int = MAX_QUEUED) -> FastAPI:
    metrics = Metrics()
    runner = AsyncEngine(engine, max_queued, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        yield
        runner.stop()

    app = FastAPI(title="ringlinear", lifespan=lifespan)
    app.state.runner = runner

    # -- errors ---------------------------------------------------------------------------------

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(part) for part in first.get("loc", ())]
        if len(loc) > 1 and loc[0] == "body" and first["type"] != "json_invalid":
            return _error(400, f"{loc[1]}: {first['msg']}", loc[1])
        return _error(400, "the body must be a JSON object, sent with Content-Type: application/json", "body")

    @app.exception_handler(InvalidRequest)
    async def invalid_request(request: Request, exc: InvalidRequest) -> JSONResponse:
        return _error(400, str(exc), exc.param)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param, exc.kind, exc.code)

    @app.exception_handler(EngineOverloaded)
    async def overloaded(request: Request, exc: EngineOverloaded) -> JSONResponse:
        return _error(503, f"the server is overloaded ({exc}); retry later", None, "server_error", "overloaded")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), None)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it: the client closed the connection

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return _error(500, f"internal error: {exc!r}", None, "server_error")

    # -- plain endpoints ------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> Response:
        if not runner.alive:
            return _error(503, "the engine thread has stopped", None, "server_error")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not secrets.compare_digest(given, f"Bearer {api_key}".encode()):
            raise APIError(401, "a valid API key is required (Authorization: Bearer KEY)", None,
                           "authentication_error", "invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "ringlinear", "max_model_len": engine.max_model_len}]}

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server has {model_name!r}", "model",
                           code="model_not_found")

    def token_text(token_id: int) -> str:
        return str(token_id) if engine.tokenizer is None else engine.tokenizer.decode([token_id])

    # -- running requests -----------------------------------------------------------------------

    def submit(prefix: str, prompts: list[list[int]], params: SamplingParams) -> tuple[list[str], asyncio.Queue]:
        request_ids = [f"{prefix}-{uuid.uuid4().hex}" for _ in prompts]
        outputs: asyncio.Queue = asyncio.Queue()
        runner.add([(r, p, params) for r, p in zip(request_ids, prompts)], outputs)
        return request_ids, outputs

    async def results(request_ids: list[str], outputs: asyncio.Queue) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) until every request has finished; aborts the rest on the way out."""
        index = {r: i for i, r in enumerate(request_ids)}
        pending = set(request_ids)
        try:
            while pending:
                output = await outputs.get()
                if isinstance(output, Exception):
                    raise output
                if output.finished:
                    pending.discard(output.request_id)
                yield index[output.request_id], output
        finally:
            runner.abort(list(pending))

    async def collect(request: Request, request_ids: list[str], outputs: asyncio.Queue,
                      prompts: list[list[int]]) -> list[Completion]:
        async def watch() -> None:  # a non-streaming handler is not cancelled when its client leaves
            while (await request.receive())["type"] != "http.disconnect":
                pass
            outputs.put_nowait(ClientGone())

        completions = [Completion(r, p) for r, p in zip(request_ids, prompts)]
        watcher = asyncio.create_task(watch())
        try:
            async for i, output in results(request_ids, outputs):
                completions[i].add(output)
        finally:
            watcher.cancel()
        return completions

    def usage(prompts: list[list[int]], completions_tokens: int) -> dict:
        prompt_tokens = sum(map(len, prompts))
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completions_tokens,
                "total_tokens": prompt_tokens + completions_tokens}

    async def stream(request_ids: list[str], outputs: asyncio.Queue, prompts: list[list[int]], header: dict,
                     first: list[dict], choice, include_usage: bool) -> AsyncIterator[str]:
        generated = [0] * len(prompts)
        try:
            for choice_dict in first:
                yield _sse({**header, "choices": [choice_dict]})
            async for i, output in results(request_ids, outputs):
                generated[i] = output.num_output_tokens
                if output.text or output.logprobs or output.finished:  # held-back text: nothing to send yet
                    yield _sse({**header, "choices": [choice(i, output)]})
            if include_usage:
                yield _sse({**header, "choices": [], "usage": usage(prompts, sum(generated))})
        except RuntimeError as e:  # the engine failed this request
            yield _sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
        yield _sse("[DONE]")

    # -- /v1/completions ------------------------------------------------------------------------

    def completion_logprobs(logprobs: list[TokenLogprob] | None, offset: int) -> dict | None:
        if logprobs is None:
            return None
        tokens = [token_text(lp.token_id) for lp in logprobs]
        offsets = [offset + sum(map(len, tokens[:i])) for i in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [{token_text(t): v for t, v in lp.top} for lp in logprobs], "text_offset": offsets}

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        body.check_supported()
        prompts = [engine.tokenize(p) for p in body.prompts()]
        params = body.sampling_params(body.max_tokens, body.logprobs)
        for prompt_ids in prompts:
            engine.check_request(prompt_ids, params)
        request_ids, outputs = submit("cmpl", prompts, params)
        header = {"id": request_ids[0], "object": "text_completion", "created": int(time.time()), "model": model_name}
        if body.stream:
            offsets = [0] * len(prompts)

            def choice(i: int, output: RequestOutput) -> dict:
                logprobs = completion_logprobs(output.logprobs, offsets[i])
                offsets[i] += len(output.text)
                return {"index": i, "text": output.text, "logprobs": logprobs, "finish_reason": output.finish_reason}

            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(stream(request_ids, outputs, prompts, header, [], choice, include_usage),
                                     media_type="text/event-stream")
        done = await collect(request, request_ids, outputs, prompts)
        choices = [{"index": i, "text": c.text, "logprobs": completion_logprobs(c.logprobs, 0),
                    "finish_reason": c.finish_reason} for i, c in enumerate(done)]
        return JSONResponse({**header, "choices": choices,
                             "usage": usage(prompts, sum(len(c.token_ids) for c in done))})

    # -- /v1/chat/completions -------------------------------------------------------------------

    def chat_logprobs(logprobs: list[TokenLogprob] | None) -> dict | None:
        if logprobs is None:
            return None

        def entry(token_id: int, logprob: float) -> dict:
            text = token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in logprobs]}

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        if chat_template is None:
            raise APIError(400, f"the model {model_name!r} has no chat template (its tokenizer_config.json has "
                           "no chat_template): use /v1/completions", "messages")
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidRequest("top_logprobs", "top_logprobs needs logprobs: true")
        max_tokens_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        with _field_names({"max_tokens": max_tokens_field, "logprobs": "top_logprobs", "prompt": "messages"}):
            prompt_ids = engine.tokenize(chat_template.render([m.as_dict() for m in body.messages],
                                                              body.add_generation_prompt))
            if max_tokens is None:  # as OpenAI: up to the end of the context
                max_tokens = max(1, engine.max_model_len - len(prompt_ids))
            params = body.sampling_params(max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
            engine.check_request(prompt_ids, params)
        request_ids, outputs = submit("chatcmpl", [prompt_ids], params)
        header = {"id": request_ids[0], "object": "chat.completion", "created": int(time.time()), "model": model_name}
        if body.stream:
            def choice(i: int, output: RequestOutput) -> dict:
                delta = {"content": output.text} if output.text else {}
                return {"index": i, "delta": delta, "logprobs": chat_logprobs(output.logprobs),
                        "finish_reason": output.finish_reason}

            first = [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}]
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            chunk_header = {**header, "object": "chat.completion.chunk"}
            return StreamingResponse(stream(request_ids, outputs, [prompt_ids], chunk_header, first, choice,
                                            include_usage), media_type="text/event-stream")
        done = (await collect(request, request_ids, outputs, [prompt_ids]))[0]
        choice = {"index": 0, "message": {"role": "assistant", "content": done.text},
                  "logprobs": chat_logprobs(done.logprobs), "finish_reason": done.finish_reason}
        return JSONResponse({**header, "choices": [choice], "usage": usage([prompt_ids], len(done.token_ids))})

    app.include_router(v1)
    return app


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_model_name: str | None = None, max_queued: int = MAX_QUEUED, device: str | None = None,
          **engine_config) -> None:
    """Load a checkpoint directory and serve it until interrupted."""
    import uvicorn

    engine = Engine.from_pretrained(model, device=device, **engine_config)
    name = served_model_name or Path(model).resolve().name
    app = create_app(engine, name, ChatTemplate.from_directory(model), api_key, max_queued)
    uvicorn.run(app, host=host, port=port, log_level="info")
