"""The endpoints: /health, /metrics, and under /v1 /models, /models/{id}, /completions and
/chat/completions (the `Gate` checks the API key before any of them). Each checks its request in
full before submitting it, so a bad one gets a 4xx and never reaches the engine."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..outputs import RequestOutput
from ..params import InvalidRequest
from .errors import APIError, error_response, field_names
from .logprobs import chat_logprobs, completion_logprobs
from .protocol import ChatCompletionRequest, CompletionRequest
from .state import State
from .streaming import Batch

public = APIRouter()
v1 = APIRouter(prefix="/v1")


@public.get("/health")
async def health(state: State) -> Response:
    if not state.runner.alive:
        return error_response(503, "the engine thread has stopped", None, "server_error")
    return JSONResponse({"status": "ok"})


@public.get("/metrics")
async def prometheus(state: State) -> Response:
    return Response(state.runner.metrics.render(), media_type="text/plain; version=0.0.4")


def _model_card(state: State, name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "ringlinear",
            "max_model_len": state.engine.max_model_len}


@v1.get("/models")
async def models(state: State) -> dict:
    return {"object": "list", "data": [_model_card(state, state.model_name)]}


@v1.get("/models/{name:path}")  # a path: the default name is the checkpoint's folder as given, slashes and all
async def model(name: str, state: State) -> dict:
    state.check_model(name)
    return _model_card(state, name)


@v1.post("/completions")
async def completions(body: CompletionRequest, request: Request, state: State) -> Response:
    state.check_model(body.model)
    body.check_supported()
    engine = state.engine
    state.runner.check_count(len(body.prompts()))  # before the work of tokenizing them
    prompts = [await state.tokenize(p) for p in body.prompts()]
    params = body.sampling_params(body.max_tokens, body.logprobs)
    for prompt_ids in prompts:
        engine.check_request(prompt_ids, params)
    batch = Batch.submit(state.runner, "cmpl", prompts, params)
    header = batch.header("text_completion", state.model_name)
    if body.stream:
        offsets = [0] * len(prompts)  # each choice's text so far: where its next tokens' text starts

        def choice(i: int, output: RequestOutput) -> dict:
            logprobs = completion_logprobs(engine.tokenizer, output.logprobs, offsets[i])
            offsets[i] += len(output.text)
            return {"index": i, "text": output.text, "logprobs": logprobs, "finish_reason": output.finish_reason}

        return batch.stream(header, choice, body.include_usage)
    done = await batch.collect(request)
    choices = [{"index": i, "text": c.text, "logprobs": completion_logprobs(engine.tokenizer, c.logprobs, 0),
                "finish_reason": c.finish_reason} for i, c in enumerate(done)]
    return JSONResponse({**header, "choices": choices, "usage": batch.usage(sum(len(c.token_ids) for c in done))})


@v1.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State) -> Response:
    state.check_model(body.model)
    if state.chat_template is None:
        raise APIError(400, f"the model {state.model_name!r} has no chat template (its tokenizer_config.json has "
                       "no chat_template): use /v1/completions", "messages")
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequest("top_logprobs", "top_logprobs needs logprobs: true")
    engine = state.engine
    max_tokens_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    with field_names({"max_tokens": max_tokens_field, "logprobs": "top_logprobs", "prompt": "messages"}):
        prompt_ids = await state.tokenize(state.chat_template.render([m.as_dict() for m in body.messages],
                                                                     body.add_generation_prompt))
        if max_tokens is None:  # as OpenAI: up to the end of the context
            max_tokens = max(1, engine.max_model_len - len(prompt_ids))
        params = body.sampling_params(max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
        engine.check_request(prompt_ids, params)
    batch = Batch.submit(state.runner, "chatcmpl", [prompt_ids], params)
    header = batch.header("chat.completion", state.model_name)
    if body.stream:
        def choice(i: int, output: RequestOutput) -> dict:
            delta = {"content": output.text} if output.text else {}
            return {"index": i, "delta": delta, "logprobs": chat_logprobs(engine.tokenizer, output.logprobs),
                    "finish_reason": output.finish_reason}

        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return batch.stream({**header, "object": "chat.completion.chunk"}, choice, body.include_usage, [role])
    done = (await batch.collect(request))[0]
    message = {"index": 0, "message": {"role": "assistant", "content": done.text},
               "logprobs": chat_logprobs(engine.tokenizer, done.logprobs), "finish_reason": done.finish_reason}
    return JSONResponse({**header, "choices": [message], "usage": batch.usage(len(done.token_ids))})
