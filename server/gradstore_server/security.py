"""API-key authentication: the `X-API-Key` header, checked against the configured keys in constant time."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request, Security
from fastapi.security import APIKeyHeader

from .errors import ApiError

API_KEY_HEADER = "X-API-Key"

# auto_error=False: a missing key gets our own 401 body (the ErrorResponse schema), not FastAPI's 403.
api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                              description="one of the keys in GRADSTORE_API_KEYS")


def key_digests(keys: tuple[str, ...]) -> tuple[bytes, ...]:
    return tuple(hashlib.sha256(k.encode("utf-8")).digest() for k in keys)


async def require_api_key(request: Request, key: str | None = Security(api_key_header)) -> None:
    """Dependency of every /v1 route. 401 without a valid key (async: microseconds of CPU, no thread hop)."""
    challenge = {"WWW-Authenticate": f'ApiKey header="{API_KEY_HEADER}"'}
    if not key:
        raise ApiError(401, "unauthorized", f"missing API key: send it in the {API_KEY_HEADER} header",
                       headers=challenge)
    # Comparing fixed-length digests makes the time independent of the key's length and content, and every
    # configured key is compared (no early exit), so timing reveals neither which key nor how much matched.
    given = hashlib.sha256(key.encode("utf-8", errors="surrogateescape")).digest()
    matched = False
    for digest in request.app.state.key_digests:
        matched |= hmac.compare_digest(given, digest)
    if not matched:
        raise ApiError(401, "unauthorized", "invalid API key", headers=challenge)
