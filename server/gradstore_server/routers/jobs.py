"""`GET /v1/jobs/{job_id}`: the state of a forget job (journaled in the store: it survives restarts)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path

from ..jobs import JobManager
from ..schemas import Job
from . import errors, get_jobs

router = APIRouter(tags=["jobs"])


@router.get("/jobs/{job_id}", response_model=Job, responses=errors(401, 404, 422, 500, 503), summary="A forget job")
def get_job(job_id: str = Path(description="the job_id returned by POST /v1/forget"),
            jobs: JobManager = Depends(get_jobs)) -> dict[str, Any]:
    return jobs.get(job_id)
