"""Triton path of `score`, and the per-example segment sum shared with `ascent_score`.

Scores are reduced in two fixed-order steps so they are bitwise reproducible without
atomics: each program writes one partial dot per (row, D-chunk) into a float32
[n_chunks, R] buffer, then one program per example sums its rows' partials in order.
The buffer is 4 * n_chunks bytes per row, ~1% of a bf16 row of D = 768.
"""

import os

import torch
import triton
import triton.language as tl

from .checks import SparseRows

# triton.jit reads TRITON_INTERPRET when the kernels below are decorated (this import).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Columns per program. 256 divides the common D (768, 1024, 4096) without masked lanes,
# and keeps a [16, 256] fp32 tile at 32 registers per thread with 4 warps.
MAX_BLOCK_D = 256
BLOCK_R = 16
SEGMENT_BLOCK = 256


def block_d_for(D: int) -> int:
    """The D-chunk width for a row dimension D (read at launch time, so tests can shrink it)."""
    return min(MAX_BLOCK_D, triton.next_power_of_2(max(D, 1)))


@triton.jit
def _row_dot_kernel(
    rows_ptr, scales_ptr, tok_ptr, q_ptr, part_ptr,
    R, D, n_chunks,
    stride_xr, stride_xd, stride_qv, stride_qd,
    HAS_SCALES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program: BLOCK_R consecutive rows x one D-chunk. Chunk is the fastest-varying
    # program id, so the chunks of a row are read by neighbouring programs at the same time.
    pid = tl.program_id(0)
    tile = pid // n_chunks
    chunk = pid % n_chunks
    r = tile.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < R
    cols = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = cols < D
    mask = rmask[:, None] & dmask[None, :]

    # int64 offsets: V * D and R * D can pass 2**31 for large vocabularies / batches.
    tok = tl.load(tok_ptr + r, mask=rmask, other=0).to(tl.int64)
    x = tl.load(rows_ptr + r[:, None] * stride_xr + cols[None, :] * stride_xd, mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_SCALES:  # int8 rows: dequantise here rather than materialise a float copy
        x = x * tl.load(scales_ptr + r, mask=rmask, other=0.0)[:, None]
    q = tl.load(q_ptr + tok[:, None] * stride_qv + cols[None, :] * stride_qd, mask=mask, other=0.0)
    dots = tl.sum(x * q.to(tl.float32), axis=1)
    tl.store(part_ptr + chunk.to(tl.int64) * R + r, dots, mask=rmask)


@triton.jit
def _segment_sum_kernel(part_ptr, offsets_ptr, out_ptr, R, n_chunks, BLOCK: tl.constexpr):
    # scores[e] = sum of part[c, r] over chunks c and e's rows r, always in the same order.
    e = tl.program_id(0)
    lo = tl.load(offsets_ptr + e)
    hi = tl.load(offsets_ptr + e + 1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(lo, hi, BLOCK):
        r = start + tl.arange(0, BLOCK)
        m = r < hi
        p = part_ptr + r
        for _ in range(0, n_chunks):
            acc += tl.load(p, mask=m, other=0.0)
            p += R  # pointer arithmetic is 64-bit: no overflow for n_chunks * R > 2**31
    tl.store(out_ptr + e, tl.sum(acc, axis=0))


def segment_sum(part: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-example fixed-order sums of float32 partials [n_chunks, R] -> float32 [n]."""
    n = offsets.numel() - 1
    out = torch.empty(n, dtype=torch.float32, device=part.device)
    if n:
        _segment_sum_kernel[(n,)](part, offsets, out, part.shape[1], part.shape[0], BLOCK=SEGMENT_BLOCK)
    return out


def score_triton(Q: torch.Tensor, batch: SparseRows) -> torch.Tensor:
    """Triton `score` on validated inputs: Q [V, D] any float dtype -> float32 [n]."""
    R, D = batch.R, batch.D
    if R == 0:
        return torch.zeros(batch.n, dtype=torch.float32, device=Q.device)
    block_d = block_d_for(D)
    n_chunks = triton.cdiv(D, block_d)
    part = torch.empty((n_chunks, R), dtype=torch.float32, device=Q.device)
    rows = batch.rows
    scales = batch.scales if batch.scales is not None else part  # unread dummy when HAS_SCALES=False
    grid = (triton.cdiv(R, BLOCK_R) * n_chunks,)
    _row_dot_kernel[grid](
        rows, scales, batch.token_ids, Q, part,
        R, D, n_chunks,
        rows.stride(0), rows.stride(1), Q.stride(0), Q.stride(1),
        HAS_SCALES=batch.scales is not None, BLOCK_R=BLOCK_R, BLOCK_D=block_d,
    )
    return segment_sum(part, batch.offsets)
