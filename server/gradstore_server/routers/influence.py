"""`POST /v1/influence`: which stored examples influenced a text (or a stored example) the most."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends

from ..engine import Engine
from ..schemas import InfluenceBody, InfluenceById, InfluenceResult
from . import errors, get_engine

router = APIRouter(tags=["influence"])


@router.post("/influence", response_model=InfluenceResult, responses=errors(401, 404, 409, 413, 415, 422, 500, 503),
             summary="Top-k influential training examples of a text or a stored example")
def influence(body: Annotated[InfluenceBody, Body()],
              engine: Engine = Depends(get_engine)) -> dict[str, Any]:
    """Scores are dot products of embedding-row gradients: the query's (a text's on the current model, or a
    stored example's first-epoch rows) with each stored example's. The query example itself is left out."""
    if isinstance(body, InfluenceById):
        pairs = engine.influence_by_id(body.id, body.k)
        query = {"kind": "id", "id": body.id, "n_tokens": None}
    else:
        n_tokens, pairs = engine.influence_by_text(body.text, body.k)
        query = {"kind": "text", "id": None, "n_tokens": n_tokens}
    return {"query": query, "k": body.k, "results": [{"id": i, "score": s} for i, s in pairs]}
