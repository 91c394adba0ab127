"""What the endpoints of one app share (its engine thread, served names, chat template, key, body
limit and shutdown), kept on `app.state.server` and handed to them by the `State` dependency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from ..async_engine import AsyncEngine
from ..chat import ChatTemplate
from ..engine import Engine
from .errors import APIError
from .shutdown import Shutdown
from .tokens import PromptTokenizer


@dataclass(frozen=True)
class ServerState:
    runner: AsyncEngine
    model_names: tuple[str, ...]  # the names requests may use; /v1/models and responses give the first
    chat_template: ChatTemplate | None
    api_key: str | None
    max_request_bytes: int
    shutdown: Shutdown
    tokenize: PromptTokenizer

    @property
    def engine(self) -> Engine:
        return self.runner.engine

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    def check_model(self, name: str) -> None:
        if name not in self.model_names:
            served = " or ".join(map(repr, self.model_names))
            raise APIError(404, f"the model {name!r} does not exist; this server has {served}", "model",
                           code="model_not_found")


def _server_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(_server_state)]
