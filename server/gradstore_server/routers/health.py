"""`GET /healthz`: liveness, without authentication (and without revealing anything)."""

from __future__ import annotations

from fastapi import APIRouter

from ..schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness probe (no API key needed)")
async def healthz() -> dict[str, str]:
    # Answered on the event loop with no I/O: if this is slow, the loop is blocked (the tests check it).
    return {"status": "ok"}
