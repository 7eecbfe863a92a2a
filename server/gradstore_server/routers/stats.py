"""`GET /v1/stats`: the store's counts and sizes, the served model's hash and version, the job queue."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from ..engine import Engine
from ..jobs import JobManager
from ..schemas import Stats
from . import errors, get_engine, get_jobs

router = APIRouter(tags=["stats"])


@router.get("/stats", response_model=Stats, responses=errors(401, 500, 503), summary="Store and model statistics")
def stats(engine: Engine = Depends(get_engine), jobs: JobManager = Depends(get_jobs)) -> dict[str, Any]:
    # A plain `def` handler: FastAPI runs it on its threadpool, so the store I/O never blocks the event loop.
    out = engine.stats()
    out["jobs"] = jobs.counts()
    out["degraded"] = engine.degraded
    return out
