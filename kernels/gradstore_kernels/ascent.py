"""`ascent_score`: one step of gradient ascent on stored sparse rows, scoring as it goes.

For every row r of example e (token t = token_ids[r]):

    W[t]     += lr[e] * row_r                  (in place; summed in float32, W rounded once)
    scores[e] += <row_r, Q[t]>                 (Q as it was before any update; Q may be W)

The torch reference here is the specification the Triton kernels are tested against,
and the production path wherever there is no GPU.
"""

import torch

from .backend import resolve_backend
from .checks import WEIGHT_DTYPES, SparseRows, check_matrix, check_sparse_rows
from .errors import KernelInputError
from .scoring import dequantised, reference_chunk_rows, row_dots, row_examples


@torch.no_grad()
def ascent_score_reference(
    W: torch.Tensor, Q: torch.Tensor | None, batch: SparseRows, lr: torch.Tensor
) -> torch.Tensor:
    """Reference `ascent_score` on validated inputs; returns float32 [n].

    Updates are summed per touched token in a float32 [unique tokens, D] buffer and added to
    W once at the end, so W is rounded once (bf16 accumulation of colliding updates loses
    ~60x more) and every read of Q -- even when Q is W -- sees W before the update. Chunked
    over rows: memory is that buffer plus a few [chunk, D] float32 temporaries. On CUDA,
    index_add_ uses atomics, so the reference is bitwise reproducible on CPU only.
    """
    Q = W if Q is None else Q
    scores = torch.zeros(batch.n, dtype=torch.float32, device=W.device)
    if batch.R == 0:
        return scores
    touched, slot = torch.unique(batch.token_ids, return_inverse=True)
    delta = torch.zeros((touched.numel(), batch.D), dtype=torch.float32, device=W.device)
    example = row_examples(batch.offsets, batch.R)
    step_of_row = lr[example]
    chunk = reference_chunk_rows(batch.D, W.device)
    for lo in range(0, batch.R, chunk):
        hi = min(lo + chunk, batch.R)
        x = dequantised(batch, lo, hi)
        q = Q[batch.token_ids[lo:hi]].to(torch.float32)  # a fresh gather: reused below
        scores.index_add_(0, example[lo:hi], row_dots(x, q))
        update = torch.mul(x, step_of_row[lo:hi, None], out=q)
        delta.index_add_(0, slot[lo:hi], update)
    if W.dtype == torch.float32:
        W.index_add_(0, touched, delta)  # touched is unique: one add per row, no collisions
    else:
        W[touched] = (W[touched].to(torch.float32) + delta).to(W.dtype)
    return scores


@torch.no_grad()
def ascent_score(
    W,
    offsets,
    token_ids,
    rows,
    lr,
    Q=None,
    *,
    scales=None,
    backend: str = "auto",
    deterministic: bool = True,
) -> torch.Tensor:
    """Gradient ascent on W with a CSR batch of stored rows, returning influence scores.

    W:         [V, D] float32/bfloat16/float16, updated in place (any strides).
    offsets:   int32/int64 [n + 1], offsets[0] == 0, non-decreasing, offsets[-1] == R.
    token_ids: int32/int64 [R], each in [0, V).
    rows:      float32/bfloat16/float16/int8 [R, D]; `scales` float32 [R] iff int8.
    lr:        float32 [n] (per example), or a Python float for every example; finite.
    Q:         [V, D] any float dtype, or None for W itself as it was before the update.
    backend:   "auto" (Triton on CUDA, else the reference), "triton" or "reference".
    deterministic: Triton only. True (default): bitwise reproducible (sort and segment);
               False: float32 atomics, no sort, results vary in the last bits.
    Returns float32 [n]: scores[e] = sum over e's rows of <row, Q[token]>; 0 for empty examples.
    """
    W = check_matrix("W", W, dtypes=WEIGHT_DTYPES)
    if Q is not None:
        Q = check_matrix("Q", Q)
        if Q.shape != W.shape:
            raise KernelInputError(f"Q has shape {tuple(Q.shape)} but W has shape {tuple(W.shape)}")
        if Q.device != W.device:
            raise KernelInputError(f"Q is on {Q.device} but W is on {W.device}")
    batch, lr = check_sparse_rows(
        offsets, token_ids, rows, scales, vocab_size=W.shape[0], dim=W.shape[1], device=W.device, lr=lr
    )
    if resolve_backend(backend, W.device) == "triton":
        from .ascent_triton import ascent_score_triton

        return ascent_score_triton(W, Q, batch, lr, deterministic=deterministic)
    return ascent_score_reference(W, Q, batch, lr)
