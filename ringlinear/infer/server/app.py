"""The app factory (one engine thread, its metrics, the error handlers and the endpoints per app),
the names a checkpoint is served under, and `serve`, which loads one and runs its app under uvicorn."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from ..async_engine import MAX_QUEUED, AsyncEngine
from ..chat import ChatTemplate
from ..engine import Engine
from ..metrics import Metrics
from .errors import add_error_handlers
from .routes import public, v1
from .state import ServerState


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    runner = app.state.server.runner
    runner.start()  # on the server's event loop, which receives the engine's outputs
    yield
    runner.stop()


def create_app(engine: Engine, model_names: str | Sequence[str], chat_template: ChatTemplate | None = None,
               api_key: str | None = None, max_queued: int = MAX_QUEUED) -> FastAPI:
    """`model_names`: the name requests must give, or several; /v1/models and responses give the first."""
    names = (model_names,) if isinstance(model_names, str) else tuple(model_names)
    app = FastAPI(title="ringlinear", lifespan=_lifespan)
    app.state.server = ServerState(AsyncEngine(engine, max_queued, Metrics()), names, chat_template, api_key)
    add_error_handlers(app)
    app.include_router(public)
    app.include_router(v1)
    return app


def served_model_names(model: str | Path, served_model_name: str | None = None) -> tuple[str, ...]:
    """As vLLM: `served_model_name` if given, else `model` as given (runs/tiny/checkpoint); its
    folder's own name (checkpoint) is accepted too, not that of a folder a symlink points to."""
    if served_model_name:
        return (served_model_name,)
    return tuple(dict.fromkeys(name for name in (str(model), Path(os.path.abspath(model)).name) if name))


def load_app(model: str | Path, api_key: str | None = None, served_model_name: str | None = None,
             max_queued: int = MAX_QUEUED, device: str | None = None, **engine_config) -> FastAPI:
    """The app of a checkpoint directory (its chat template, if it has one, from tokenizer_config.json)."""
    engine = Engine.from_pretrained(model, device=device, **engine_config)
    return create_app(engine, served_model_names(model, served_model_name), ChatTemplate.from_directory(model),
                      api_key, max_queued)


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_model_name: str | None = None, max_queued: int = MAX_QUEUED, device: str | None = None,
          **engine_config) -> None:
    """Load a checkpoint directory and serve it until interrupted."""
    import uvicorn

    app = load_app(model, api_key, served_model_name, max_queued, device, **engine_config)
    uvicorn.run(app, host=host, port=port, log_level="info")
