"""The OpenAI-compatible server on loopback: the real `openai` client on both endpoints, streamed
and not; every kind of bad input; disconnects, the queue bound, and a load test."""

import asyncio
import json
import socket
import threading
import time

import httpx2
import openai
import pytest
import torch
from infer_helpers import byte_tokenizer, tiny_checkpoint
from server_helpers import CHAT, GOOD, KEY, MODEL, post, running, serving, tiny_app, wait_idle

from ringlinear.generate import generate
from ringlinear.infer import EngineConfig
from ringlinear.infer.server.app import load_app, served_model_names


@pytest.fixture(scope="module")
def server():
    with running(EngineConfig(max_num_seqs=64, max_num_batched_tokens=512, page_size=8, num_pages=1024,
                              max_model_len=512)) as served:
        yield served


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def test_completions_with_the_openai_client(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert choice.finish_reason == "length" and out.usage.completion_tokens == 6
    assert out.usage.prompt_tokens == len("Hello")
    streamed = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-2].choices[0].finish_reason == "length"


def test_completion_batches_logprobs_and_seeds(client):
    out = client.completions.create(model=MODEL, prompt=["ab", "cd"], max_tokens=4, temperature=0.9,
                                    seed=3, logprobs=2, extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1]
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert all(len(top) <= 2 and lp <= 0 for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs))
    again = client.completions.create(model=MODEL, prompt="ab", max_tokens=4, temperature=0.9, seed=3,
                                      extra_body={"ignore_eos": True})
    assert again.choices[0].text == out.choices[0].text  # the seed, not the batch, decides


def test_n_completions_of_one_prompt_are_the_seeds_that_follow(client):
    out = client.completions.create(model=MODEL, prompt=["ab", "cd"], max_tokens=5, temperature=1.0, seed=11, n=3,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == list(range(6))  # prompt-major, as OpenAI numbers them
    assert out.usage.completion_tokens == 30 and out.usage.prompt_tokens == 4
    for j in range(3):  # completion j of a prompt is the request seeded seed + j
        alone = client.completions.create(model=MODEL, prompt="cd", max_tokens=5, temperature=1.0, seed=11 + j,
                                          extra_body={"ignore_eos": True})
        assert out.choices[3 + j].text == alone.choices[0].text
    streamed = client.completions.create(model=MODEL, prompt="ab", max_tokens=5, temperature=1.0, seed=11, n=3,
                                         stream=True, extra_body={"ignore_eos": True})
    texts = ["", "", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in out.choices[:3]]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2,
                                          max_tokens=4, seed=5, extra_body={"ignore_eos": True})
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 8


def test_echo_scores_the_prompt_as_lm_eval_asks(server, client):
    """lm-eval's loglikelihood request: the prompt's tokens with their log-probs, the first null."""
    engine = server[1]
    prompt = byte_tokenizer().encode("def f(x): return x").ids
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, logprobs=1, echo=True, temperature=0)
    logprobs = out.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert len(logprobs.token_logprobs) == len(prompt) + 1
    with torch.no_grad():
        logp = engine.model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    expected = logp[torch.arange(len(prompt) - 1), prompt[1:]]
    assert torch.allclose(torch.tensor(logprobs.token_logprobs[1:len(prompt)]), expected, atol=1e-4)
    assert out.choices[0].text.startswith("def f(x): return x")
    assert logprobs.text_offset[:3] == [0, 1, 2]
    only = client.completions.create(model=MODEL, prompt="abc", max_tokens=0, echo=True)
    assert only.choices[0].text == "abc" and only.usage.completion_tokens == 0
    vllm = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body={"prompt_logprobs": 2})
    values = vllm.choices[0].model_extra["prompt_logprobs"]
    assert values[0] is None and len(values) == len(prompt)
    first = values[1][str(prompt[1])]
    assert abs(first["logprob"] - expected[0].item()) < 1e-4 and first["rank"] >= 1
    streamed = list(client.completions.create(model=MODEL, prompt="abc", max_tokens=3, echo=True, stream=True,
                                              temperature=0, extra_body={"ignore_eos": True}))
    plain = client.completions.create(model=MODEL, prompt="abc", max_tokens=3, echo=True, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_health_says_starting_until_the_warm_up_is_done():
    release = threading.Event()
    app = tiny_app(EngineConfig(page_size=8, num_pages=64), warm_up=True)
    engine = app.state.server.engine
    warm_up = engine.warm_up
    engine.warm_up = lambda: (release.wait(10), warm_up())[1]
    with serving(app) as url:
        starting = httpx2.get(url + "/health")
        assert starting.status_code == 503 and starting.json() == {"status": "starting"}
        release.set()
        deadline = time.monotonic() + 30
        while httpx2.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert engine.stats()["prompt_tokens"] == 0  # the warm-up is forgotten


def test_chat_with_the_openai_client(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    message = out.choices[0].message
    assert message.role == "assistant" and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len("<|system|>Be brief.\n<|user|>Hi!\n<|assistant|>")
    assert len(out.choices[0].logprobs.content) == 5
    assert all(len(t.top_logprobs) == 3 for t in out.choices[0].logprobs.content)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_and_stop_tokens(server, client):
    base = client.completions.create(model=MODEL, prompt="xyz", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[3:5]
    cut = client.completions.create(model=MODEL, prompt="xyz", max_tokens=12, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == base[:base.index(stop)] and cut.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model=MODEL, prompt="xyz", max_tokens=12, temperature=0, stop=stop,
                                       stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in chunks) == cut.choices[0].text
    greedy = generate(server[1].model, [byte_tokenizer().encode("xyz").ids], max_new_tokens=12, temperature=0)[0]
    stopped = client.completions.create(model=MODEL, prompt="xyz", max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True, "stop_token_ids": [greedy[2]]})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == greedy.index(greedy[2])  # the stop token is not part of it


BAD_INPUTS = [  # (path, body or raw text, status, param)
    ("/v1/completions", "{not json", 400, "body"),
    ("/v1/completions", "[1, 2]", 400, "body"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi"}, 400, "model"),
    ("/v1/completions", {**GOOD, "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {**GOOD, "prompt": 5}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": "x" * 600}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": 2.5}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": 10**12}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": 511}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {**GOOD, "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {**GOOD, "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {**GOOD, "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {**GOOD, "top_k": -1}, 400, "top_k"),
    ("/v1/completions", {**GOOD, "min_p": 2}, 400, "min_p"),
    ("/v1/completions", {**GOOD, "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {**GOOD, "frequency_penalty": -2.5}, 400, "frequency_penalty"),
    ("/v1/completions", {**GOOD, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {**GOOD, "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {**GOOD, "seed": -1}, 400, "seed"),
    ("/v1/completions", {**GOOD, "stop": [""]}, 400, "stop"),
    ("/v1/completions", {**GOOD, "stop": 7}, 400, "stop"),
    ("/v1/completions", {**GOOD, "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ("/v1/completions", {**GOOD, "n": 0}, 400, "n"),
    ("/v1/completions", {**GOOD, "n": 65}, 400, "n"),  # more than the engine runs at once
    ("/v1/completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),  # 0 only with echo
    ("/v1/completions", {**GOOD, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 600}]}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 10**9}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 99}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "temperature": None}, 400, "temperature"),
    ("/v1/nothing", GOOD, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD_INPUTS)
def test_bad_input_gets_an_openai_error_naming_the_field(server, path, body, status, param):
    url, engine = server
    response = post(url, path, body, raw=isinstance(body, str))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_api_key_and_the_unguarded_endpoints(server):
    url, engine = server
    for key in (None, "wrong"):
        response = post(url, "/v1/completions", GOOD, key=key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx2.get(url + "/v1/models").status_code == 401
    assert httpx2.get(url + "/health").json() == {"status": "ok"}
    post(url, "/v1/completions", GOOD)
    metrics = httpx2.get(url + "/metrics").text
    for name in ("ringlinear_requests_waiting", "ringlinear_requests_running", "ringlinear_cache_page_usage",
                 "ringlinear_generation_tokens_per_second", "ringlinear_time_to_first_token_seconds_bucket",
                 "ringlinear_inter_token_latency_seconds_bucket", "ringlinear_request_latency_seconds_count"):
        assert name in metrics
    assert post(url, "/v1/completions", GOOD).status_code == 200  # still serving after all of it


def test_the_model_answers_to_its_path_as_given_and_to_its_folder_name(tmp_path, monkeypatch):
    tiny_checkpoint(tmp_path / "runs/tiny/checkpoints/step_000300/model")
    (tmp_path / "runs/tiny/checkpoint").symlink_to("checkpoints/step_000300/model")  # as the trainer links it
    monkeypatch.chdir(tmp_path)
    app = load_app("runs/tiny/checkpoint", KEY, device="cpu", max_num_seqs=2, page_size=8, num_pages=32)
    with serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["runs/tiny/checkpoint"]
        out = client.completions.create(model="runs/tiny/checkpoint", prompt="hi", max_tokens=2)
        assert out.model == "runs/tiny/checkpoint" and out.usage.completion_tokens >= 1
        chat = client.chat.completions.create(model="checkpoint", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=2)
        assert chat.model == "runs/tiny/checkpoint" and chat.usage.completion_tokens >= 1
        for unknown in ("model", "runs/tiny", "tiny"):  # not the symlink's target, nor another folder
            response = post(url, "/v1/completions", {**GOOD, "model": unknown})
            assert response.status_code == 404 and response.json()["error"]["param"] == "model"
    assert served_model_names("runs/tiny/checkpoint", ["tiny-chat", "tiny"]) == ("tiny-chat", "tiny")
    assert served_model_names("checkpoint/") == ("checkpoint/", "checkpoint")


def test_chat_without_a_template_is_refused_clearly():
    with running(EngineConfig(max_num_seqs=2, page_size=8, num_pages=32), chat_template=False) as (url, _):
        response = post(url, "/v1/chat/completions", CHAT)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "messages" and "chat template" in response.text


def test_a_client_that_disconnects_frees_its_slot_at_once(server):
    url, engine = server
    wait_idle(engine)
    long = {**GOOD, "max_tokens": 400, "ignore_eos": True}
    with httpx2.stream("POST", url + "/v1/completions", json={**long, "stream": True},
                       headers={"Authorization": f"Bearer {KEY}"}) as response:
        lines = response.iter_lines()
        next(lines)
        assert engine.stats()["running"] == 1
    wait_idle(engine, timeout=2.0)
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:  # not streamed
        body = json.dumps(long).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 5
        while engine.stats()["running"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    wait_idle(engine, timeout=2.0)


def test_over_capacity_requests_queue_then_get_503():
    with running(EngineConfig(max_num_seqs=1, page_size=8, num_pages=512), max_queued=1) as (url, engine):
        slow = {**GOOD, "max_tokens": 4000, "ignore_eos": True, "stream": True}  # runs until closed
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx2.stream("POST", url + "/v1/completions", json=slow, headers=headers) as first:
            lines = first.iter_lines()  # closing this iterator would close the connection
            next(lines)
            with httpx2.stream("POST", url + "/v1/completions", json=slow, headers=headers) as second:
                assert second.status_code == 200  # queued
                third = post(url, "/v1/completions", GOOD)
                assert third.status_code == 503 and third.json()["error"]["code"] == "overloaded"
                assert third.headers["retry-after"] == "1"
        wait_idle(engine)
        assert post(url, "/v1/completions", GOOD).status_code == 200


@pytest.mark.slow
def test_load_hundreds_of_concurrent_requests(server):
    url, engine = server
    start = wait_idle(engine)
    free_pages = engine.scheduler.cache.num_free_pages
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    async def one(i: int) -> int:
        options = dict(model=MODEL, max_tokens=1 + i % 6, temperature=0.7, seed=i, extra_body={"ignore_eos": True})
        if i % 2:
            messages = [{"role": "user", "content": f"question {i}" * (1 + i % 3)}]
            if i % 4 == 1:
                chunks = [c async for c in await client.chat.completions.create(messages=messages, stream=True,
                                                                                **options)]
                return sum(c.choices[0].finish_reason == "length" for c in chunks if c.choices)
            out = await client.chat.completions.create(messages=messages, **options)
        else:
            out = await client.completions.create(prompt=f"prompt number {i} " * (1 + i % 5), **options)
        return int(out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 1 + i % 6)

    async def all_requests() -> list[int]:
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(300))), timeout=240)

    assert sum(asyncio.run(all_requests())) == 300
    end = wait_idle(engine)
    assert engine.scheduler.cache.num_free_pages == free_pages and end["generated_tokens"] > start["generated_tokens"]
    assert httpx2.get(url + "/health").status_code == 200
