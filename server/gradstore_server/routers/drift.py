"""`GET /v1/drift`: the store's drift budget (how far all forget requests together may move the retained examples'
loss), read on the weights served. It is set from the command line (`gradstore drift --set`); every forget honours it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from ..engine import Engine
from ..schemas import DriftStatus
from . import errors, get_engine

router = APIRouter(tags=["drift"])


@router.get("/drift", response_model=DriftStatus, responses=errors(401, 409, 500, 503), summary="The drift budget")
def drift(engine: Engine = Depends(get_engine)) -> dict[str, Any]:
    """One forward pass over the budget's panel on the weights served. 409 `drift_unmeasurable` when every panel
    example has been forgotten: set the budget again."""
    return {"drift": engine.drift()}
