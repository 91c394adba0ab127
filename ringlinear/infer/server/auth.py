"""The API key: with one set, every /v1 request must carry `Authorization: Bearer KEY`."""

from __future__ import annotations

import secrets

from fastapi import Request

from .errors import APIError
from .state import State


async def check_key(request: Request, state: State) -> None:
    if state.api_key is None:
        return
    given = request.headers.get("authorization", "").encode()
    # constant time: how long a wrong key takes must not tell how much of it was right
    if not secrets.compare_digest(given, f"Bearer {state.api_key}".encode()):
        raise APIError(401, "a valid API key is required (Authorization: Bearer KEY)", None,
                       "authentication_error", "invalid_api_key")
