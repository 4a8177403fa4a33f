"""The API key (``imgclf serve --api-key``): a dependency of the ``/v1`` routes when a key is set.

The key is accepted as ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``;
both schemes appear in the OpenAPI document, so ``/docs`` can send it.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from imgclf.serve.handlers import HTTPError
from imgclf.serve.schemas import ErrorResponse
from imgclf.serve.state import ServeState, get_state

key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the key given to imgclf serve")
bearer = HTTPBearer(auto_error=False, description="the key given to imgclf serve, as a bearer token")

#: The answer documented for every route under the key.
UNAUTHORIZED = {401: {"model": ErrorResponse, "description": "missing or wrong API key"}}


async def require_key(
    state: Annotated[ServeState, Depends(get_state)],
    key: Annotated[str | None, Security(key_header)] = None,
    auth: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)] = None,
) -> None:
    """Refuse the request with 401 unless it carries the server's key (compared in constant time)."""
    given = key or (auth.credentials if auth else "")
    if not secrets.compare_digest(given.encode(), (state.api_key or "").encode()):
        raise HTTPError(401, "missing or wrong API key: send it in the X-API-Key header"
                             if not given else "wrong API key", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
