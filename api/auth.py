"""Access control: a bearer token (or the web UI's cookie) names the caller; every route except /health
needs one. A token sees only its owner's jobs; an admin token sees all. Unknown and foreign IDs both
answer 404, so job IDs cannot be probed."""

from __future__ import annotations

import threading
import time
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from core.db import session_scope
from core.settings import get_settings
from core.tokens import Principal, hash_token, verify_token

__all__ = ["COOKIE", "CurrentPrincipal", "current_principal", "resolve_principal"]

COOKIE = "tileseg_token"
#: The identity used when access control is switched off (TILESEG_AUTH=false, single-user setups).
ANONYMOUS = Principal(owner="local", admin=True)


def presented_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.cookies.get(COOKIE)


#: Seconds a verified token is trusted without asking the database again. Polling clients would otherwise
#: cost one token query per request; a revoked token stops working within this many seconds.
TOKEN_CACHE_SECONDS = 5.0
_cache: dict[str, tuple[float, Principal]] = {}
_cache_lock = threading.Lock()


def _cached(key: str) -> Principal | None:
    with _cache_lock:
        hit = _cache.get(key)
    return hit[1] if hit is not None and hit[0] > time.monotonic() else None


def _lookup(token: str) -> Principal | None:
    """The token's principal from the cache or the database (blocking; cached for TOKEN_CACHE_SECONDS)."""
    key = hash_token(token)
    hit = _cached(key)
    if hit is not None:
        return hit
    now = time.monotonic()
    with session_scope() as session:
        principal = verify_token(session, token)
    if principal is not None:
        with _cache_lock:
            if len(_cache) > 10_000:
                _cache.clear()
            _cache[key] = (now + TOKEN_CACHE_SECONDS, principal)
    return principal


def clear_token_cache() -> None:
    with _cache_lock:
        _cache.clear()


def _token_or_401(request: Request) -> str:
    token = presented_token(request)
    if not token:
        raise HTTPException(401, "missing API token (Authorization: Bearer <token>; create one with "
                                 "`tileseg token create`)", headers={"WWW-Authenticate": "Bearer"})
    return token


def _invalid() -> HTTPException:
    return HTTPException(401, "invalid or revoked API token", headers={"WWW-Authenticate": "Bearer"})


def resolve_principal(request: Request) -> Principal:
    """The caller (blocking; for sync code such as the web pages' dependencies). Raises 401."""
    if not get_settings().auth:
        return ANONYMOUS
    principal = _lookup(_token_or_401(request))
    if principal is None:
        raise _invalid()
    return principal


async def current_principal(request: Request) -> Principal:
    # async: a cache hit (every poll but one per token and TOKEN_CACHE_SECONDS) answers on the event loop
    # without a thread-pool hop; only a miss goes to the database in a worker thread.
    if not get_settings().auth:
        return ANONYMOUS
    token = _token_or_401(request)
    principal = _cached(hash_token(token))
    if principal is None:
        principal = await run_in_threadpool(_lookup, token)
    if principal is None:
        raise _invalid()
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
