"""One router per resource; `errors(...)` documents the error responses a route can give."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from ..engine import Engine
from ..jobs import JobManager
from ..schemas import ErrorResponse

_DESCRIPTIONS = {
    401: "missing or invalid API key",
    404: "unknown ID, job or route (the message names it)",
    409: "conflict: the ID was erased, the request id was used for another request, or the drift budget has no "
         "panel example left to read it",
    413: "request body over the size limit",
    415: "a body declared as something other than JSON (send Content-Type: application/json)",
    422: "malformed request: schema violation, or input the model or store cannot take",
    500: "internal error (a bug: bad input never causes one)",
    503: "temporarily unable: the store is locked, the forget queue is full, or the server is degraded",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for these error statuses (all with the ErrorResponse body)."""
    return {code: {"model": ErrorResponse, "description": _DESCRIPTIONS[code]} for code in codes}


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_jobs(request: Request) -> JobManager:
    return request.app.state.jobs
