"""One error shape for every non-2xx response, and the mapping from library exceptions to HTTP statuses.

Every error body is `{"code": ..., "message": ..., "ids": [...] | null, "details": [...] | null}` (the
`ErrorResponse` schema), whether FastAPI, Starlette, the store or the engine raised it, so that clients and the
schema fuzzer see one documented shape.

    gradstore.ErasedError                      409 erased          (the ID existed and was erased)
    gradstore.UnknownIdError                   404 unknown_id      (names every unknown ID of the request)
    gradstore.InvalidInputError / ForgetError  422 invalid_input
    gradstore.StoreLockedError                 503 store_busy
    any other GradStoreError                   500 store_error
    request validation (pydantic)              422 invalid_request (field locations and messages, no input echo)
    an undecodable body                        422 invalid_request
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gradstore import ErasedError, GradStoreError, InvalidInputError, StoreLockedError, UnknownIdError

log = logging.getLogger("gradstore_server")

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               406: "not_acceptable", 413: "body_too_large", 415: "unsupported_media_type",
               422: "invalid_request", 429: "too_many_requests", 503: "unavailable"}


class ApiError(Exception):
    """An error the server answers on purpose: status, a stable machine-readable code and a message."""

    def __init__(self, status: int, code: str, message: str, *, ids: list[Any] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.ids = ids
        self.headers = headers


def error_body(code: str, message: str, *, ids: list[Any] | None = None,
               details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "ids": ids, "details": details}


def error_response(status: int, code: str, message: str, *, ids: list[Any] | None = None,
                   details: list[dict[str, Any]] | None = None, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    return JSONResponse(error_body(code, message, ids=ids, details=details), status_code=status, headers=headers)


def library_error(err: Exception) -> ApiError | None:
    """The HTTP form of a library exception, or None if it is not one the server maps."""
    if isinstance(err, ErasedError):
        return ApiError(409, "erased", str(err), ids=[err.example_id])
    if isinstance(err, UnknownIdError):
        return ApiError(404, "unknown_id", str(err), ids=err.ids)
    if isinstance(err, InvalidInputError):
        return ApiError(422, "invalid_input", str(err))
    if isinstance(err, StoreLockedError):
        return ApiError(503, "store_busy", str(err), headers={"Retry-After": "5"})
    return None


def _loc(item: Any) -> Any:
    return item if isinstance(item, (str, int)) else str(item)


def _validation_details(errors: Any) -> list[dict[str, Any]]:
    # Only where and what: the offending input may be personal data (a text to forget) or not JSON at all.
    details = []
    for e in list(errors)[:20]:
        details.append({"loc": [_loc(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")),
                        "type": str(e.get("type", ""))})
    return details


def _route(request: Request) -> str:
    """The path with its parameters as placeholders ("/v1/examples/{example_id}"): paths name example IDs, and
    an erased ID must not live on in the log. (Each parameter is the path's last occurrence of its value.)"""
    path = request.url.path
    for name, value in request.path_params.items():
        head, found, tail = path.rpartition(str(value))
        if found:
            path = f"{head}{{{name}}}{tail}"
    return path


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception through the one error shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, ids=exc.ids, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = _validation_details(exc.errors())
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(x) for x in first["loc"])
        return error_response(422, "invalid_request", f"{where}: {first['msg']}" if where else first["msg"],
                              details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's only 400 is a body it could not decode (bad UTF-8, nesting too deep for the JSON
            # parser): malformed input, answered like every other malformed input.
            return error_response(422, "invalid_request", "the request body is not valid JSON")
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(GradStoreError)
    async def _store(request: Request, exc: GradStoreError) -> JSONResponse:
        mapped = library_error(exc)
        if mapped is None:
            log.error("store error on %s %s: %s", request.method, _route(request), exc)
            return error_response(500, "store_error", f"the store failed: {type(exc).__name__}")
        return error_response(mapped.status, mapped.code, mapped.message, ids=mapped.ids, headers=mapped.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, _route(request))
        return error_response(500, "internal_error", "internal server error")
