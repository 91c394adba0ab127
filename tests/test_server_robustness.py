"""A bad request fails alone: numbers out of range and lone surrogates get a 400 naming the field,
connections survive errors, huge bodies and prompts neither block nor bloat the server, the API
key comes first, shutdown ends every stream properly, and a fuzz of malformed requests gets no
5xx while a stream runs to its end."""

import json
import socket
import threading
import time

import httpx2
import openai
import pytest
from infer_helpers import byte_tokenizer
from server_helpers import CHAT, GOOD, KEY, MODEL, post, started, tiny_app, wait_idle
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from ringlinear.infer import EngineConfig
from ringlinear.infer.server.tokens import bytes_per_token

MAX_REQUEST_BYTES = 12 * 2**20
AUTH = {"Authorization": f"Bearer {KEY}"}


def engine_config(**changes) -> EngineConfig:
    return EngineConfig(**{"max_num_seqs": 4, "max_num_batched_tokens": 256, "page_size": 8, "num_pages": 512,
                           "max_model_len": 512, **changes})


@pytest.fixture(scope="module")
def served():
    """(url, engine, app) of a server that holds 4 running and 4 queued requests."""
    app = tiny_app(engine_config(), max_queued=4, max_request_bytes=MAX_REQUEST_BYTES)
    with started(app) as (url, _, app):
        yield url, app.state.server.engine, app


def exchange(sock: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on an open connection: (status, headers, body)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def http(method: str, path: str, body: bytes = b"", key: str | None = KEY, **headers: str) -> bytes:
    fields = {"Host": "x", "Content-Type": "application/json", "Content-Length": str(len(body)), **headers}
    if key:
        fields["Authorization"] = f"Bearer {key}"
    return (f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n").encode() \
        + body


def connect(url: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30)


OUT_OF_RANGE = [  # (body changes, param): values that passed the edge and then failed the engine step
    ({"top_k": 2**63}, "top_k"),
    ({"top_k": 2**64 + 1}, "top_k"),
    ({"seed": 2**63}, "seed"),
    ({"seed": 10**40}, "seed"),
    ({"stop_token_ids": [257]}, "stop_token_ids"),
    ({"stop_token_ids": [2**64]}, "stop_token_ids"),
    ({"logprobs": 2**70}, "logprobs"),
    ({"max_tokens": 2**70}, "max_tokens"),
    ({"prompt": [1, 2**64]}, "prompt"),
    ({"repetition_penalty": 1e308}, "repetition_penalty"),
]


@pytest.mark.parametrize("changes,param", OUT_OF_RANGE)
def test_numbers_out_of_range_get_400_naming_the_field(served, changes, param):
    response = post(served[0], "/v1/completions", {**GOOD, "temperature": 0.5, **changes})
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


SURROGATES = [  # raw JSON: a lone UTF-16 surrogate, which Python keeps in a str and no tokenizer takes
    ("/v1/completions", '{"model": "tiny", "prompt": "a\\ud800b"}', "prompt"),
    ("/v1/completions", '{"model": "tiny", "prompt": ["ok", "\\udc00"]}', "prompt"),
    ("/v1/completions", '{"model": "tiny", "prompt": "hi", "stop": ["\\ud83d"]}', "stop"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}', "messages"),
    ("/v1/chat/completions", ('{"model": "tiny", "messages": [{"role": "user", "content": '
                              '[{"type": "text", "text": "\\ud800"}]}]}'), "messages"),
]


@pytest.mark.parametrize("path,raw,param", SURROGATES)
def test_lone_surrogates_get_400(served, path, raw, param):
    response = post(served[0], path, raw, raw=True)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_the_connection_survives_every_error(served, monkeypatch):
    url, engine, _ = served

    def fail(*args):
        raise RuntimeError("a bug")

    good = json.dumps(GOOD).encode()
    with connect(url) as sock:
        monkeypatch.setattr(engine, "check_request", fail)
        status, headers, body = exchange(sock, http("POST", "/v1/completions", good))
        assert status == 500 and json.loads(body)["error"]["type"] == "server_error"
        monkeypatch.undo()
        for request, expected in ((http("POST", "/v1/completions", b"{bad"), 400),
                                  (http("POST", "/v1/completions", good, key="wrong"), 401),
                                  (http("POST", "/v1/nothing", good), 404),
                                  (http("GET", "/v1/completions"), 405),
                                  (http("POST", "/v1/completions", json.dumps({**GOOD, "top_k": 2**63}).encode()), 400),
                                  (http("POST", "/v1/completions", good), 200)):
            status, headers, body = exchange(sock, request)
            assert status == expected and headers.get("connection") != "close", body


def test_a_10_mb_prompt_neither_blocks_nor_keeps_memory(served):
    url = served[0]

    def rss() -> int:
        return int(open("/proc/self/statm").read().split()[1]) * 4096

    before = rss()
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=post(url, "/v1/completions",
                                                                 {**GOOD, "prompt": "ab " * (10**7 // 3)})))
    thread.start()
    start = time.monotonic()
    while thread.is_alive():
        assert httpx2.get(url + "/health", timeout=2).status_code == 200
        time.sleep(0.05)
    assert time.monotonic() - start < 5
    assert result["r"].status_code == 400 and result["r"].json()["error"]["param"] == "prompt"
    assert rss() - before < 200 * 2**20


def test_byte_level_tokenizers_bound_the_text_a_token_stands_for():
    assert bytes_per_token(byte_tokenizer()) == len("<|endoftext|>")
    normalized = byte_tokenizer()
    normalized.normalizer = normalizers.NFC()  # composing characters shrinks the text: no bound
    assert bytes_per_token(normalized) is None
    words = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()  # drops the spaces: no bound
    assert bytes_per_token(words) is None


def test_bodies_over_the_limit_get_413_before_they_are_read(served):
    url = served[0]
    with connect(url) as sock:  # the headers alone: the 20 MB never come
        status, _, body = exchange(sock, http("POST", "/v1/completions", **{"Content-Length": str(20 * 2**20)}))
    assert status == 413 and json.loads(body)["error"]["param"] == "body"

    def chunks():  # no Content-Length: refused once more than the limit has arrived
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(MAX_REQUEST_BYTES // 2**20 + 1):
            yield b"a" * 2**20
        yield b'"}'

    response = httpx2.post(url + "/v1/completions", content=chunks(), headers=AUTH, timeout=30)
    assert response.status_code == 413 and response.json()["error"]["param"] == "body"
    assert post(url, "/v1/completions", GOOD).status_code == 200


def test_more_prompts_than_can_ever_be_served_get_400(served):
    url = served[0]
    response = post(url, "/v1/completions", {**GOOD, "prompt": ["x"] * 9})  # 4 running + 4 queued
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    assert post(url, "/v1/completions", {**GOOD, "prompt": ["x"] * 8}).status_code == 200


def test_the_api_key_comes_before_everything_but_health_and_metrics(served):
    url = served[0]
    with connect(url) as sock:
        for request in (http("POST", "/v1/completions", b"{not json", key=None),
                        http("POST", "/v1/nothing", b"{}", key=None),
                        http("GET", "/v1/completions", key=None),
                        http("GET", "/v1/models/tiny", key="wrong"),
                        http("POST", "/v1/completions", key=None, **{"Content-Length": str(10**9)})):
            status, _, body = exchange(sock, request)
            assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key", body
    assert httpx2.get(url + "/health").status_code == 200
    assert "ringlinear_requests_running" in httpx2.get(url + "/metrics").text  # open, as in vLLM


def test_models_by_name_and_the_openai_client(served):
    url = served[0]
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.owned_by == "ringlinear"
    with pytest.raises(openai.NotFoundError, match="'gpt-4' does not exist"):
        client.models.retrieve("gpt-4")
    with pytest.raises(openai.BadRequestError, match="top_k"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body={"top_k": 2**63})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    out = client.completions.create(model=MODEL, prompt="hi", max_tokens=3, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3


def test_several_served_names():
    app = tiny_app(engine_config(), model_names=("tiny", "tiny-chat"))
    with started(app) as (url, _, _):
        assert [m["id"] for m in httpx2.get(url + "/v1/models", headers=AUTH).json()["data"]] == ["tiny"]
        assert httpx2.get(url + "/v1/models/tiny-chat", headers=AUTH).json()["id"] == "tiny-chat"
        out = post(url, "/v1/completions", {**GOOD, "model": "tiny-chat"}).json()
        assert out["model"] == "tiny"


def stream_events(url: str, body: dict) -> list:
    """The data of every server-sent event of a streamed completion, until the server ends it."""
    with httpx2.stream("POST", url + "/v1/completions", json={**body, "stream": True}, headers=AUTH,
                       timeout=60) as response:
        assert response.status_code == 200
        return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def in_thread(target, *args) -> tuple[threading.Thread, dict]:
    result = {}
    thread = threading.Thread(target=lambda: result.update(value=target(*args)))
    thread.start()
    return thread, result


def test_sigterm_lets_streams_finish_then_ends_the_rest():
    app = tiny_app(engine_config(), shutdown_timeout=2.0)
    with started(app) as (url, server, app):
        engine = app.state.server.engine
        long, long_events = in_thread(stream_events, url, {**GOOD, "max_tokens": 500, "ignore_eos": True})
        short, short_events = in_thread(stream_events, url, {**GOOD, "max_tokens": 3, "ignore_eos": True})
        while engine.stats()["running"] < 2:
            time.sleep(0.01)
        with connect(url) as sock:  # a keep-alive connection open before the signal
            assert exchange(sock, http("GET", "/health"))[0] == 200
            start = time.monotonic()
            server.handle_exit(15, None)
            status, headers, _ = exchange(sock, http("POST", "/v1/completions", json.dumps(GOOD).encode()))
            assert status == 503 and headers["retry-after"]
        short.join(10)
        assert json.loads(short_events["value"][-2])["choices"][0]["finish_reason"] == "length"
        long.join(10)
        elapsed = time.monotonic() - start
        events = long_events["value"]
        assert events[-1] == "[DONE]" and "shutting down" in json.loads(events[-2])["error"]["message"]
        assert 2.0 <= elapsed < 8  # generous: a loaded CI machine
        with pytest.raises(httpx2.ConnectError):  # no longer accepting
            httpx2.get(url + "/health", timeout=2)


def test_a_second_signal_ends_the_streams_at_once_with_an_end_event():
    app = tiny_app(engine_config())  # the default shutdown timeout: 30 s
    with started(app) as (url, server, app):
        stream, events = in_thread(stream_events, url, {**GOOD, "max_tokens": 500, "ignore_eos": True})
        while app.state.server.engine.stats()["running"] < 1:
            time.sleep(0.01)
        start = time.monotonic()
        server.handle_exit(15, None)
        server.handle_exit(2, None)
        stream.join(10)
        assert time.monotonic() - start < 3
        assert events["value"][-1] == "[DONE]" and "error" in json.loads(events["value"][-2])


INVALID = {  # per endpoint and field: values of the wrong type or out of range
    "/v1/completions": {
        "model": [None, 1, [], "gpt-4"], "prompt": [None, 5, True, {}, [None], [1.5], [-1], [257], "", [], [[]]],
        "max_tokens": [None, "1", 1.5, -1, 0, True, 2**64, 600], "temperature": ["x", -1, 101, None, []],
        "top_p": [0, -0.5, 2, "x", None], "top_k": [-1, 2**63, 1.5, "x", None], "min_p": [-0.1, 1.5, "x"],
        "seed": [-1, 2**64, 1.5, "x", True], "logprobs": [-1, 21, 1.5, "x", True],
        "stop": [1, [1], [""], {}, True], "stop_token_ids": [1, [-1], [257], ["a"], [1.5], "x"],
        "n": [0, -1, 129, 10**6, "x", None], "echo": ["x", 1], "stream": ["x", 1, None],
        "stream_options": ["x", 1, {"include_usage": "x"}], "presence_penalty": [3, -3, "x"],
        "frequency_penalty": [3, -3, "x"], "repetition_penalty": [0, -1, 101, "x"], "ignore_eos": ["x", 1],
        "best_of": [2, "x"], "suffix": [1, "x"]},
    "/v1/chat/completions": {
        "messages": [[], "hi", None, [{"content": "x"}], [{"role": 1, "content": "x"}], [{"role": "user", "content": 5}],
                     [{"role": "user", "content": [{"type": "image_url"}]}], [{"role": "user", "content": [{"type": "text"}]}]],
        "max_tokens": [-1, 0, 10**9, "x"], "max_completion_tokens": [0, 10**9, "x"], "logprobs": ["x", 1],
        "top_logprobs": [5, -1, "x"], "temperature": ["x", -1]},
}


def fuzz_requests() -> list[tuple[str, str, bytes, dict]]:
    """(method, path, body, headers) of malformed requests: each field of each endpoint with every
    wrong type and out-of-range value, bad JSON and UTF-8, bodies too large, wrong routes and methods."""
    requests = [("POST", path, json.dumps({**(GOOD if path == "/v1/completions" else CHAT), name: value}).encode(), {})
                for path, fields in INVALID.items() for name, values in fields.items() for value in values]
    requests += [("POST", "/v1/completions", raw, {}) for raw in (
        b"", b"{", b"null", b"[]", b'"x"', b"{\"model\": \"tiny\", \"prompt\": \"\xff\xfe\"}", b"\xc3\x28",
        b'{"model": "tiny", "prompt": "hi", "max_tokens": 1e999}', b'{"model": "tiny", "prompt": NaN}',
        b'{"model": "tiny", "prompt": "hi"' + b" " * 100, b'{"model": "tiny", "prompt": "' + b"x" * 5000 + b'"}')]
    requests += [("POST", "/v1/completions", b"{}", {"Content-Length": str(MAX_REQUEST_BYTES + 1)}),
                 ("POST", "/v1/completions", json.dumps(GOOD).encode(), {"Content-Type": "text/plain"}),
                 ("GET", "/v1/chat/completions", b"", {}), ("PUT", "/v1/models", b"", {}),
                 ("DELETE", "/health", b"", {}), ("GET", "/v1/models/nope", b"", {}), ("GET", "/v2", b"", {}),
                 ("POST", "/v1/completions/../../etc/passwd", b"{}", {}), ("GET", "/%ff", b"", {})]
    return requests


def test_fuzz_gets_no_5xx_and_a_stream_meanwhile_completes(served):
    url, engine, _ = served
    wait_idle(engine)
    stream, events = in_thread(stream_events, url, {**GOOD, "max_tokens": 60, "ignore_eos": True,
                                                    "temperature": 0.7, "top_k": 5})
    requests = fuzz_requests()
    assert len(requests) >= 100
    statuses = {}
    sock = connect(url)
    for method, path, body, headers in requests:
        status, response_headers, _ = exchange(sock, http(method, path, body, **headers))
        statuses[(method, path, body[:80])] = status
        if response_headers.get("connection") == "close":
            sock.close()
            sock = connect(url)
    sock.close()
    assert all(400 <= s < 500 for s in statuses.values()), {k: s for k, s in statuses.items() if s >= 500 or s < 400}
    stream.join(60)
    chunks = [json.loads(e) for e in events["value"][:-1]]
    assert events["value"][-1] == "[DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks) and not any("error" in c for c in chunks)
    wait_idle(engine)


def test_a_failed_step_ends_the_running_requests_and_not_the_queued_ones(monkeypatch):
    app = tiny_app(engine_config(max_num_seqs=1))
    with started(app) as (url, _, app):
        engine = app.state.server.engine
        running, running_events = in_thread(stream_events, url, {**GOOD, "max_tokens": 500, "ignore_eos": True})
        while engine.stats()["running"] < 1:
            time.sleep(0.01)
        queued, queued_result = in_thread(post, url, "/v1/completions", {**GOOD, "max_tokens": 3, "ignore_eos": True})
        while engine.stats()["waiting"] < 1:
            time.sleep(0.01)
        execute = engine.runner.execute

        def fail_once(*args, **kwargs):
            monkeypatch.setattr(engine.runner, "execute", execute)
            raise RuntimeError("the device failed")

        monkeypatch.setattr(engine.runner, "execute", fail_once)
        running.join(10)
        queued.join(10)
        assert "the device failed" in json.loads(running_events["value"][-2])["error"]["message"]
        assert queued_result["value"].json()["usage"]["completion_tokens"] == 3
