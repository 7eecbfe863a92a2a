"""`topk_influence`: stream stored examples past one query and keep the k most influential.

Only the running top k (scores on the query's device, ids in a list) is kept between
batches, so the store never has to fit in memory. Each batch is moved to the query's
device, scored with `score`, and merged with a stable descending sort: equal scores keep
scan order, so ties go to the example seen first and results do not depend on batch size.
"""

from collections.abc import Iterable
from typing import NamedTuple

import torch

from .checks import check_matrix, check_sparse_rows
from .errors import KernelInputError
from .scoring import score


class TopK(NamedTuple):
    """The k' = min(k, examples scanned) highest scores, descending, and their example ids."""

    scores: torch.Tensor  # float32 [k']
    ids: list


def _dense_query(query, vocab_size: int | None) -> tuple[torch.Tensor, int | None]:
    """Return (the query as a dense float32 [V, D] matrix, sink): batch ids are clamped to sink if not None.

    A sparse query `(token_ids [k], rows [k, D])` or `(token_ids, rows, scales)` is summed
    into float32 [V, D] once. Without `vocab_size`, V = max query token + 2: the last row
    stays zero, and batch tokens above the query's are clamped onto it (they score 0), so
    the dense query costs memory in proportion to the query's largest token id, not the
    vocabulary -- but then batch token ids are only checked to be >= 0.
    """
    if isinstance(query, torch.Tensor):
        return check_matrix("query", query), None
    if not isinstance(query, (tuple, list)) or len(query) not in (2, 3):
        raise KernelInputError(
            "query must be a dense [V, D] tensor or a tuple (token_ids, rows) / (token_ids, rows, scales)"
        )
    token_ids, rows = query[0], query[1]
    scales = query[2] if len(query) == 3 else None
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2:
        raise KernelInputError("a sparse query's rows must be a 2-D [k, D] tensor")
    sink = None
    if vocab_size is None:
        top = int(token_ids.max()) if isinstance(token_ids, torch.Tensor) and token_ids.numel() else -1
        vocab_size = top + 2
        sink = top + 1
    if rows.dtype == torch.float64:
        rows = rows.to(torch.float32)  # the query is densified into float32 anyway, as a dense one is
    k = rows.shape[0]
    offsets = torch.tensor([0, k], device=rows.device)
    try:
        q, _ = check_sparse_rows(
            offsets, token_ids, rows, scales, vocab_size=vocab_size, dim=rows.shape[1], device=rows.device
        )
    except KernelInputError as err:  # the checks name a stored batch's parts; this is the query's
        raise type(err)(f"the sparse query: {err}") from None
    x = q.rows.to(torch.float64)
    if q.scales is not None:
        x = x * q.scales[:, None]
    # Repeated tokens are summed in float64 over the touched rows only, then rounded once;
    # index_put_(accumulate=True) sorts indices on CUDA, so the result is reproducible.
    touched, slot = torch.unique(q.token_ids, return_inverse=True)
    summed = torch.zeros((touched.numel(), q.D), dtype=torch.float64, device=rows.device)
    summed.index_put_((slot,), x, accumulate=True)
    dense = torch.zeros((vocab_size, q.D), dtype=torch.float32, device=rows.device)
    dense[touched] = summed.to(torch.float32)
    return dense, sink


def _unpack(batch):
    """(ids, offsets, token_ids, rows, scales) of a store Batch or a 4-/5-tuple."""
    if isinstance(batch, (tuple, list)):
        if len(batch) == 4:
            return (*batch, None)
        if len(batch) == 5:
            return tuple(batch)
        raise KernelInputError(f"a batch tuple must have 4 or 5 items, got {len(batch)}")
    try:
        return batch.ids, batch.offsets, batch.token_ids, batch.rows, getattr(batch, "scales", None)
    except AttributeError as exc:
        raise KernelInputError(
            f"a batch must have ids, offsets, token_ids and rows (got {type(batch).__name__})"
        ) from exc


def _to(x, device: torch.device):
    return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x


@torch.no_grad()
def topk_influence(
    query,
    batches: Iterable,
    k: int,
    *,
    vocab_size: int | None = None,
    backend: str = "auto",
) -> TopK:
    """The k stored examples with the highest dot product with `query`.

    query:   dense [V, D] float tensor, or a sparse query (token_ids [k], rows [k, D]) or
             (token_ids, rows, scales) for int8 rows, densified once into float32.
    batches: iterable of store Batches (attributes ids, offsets, token_ids, rows, optional
             scales) or tuples (ids, offsets, token_ids, rows[, scales]); each is moved to
             the query's device when it is scored.
    k:       >= 0; k = 0 returns an empty result without reading any batch.
    vocab_size: for a sparse query, the vocabulary size to check batch token ids against;
             if None, V is inferred from the query (see `_dense_query`).
    Returns TopK(scores float32 [k'] descending, ids list); ties keep scan order.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise KernelInputError(f"k must be a non-negative int, got {k!r}")
    Q, sink = _dense_query(query, vocab_size)
    device = Q.device
    best_scores = torch.empty(0, dtype=torch.float32, device=device)
    best_ids: list = []
    if k == 0:
        return TopK(best_scores, best_ids)
    for batch in batches:
        ids, offsets, token_ids, rows, scales = _unpack(batch)
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        token_ids = _to(token_ids, device)
        if sink is not None and isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.clamp(max=sink)
        scores = score(
            Q, _to(offsets, device), token_ids, _to(rows, device), scales=_to(scales, device), backend=backend
        )
        if len(ids) != scores.numel():
            raise KernelInputError(f"a batch has {len(ids)} ids but its offsets describe {scores.numel()} examples")
        pool = torch.cat([best_scores, scores])
        # The kept entries precede the new batch in `pool` and in scan order, so a stable
        # sort breaks ties by scan order.
        keep = torch.sort(pool, descending=True, stable=True).indices[:k]
        # A NaN would sort above every score and push real results out: corrupt rows (or a non-finite query)
        # are an error, named by the first example they hit. The flag rides on the sync the ranking needs.
        fetched = torch.cat([keep, (~torch.isfinite(scores)).any().to(keep.dtype).reshape(1)]).tolist()
        if fetched[-1]:
            bad = int(torch.nonzero(~torch.isfinite(scores))[0])
            raise KernelInputError(f"example {ids[bad]!r} scores {float(scores[bad])}: its rows or the query "
                                   "are not finite")
        merged_ids = best_ids + ids
        best_ids = [merged_ids[i] for i in fetched[:-1]]
        best_scores = pool[keep]
    return TopK(best_scores, best_ids)
