"""The app factory (one engine thread, its metrics, the gate, the error handlers and the endpoints
per app), the names a checkpoint is served under, and `serve`, which loads one and runs its app
under uvicorn until a signal shuts it down."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from ..async_engine import MAX_QUEUED, AsyncEngine
from ..chat import ChatTemplate
from ..engine import Engine
from ..limits import MAX_REQUEST_BYTES, SHUTDOWN_TIMEOUT
from ..metrics import Metrics
from .errors import add_error_handlers
from .gate import Gate
from .routes import public, v1
from .shutdown import Shutdown, server
from .state import ServerState
from .tokens import PromptTokenizer


async def _announce_ready(runner: AsyncEngine) -> None:
    while not runner.ready:
        await asyncio.sleep(0.05)
    logging.getLogger("uvicorn.error").info("Engine warmed up in %.1f s (every step shape compiled): ready",
                                            runner.warm_up_seconds)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state.server
    state.runner.start()  # on the server's event loop, which receives the engine's outputs
    state.shutdown.start()
    announce = asyncio.create_task(_announce_ready(state.runner)) if state.runner.warm_up else None
    yield
    if announce is not None:
        announce.cancel()
    state.runner.stop()


def create_app(engine: Engine, model_names: str | Sequence[str], chat_template: ChatTemplate | None = None,
               api_key: str | None = None, max_queued: int = MAX_QUEUED, max_request_bytes: int = MAX_REQUEST_BYTES,
               shutdown_timeout: float = SHUTDOWN_TIMEOUT, warm_up: bool | None = None) -> FastAPI:
    """`model_names`: the name requests must give, or several; /v1/models and responses give the first.
    `warm_up` (default: on a GPU, where kernels compile) runs `Engine.warm_up` before serving; /health
    answers 503 "starting" until it is done."""
    names = (model_names,) if isinstance(model_names, str) else tuple(model_names)
    app = FastAPI(title="ringlinear", lifespan=_lifespan)
    warm_up = engine.device.type == "cuda" if warm_up is None else warm_up
    runner = AsyncEngine(engine, max_queued, Metrics(), warm_up)
    app.state.server = state = ServerState(runner, names, chat_template, api_key, max_request_bytes,
                                           Shutdown(runner, shutdown_timeout), PromptTokenizer(engine))
    app.add_middleware(Gate, state=state)
    add_error_handlers(app)
    app.include_router(public)
    app.include_router(v1)
    return app


def served_model_names(model: str | Path, served_model_name: Sequence[str] | None = None) -> tuple[str, ...]:
    """As vLLM: the names of `served_model_name` if given, else `model` as given (runs/tiny/checkpoint);
    its folder's own name (checkpoint) is accepted too, not that of a folder a symlink points to."""
    if served_model_name:
        return tuple(dict.fromkeys(served_model_name))
    return tuple(dict.fromkeys(name for name in (str(model), Path(os.path.abspath(model)).name) if name))


def load_app(model: str | Path, api_key: str | None = None, served_model_name: Sequence[str] | None = None,
             max_queued: int = MAX_QUEUED, max_request_bytes: int = MAX_REQUEST_BYTES,
             shutdown_timeout: float = SHUTDOWN_TIMEOUT, device: str | None = None, **engine_config) -> FastAPI:
    """The app of a checkpoint directory (its chat template, if it has one, from tokenizer_config.json)."""
    engine = Engine.from_pretrained(model, device=device, **engine_config)
    return create_app(engine, served_model_names(model, served_model_name), ChatTemplate.from_directory(model),
                      api_key, max_queued, max_request_bytes, shutdown_timeout)


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_model_name: Sequence[str] | None = None, max_queued: int = MAX_QUEUED,
          max_request_bytes: int = MAX_REQUEST_BYTES, shutdown_timeout: float = SHUTDOWN_TIMEOUT,
          device: str | None = None, **engine_config) -> None:
    """Load a checkpoint directory and serve it until SIGTERM or SIGINT (see `shutdown`)."""
    app = load_app(model, api_key, served_model_name, max_queued, max_request_bytes, shutdown_timeout, device,
                   **engine_config)
    server(app, host=host, port=port, log_level="info").run()
