"""A server of the tiny model on a free loopback port, in a thread of the test process, and the
requests the server tests send it."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time

import httpx2
from infer_helpers import CHAT_TEMPLATE, EOS, byte_tokenizer, tiny_model

from ringlinear.infer import Engine, EngineConfig
from ringlinear.infer.chat import ChatTemplate
from ringlinear.infer.server import create_app
from ringlinear.infer.server.shutdown import Server, server

KEY = "test-key"
MODEL = "tiny"
GOOD = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@contextlib.contextmanager
def running(engine_config: EngineConfig, chat_template: bool = True, **app_options):
    """A server on a free loopback port; yields (base url, engine)."""
    with started(tiny_app(engine_config, chat_template, **app_options)) as (url, _, app):
        yield url, app.state.server.engine


def tiny_app(engine_config: EngineConfig, chat_template: bool = True, model_names: str | tuple[str, ...] = MODEL,
             **app_options):
    engine = Engine(tiny_model(), byte_tokenizer(), engine_config)
    template = ChatTemplate(CHAT_TEMPLATE, eos_token=EOS) if chat_template else None
    return create_app(engine, model_names, template, api_key=KEY, **app_options)


@contextlib.contextmanager
def serving(app):
    """`app` on a free loopback port; yields its base url."""
    with started(app) as (url, _, _):
        yield url


@contextlib.contextmanager
def started(app):
    """`app` served as `ringlinear serve` serves it, on a free loopback port; yields (base url, the
    uvicorn server, app). Two shutdown signals end it, the second ending what still runs."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uvicorn_server: Server = server(app, log_level="warning")
    thread = threading.Thread(target=uvicorn_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uvicorn_server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", uvicorn_server, app
    finally:
        if not uvicorn_server.should_exit:  # a test may have shut it down already
            for _ in range(2):
                uvicorn_server.handle_exit(signal.SIGTERM, None)
        thread.join(timeout=10)
        sock.close()


def wait_idle(engine: Engine, timeout: float = 5.0) -> dict:
    """The engine's stats once nothing runs or waits and the whole cache is free again."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if stats["running"] == stats["waiting"] == 0 and stats["page_usage"] == stats["slot_usage"] == 0:
            return stats
        assert time.monotonic() < deadline, f"engine still busy: {stats}"
        time.sleep(0.02)


def post(url: str, path: str, body, key: str | None = KEY, raw: bool = False) -> httpx2.Response:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    content = body if raw else json.dumps(body)
    return httpx2.post(url + path, content=content, headers=headers, timeout=30)
