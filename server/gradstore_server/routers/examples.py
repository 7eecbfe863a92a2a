"""`GET /v1/examples/{id}`: one stored example's metadata (and its gradient rows when asked).

How a path names an ID. IDs are integers or strings, and a URL path is text, so:

- `id_type=auto` (default): the path segment is first tried as the string ID it spells; if the store holds no
  such string and the segment is a canonical non-negative decimal (no sign, no leading zeros), the integer
  ID. So `/v1/examples/42` finds the integer 42 unless a string ID "42" exists.
- `id_type=str` / `id_type=int` force one reading (use them when both "42" and 42 exist).

The segment is percent-decoded and may contain `/` (sent as `%2F`). A segment that cannot be an ID at all (over
256 UTF-8 bytes, or not an integer under `id_type=int`) is answered like any ID the store does not hold: 404.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query

from ..engine import Engine
from ..schemas import ExampleOut, ExampleQuery
from . import errors, get_engine

router = APIRouter(tags=["examples"])


@router.get("/examples/{example_id:path}", response_model=ExampleOut, responses=errors(401, 404, 409, 422, 500, 503),
            summary="Look an example up by ID")
def get_example(
    example_id: Annotated[str, Path(description="the example ID (see id_type for integers vs strings)")],
    query: Annotated[ExampleQuery, Query()],
    engine: Engine = Depends(get_engine),
) -> dict[str, Any]:
    """Metadata of a stored example; 404 if the store does not hold it, 409 if it was erased."""
    return engine.example(example_id, query.id_type, query.rows)
