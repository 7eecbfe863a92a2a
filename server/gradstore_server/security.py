"""API-key authentication: the `X-API-Key` header, checked against the configured keys in constant time.

The check is an ASGI middleware, not a route dependency: FastAPI reads and parses a route's body before it
runs the route's dependencies, so a dependency would answer a keyless request with a malformed body 422 (and
read its body) instead of 401. The routers still declare `api_key_header`, which puts the scheme in the
OpenAPI schema.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi.security import APIKeyHeader
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response

API_KEY_HEADER = "X-API-Key"
PROTECTED_PREFIX = "/v1"

# auto_error=False: the middleware has answered a request without a valid key before any route sees it.
api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                              description="one of the keys in GRADSTORE_API_KEYS")


def key_digests(keys: tuple[str, ...]) -> tuple[bytes, ...]:
    return tuple(hashlib.sha256(k.encode("utf-8")).digest() for k in keys)


def key_problem(key: str | None, digests: tuple[bytes, ...]) -> str | None:
    """Why `key` is refused, or None if it is one of the configured keys."""
    if not key:
        return f"missing API key: send it in the {API_KEY_HEADER} header"
    # Comparing fixed-length digests makes the time independent of the key's length and content, and every
    # configured key is compared (no early exit), so timing reveals neither which key nor how much matched.
    given = hashlib.sha256(key.encode("utf-8", errors="surrogateescape")).digest()
    matched = False
    for digest in digests:
        matched |= hmac.compare_digest(given, digest)
    return None if matched else "invalid API key"


def protected(scope: Scope) -> bool:
    """Whether the request goes to a /v1 route. Routing matches the path without the application's root path
    (the prefix it is mounted or proxied under), so the check must too: "/api/v1/stats" under root path "/api"
    is a /v1 route."""
    path, root = scope.get("path", ""), scope.get("root_path", "").rstrip("/")
    if root and (path == root or path.startswith(root + "/")):  # only at a segment boundary, as routing strips it
        path = path[len(root):]
    return scope["type"] == "http" and (path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/"))


class ApiKeyAuth:
    """401 (with a `WWW-Authenticate` challenge) for every /v1 request without a valid key, before anything
    reads its body."""

    def __init__(self, app: ASGIApp, digests: tuple[bytes, ...]):
        self.app = app
        self.digests = digests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if protected(scope):
            key = Headers(scope=scope).get(API_KEY_HEADER)  # case-insensitive; values decoded as latin-1
            problem = key_problem(key, self.digests)
            if problem is not None:
                response = error_response(401, "unauthorized", problem,
                                          headers={"WWW-Authenticate": f'ApiKey header="{API_KEY_HEADER}"'})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
