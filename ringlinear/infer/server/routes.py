"""The endpoints: /health, /metrics, and under /v1 /models, /models/{id}, /completions and
/chat/completions (the `Gate` checks the API key before any of them). Each checks its request in
full before submitting it, so a bad one gets a 4xx and never reaches the engine."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..outputs import RequestOutput
from ..params import InvalidRequest
from .errors import APIError, error_response, field_names
from .logprobs import chat_logprobs, completion_logprobs, vllm_prompt_logprobs
from .protocol import ChatCompletionRequest, CompletionRequest
from .state import State
from .streaming import Batch

public = APIRouter()
v1 = APIRouter(prefix="/v1")


@public.get("/health")
async def health(state: State) -> Response:
    if not state.runner.alive:
        return error_response(503, "the engine thread has stopped", None, "server_error")
    if not state.runner.ready:
        return JSONResponse({"status": "starting"}, status_code=503, headers={"Retry-After": "1"})
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
    state.runner.check_count(len(body.prompts()), body.n)  # before the work of tokenizing them
    prompts = [await state.tokenize(p) for p in body.prompts()]
    params = body.sampling_params(body.max_tokens, body.logprobs, body.prompt_logprobs_wanted())
    for prompt_ids in prompts:
        engine.check_request(prompt_ids, params)
    batch = Batch.submit(state.runner, "cmpl", prompts, params)
    header = batch.header("text_completion", state.model_name)
    # with echo, each choice's text and log-probs start with its prompt's
    echoed = [p if isinstance(p, str) else engine.detokenize(ids) for p, ids in zip(body.prompts(), prompts)]

    def echo(i: int) -> tuple[str, list[int] | None]:
        return (echoed[i // body.n], prompts[i // body.n]) if body.echo else ("", None)

    def logprobs(i: int, values, offset: int, prompt_values) -> dict | None:
        prompt_ids = echo(i)[1] if prompt_values is not None else None
        return completion_logprobs(engine.tokenizer, values, offset, prompt_ids, prompt_values)

    if body.stream:
        offsets = [0] * batch.num_choices  # each choice's text so far: where its next tokens' text starts
        started = [False] * batch.num_choices

        def choice(i: int, output: RequestOutput) -> dict:
            prefix, prompt_values = "", None
            if not started[i]:  # its first chunk carries the echo
                started[i] = True
                prefix, prompt_values = echo(i)[0], output.prompt_logprobs if body.echo else None
            entry = {"index": i, "text": prefix + output.text,
                     "logprobs": logprobs(i, output.logprobs, offsets[i], prompt_values),
                     "finish_reason": output.finish_reason}
            if body.prompt_logprobs is not None and output.prompt_logprobs is not None:
                entry["prompt_logprobs"] = vllm_prompt_logprobs(engine.tokenizer, output.prompt_logprobs)
            offsets[i] += len(prefix) + len(output.text)
            return entry

        return batch.stream(header, choice, body.include_usage)
    done = await batch.collect(request)
    choices = []
    for i, c in enumerate(done):
        prefix = echo(i)[0]
        entry = {"index": i, "text": prefix + c.text,
                 "logprobs": logprobs(i, c.logprobs, 0, c.prompt_logprobs if body.echo else None),
                 "finish_reason": c.finish_reason}
        if body.prompt_logprobs is not None:
            entry["prompt_logprobs"] = vllm_prompt_logprobs(engine.tokenizer, c.prompt_logprobs)
        choices.append(entry)
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
    state.runner.check_count(1, body.n)
    batch = Batch.submit(state.runner, "chatcmpl", [prompt_ids], params)
    header = batch.header("chat.completion", state.model_name)
    if body.stream:
        def choice(i: int, output: RequestOutput) -> dict:
            delta = {"content": output.text} if output.text else {}
            return {"index": i, "delta": delta, "logprobs": chat_logprobs(engine.tokenizer, output.logprobs),
                    "finish_reason": output.finish_reason}

        roles = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                 for i in range(body.n)]
        return batch.stream({**header, "object": "chat.completion.chunk"}, choice, body.include_usage, roles)
    done = await batch.collect(request)
    messages = [{"index": i, "message": {"role": "assistant", "content": c.text},
                 "logprobs": chat_logprobs(engine.tokenizer, c.logprobs), "finish_reason": c.finish_reason}
                for i, c in enumerate(done)]
    return JSONResponse({**header, "choices": messages, "usage": batch.usage(sum(len(c.token_ids) for c in done))})
