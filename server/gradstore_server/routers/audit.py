"""`GET /v1/audit`: the store's audit log (one record per committed forget, and one per training with capture,
`"kind": "trained"`), oldest first, paged;
`GET /v1/audit/chain`: its model hashes followed to the weights served."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from ..engine import Engine
from ..schemas import AuditChain, AuditPage, AuditQuery
from . import errors, get_engine

router = APIRouter(tags=["audit"])


@router.get("/audit", response_model=AuditPage, responses=errors(401, 422, 500, 503), summary="The audit log")
def audit(query: Annotated[AuditQuery, Query()], engine: Engine = Depends(get_engine)) -> dict[str, Any]:
    """The log is append-only, so an offset names the same record on every call."""
    offset, limit = query.offset, query.limit
    total, items = engine.audit(offset, limit)
    end = offset + len(items)
    return {"items": items, "offset": offset, "limit": limit, "total": total,
            "next_offset": end if end < total else None}


@router.get("/audit/chain", response_model=AuditChain, responses=errors(401, 500, 503),
            summary="The audit log's hash chain")
def audit_chain(engine: Engine = Depends(get_engine)) -> dict[str, Any]:
    """Whether the weights served are the trained model changed only by audited requests."""
    return engine.audit_chain()
