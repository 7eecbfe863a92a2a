"""Request bodies: JSON only (415), and a size limit (413), both enforced before anything parses the body.

Pure ASGI middlewares. A declared Content-Length over the limit is refused without reading; otherwise the
body is read up to the limit (chunked bodies too) and replayed to the application, so no handler ever holds
more than `max_bytes` of one request.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class JsonBodiesOnly:
    """415 for a body declared as anything but JSON (`curl -d` sends a form type unless told otherwise).

    Without this, FastAPI would not parse such a body at all and answer as if the fields were missing. A
    request that declares no type is left to the JSON parser, as FastAPI does."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in BODY_METHODS:
            declared = Headers(scope=scope).get("content-type")
            media = (declared or "").split(";", 1)[0].strip().lower()
            if declared is not None and media != "application/json" and not media.endswith("+json"):
                response = error_response(415, "unsupported_media_type", "the request body must be JSON: send it "
                                          f"with Content-Type: application/json (got {media or 'an empty type'!r})")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, "body_too_large", f"request bodies are limited to {self.max_bytes} bytes",
                                  headers={"Connection": "close"})
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        for value in Headers(scope=scope).getlist("content-length"):
            try:
                declared = int(value)
            except ValueError:
                declared = 0  # the HTTP server rejects malformed lengths; count what arrives instead
            if declared > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

