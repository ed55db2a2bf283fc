"""The API-key guard: a FastAPI dependency that lets a request through only with the
server's key, sent as ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``.

The key is compared in constant time. Both schemes are declared as FastAPI security
schemes, so the OpenAPI spec shows them and the docs page offers to fill them in.
"""

from __future__ import annotations

import hmac
from typing import Any, Callable

from fastapi import Depends, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from featurebank.service.engine import RequestRejected

__all__ = ["key_guard"]

_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False,
                           description="the server's API key (--api-key or FEATUREBANK_API_KEY)")
_BEARER = HTTPBearer(auto_error=False, description="the server's API key as a bearer token "
                                                   "(Authorization: Bearer <key>)")


def key_guard(api_key: str | None) -> list[Any]:
    """``dependencies=`` for a route that needs ``api_key`` (an empty list where it is None:
    the route is open). A missing or wrong key answers 401 with ``WWW-Authenticate``."""
    if api_key is None:
        return []
    return [Depends(_require(api_key))]


def _require(api_key: str) -> Callable[..., None]:
    expected = api_key.encode()

    async def require_key(key: str | None = Security(_KEY_HEADER),
                          token: HTTPAuthorizationCredentials | None = Security(_BEARER)) -> None:
        offered = [k for k in (key, token and token.credentials) if k is not None]
        if not any(hmac.compare_digest(k.encode(), expected) for k in offered):
            raise RequestRejected(
                401, "wrong API key (header X-API-Key or Authorization: Bearer)" if offered
                else "missing API key: send header X-API-Key: <key> or Authorization: Bearer <key>",
                {"WWW-Authenticate": "ApiKey, Bearer"})

    return require_key
