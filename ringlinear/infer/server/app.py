"""The app factory (one engine thread, its metrics, the error handlers and the endpoints per app)
and `serve`, which loads a checkpoint and runs its app under uvicorn."""

from __future__ import annotations

from collections.abc import AsyncIterator
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


def create_app(engine: Engine, model_name: str, chat_template: ChatTemplate | None = None,
               api_key: str | None = None, max_queued: int = MAX_QUEUED) -> FastAPI:
    app = FastAPI(title="ringlinear", lifespan=_lifespan)
    app.state.server = ServerState(AsyncEngine(engine, max_queued, Metrics()), model_name, chat_template, api_key)
    add_error_handlers(app)
    app.include_router(public)
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
