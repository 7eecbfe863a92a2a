"""`score`: influence of stored examples on a dense query, without updating anything.

    scores[e] = sum over e's rows r of <row_r, Q[token_r]>

The torch reference here is the specification the Triton path is tested against, and
the production path wherever there is no GPU.
"""

import torch

from .backend import resolve_backend
from .checks import SparseRows, check_matrix, check_sparse_rows

# Elements per float32 temporary in the reference's row chunks. On CUDA (caching allocator)
# 64 MiB chunks keep the Python loop short; on CPU, chunks of a few MiB are ~2x faster than
# large ones, which the system allocator hands back as fresh pages on every call.
REFERENCE_CHUNK_ELEMENTS = {"cuda": 1 << 24, "cpu": 1 << 20}


def reference_chunk_rows(D: int, device: torch.device) -> int:
    elements = REFERENCE_CHUNK_ELEMENTS.get(device.type, REFERENCE_CHUNK_ELEMENTS["cpu"])
    return max(1, elements // max(D, 1))


def dequantised(batch: SparseRows, lo: int, hi: int) -> torch.Tensor:
    """Rows lo:hi as float32 [hi - lo, D] (int8 rows times their scale)."""
    x = batch.rows[lo:hi].to(torch.float32)
    if batch.scales is not None:
        x = x * batch.scales[lo:hi, None]
    return x


def row_examples(offsets: torch.Tensor, R: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Example index of every row: [R] of `dtype` (output_size avoids a device sync)."""
    n = offsets.numel() - 1
    counts = offsets[1:] - offsets[:-1]
    examples = torch.arange(n, dtype=dtype, device=offsets.device)
    return torch.repeat_interleave(examples, counts, output_size=R)


def row_dots(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """<x[r], q[r]> for every row, float32 [rows], without a [rows, D] product temporary."""
    return torch.bmm(x.unsqueeze(1), q.unsqueeze(2)).flatten()


@torch.no_grad()
def score_reference(Q: torch.Tensor, batch: SparseRows) -> torch.Tensor:
    """Reference `score` on validated inputs: float32 [n], accumulated in float32.

    Chunked over rows, so memory stays bounded by a few [chunk, D] float32 temporaries.
    """
    scores = torch.zeros(batch.n, dtype=torch.float32, device=Q.device)
    example = row_examples(batch.offsets, batch.R)
    step = reference_chunk_rows(batch.D, Q.device)
    for lo in range(0, batch.R, step):
        hi = min(lo + step, batch.R)
        x = dequantised(batch, lo, hi)
        q = Q[batch.token_ids[lo:hi]].to(torch.float32)
        scores.index_add_(0, example[lo:hi], row_dots(x, q))
    return scores


@torch.no_grad()
def score(Q, offsets, token_ids, rows, *, scales=None, backend: str = "auto") -> torch.Tensor:
    """Influence scores of a CSR batch of stored rows against a dense matrix Q.

    Q:         [V, D] any floating dtype (read as float32).
    offsets:   int32/int64 [n + 1], offsets[0] == 0, non-decreasing, offsets[-1] == R.
    token_ids: int32/int64 [R], each in [0, V).
    rows:      float32/bfloat16/float16/int8 [R, D]; `scales` float32 [R] iff int8.
    Returns float32 [n]; an example with no rows scores 0.
    """
    Q = check_matrix("Q", Q)
    batch, _ = check_sparse_rows(
        offsets, token_ids, rows, scales, vocab_size=Q.shape[0], dim=Q.shape[1], device=Q.device
    )
    if resolve_backend(backend, Q.device) == "triton":
        from .scoring_triton import score_triton

        return score_triton(Q, batch)
    return score_reference(Q, batch)
