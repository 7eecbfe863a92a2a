"""`POST /v1/forget`: ask for examples (by ID, or every example matching a text) to be forgotten.

Answers 202 with a new job (poll `GET /v1/jobs/{job_id}`), or 200 with the original job when the
`request_id` was seen before. Checked before a job is created: unknown IDs (404, naming them), a request
whose IDs were *all* erased already (409; a mix forgets the live ones and counts the others in
`result.n_already_forgotten`), a text that matches nothing (404), a `request_id` used before for a
different request, here or by `gradstore forget --request-id` for other IDs (409 `request_id_conflict`).
A request id may be repeated for the same IDs in any order. A dry run is answered at once (200): its job is
already completed, its response lists the IDs that would be forgotten, and it is not kept (a preview changes
nothing, so nothing of it is written to the store); it claims no request id, so the request it previews can then
be sent under that id.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Response

from ..jobs import JobManager
from ..schemas import ForgetBody, Job
from . import errors, get_jobs

router = APIRouter(tags=["forget"])


@router.post("/forget", status_code=202, response_model=Job,
             responses={200: {"model": Job, "description": "a repeated request_id: the original job; or a dry "
                                                            "run's answer (completed, not kept)"},
                        **errors(401, 404, 409, 413, 415, 422, 500, 503)},
             summary="Forget examples (asynchronous job)")
def forget(body: Annotated[ForgetBody, Body()], response: Response,
           jobs: JobManager = Depends(get_jobs)) -> dict[str, Any]:
    job, created = jobs.submit(body)
    if not created:
        response.status_code = 200
    if not job["dry_run"]:
        response.headers["Location"] = f"/v1/jobs/{job['job_id']}"
    return job
