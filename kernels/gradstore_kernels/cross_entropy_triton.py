"""Triton path of `token_cross_entropy`: one program per row, one pass over the row.

Each lane of a BLOCK_V-wide vector keeps its own running (max m, sum s of exp(x - m)) over the
columns it sees, so the loop has no cross-warp reduction and needs one exp per element:

    d = x - m;  e = exp(-|d|);  s = (s * e + 1) if d > 0 else (s + e);  m = max(m, x)

and the lanes are combined once at the end. m starts at -FLT_MAX rather than -inf, so masked lanes
(loaded as -inf) and -inf logits add exp(-inf) = 0 instead of producing inf - inf = NaN.

The row is split so that the bulk is read with unmasked, 16-byte-aligned loads: GPT-2's V = 50257 is
odd, so rows start at every alignment. Per row, `head` columns reach the next 16-byte boundary, then
`n_full` whole BLOCK_V chunks are read unmasked, and the head and the tail (< BLOCK_V + VEC columns
together) go through one or two masked chunks at the end. An ignored row reads nothing but its target.
"""

import os

import torch
import triton
import triton.language as tl

# triton.jit reads TRITON_INTERPRET when the kernels below are decorated (this import).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

FLOAT32_MAX = 3.4028234663852886e38
# 4 warps x one 16-byte load per thread per chunk (bf16: BLOCK_V = 1024, fp32: 512): the fastest of
# 4/8/16 warps x 1/2/4 loads on an H200, in two runs ([8192, 50257] bf16: 0.244 ms, 80% of the copy
# bandwidth, against 0.294 ms for 8 warps x 2 loads; benchmarks/cross_entropy_throughput.py).
NUM_WARPS = 4
LOADS_PER_THREAD = 1
# Cap on BLOCK_V (a power of two >= 8): tests shrink it so tiny rows still span whole chunks.
MAX_BLOCK_V = 1 << 16


def launch_config(dtype: torch.dtype) -> tuple[int, int, int]:
    """(VEC, BLOCK_V, num_warps) for logits of `dtype`; read at launch time, so tests can shrink them.

    VEC: elements per 16-byte load (8 for 16-bit logits, 4 for float32).
    """
    vec = 16 // dtype.itemsize
    return vec, min(vec * 32 * NUM_WARPS * LOADS_PER_THREAD, MAX_BLOCK_V), NUM_WARPS


@triton.jit
def _online_update(m, s, x):
    # Fold x into each lane's (max, sum of exp(. - max)) with a single exp.
    d = x - m
    e = tl.exp(-tl.abs(d))
    s = tl.where(d > 0, s * e + 1.0, s + e)
    return tl.maximum(m, x), s


@triton.jit
def _token_ce_kernel(
    logits_ptr, targets_ptr, out_ptr,
    V, stride_row, ignore_index,
    VEC: tl.constexpr, BLOCK_V: tl.constexpr, NEG_MAX: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(targets_ptr + row).to(tl.int64)
    live = t != ignore_index
    n = tl.where(live, V, 0)  # columns this row reads: none if ignored

    row_off = row * stride_row  # int64: N * V passes 2**31 for GPT-2 batches
    row_ptr = logits_ptr + row_off
    head = tl.minimum((VEC - row_off % VEC) % VEC, n)  # columns before the first aligned one
    n_full = (n - head) // BLOCK_V
    # Aligned offset of the first whole chunk (the logits pointer is 16-byte aligned when Triton
    # specialises it so; this hint is about the offset only, and it always holds).
    body = tl.multiple_of(row_off + head, VEC)

    k = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], NEG_MAX, dtype=tl.float32)
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    for i in range(0, n_full):
        x = tl.load(logits_ptr + body + i * BLOCK_V + k).to(tl.float32)
        m, s = _online_update(m, s, x)

    # Head and tail: remainder index j < r maps to column j (head) or j + n_full * BLOCK_V (tail).
    r = n - n_full * BLOCK_V
    skip = n_full * BLOCK_V
    for j0 in range(0, r, BLOCK_V):
        j = j0 + k
        cols = j + tl.where(j >= head, skip, 0)
        x = tl.load(row_ptr + cols, mask=j < r, other=-float("inf")).to(tl.float32)
        m, s = _online_update(m, s, x)

    top = tl.max(m, axis=0)
    total = tl.sum(s * tl.exp(m - top), axis=0)
    lse = top + tl.log(tl.where(live, total, 1.0))

    in_range = (t >= 0) & (t < V)
    x_t = tl.load(row_ptr + t, mask=live & in_range, other=0.0).to(tl.float32)
    loss = tl.where(in_range, lse - x_t, float("nan"))
    tl.store(out_ptr + row, tl.where(live, loss, 0.0))


def token_cross_entropy_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
                               ) -> torch.Tensor:
    """Triton `token_cross_entropy` on validated inputs: [N, V] logits -> float32 [N]."""
    N, V = logits.shape
    out = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N == 0:
        return out
    if logits.stride(1) != 1:  # the kernel walks columns contiguously; rows may have any stride
        logits = logits.contiguous()
    targets = targets.contiguous()
    vec, block_v, num_warps = launch_config(logits.dtype)
    _token_ce_kernel[(N,)](
        logits, targets, out,
        V, logits.stride(0), ignore_index,
        VEC=vec, BLOCK_V=block_v, NEG_MAX=-FLOAT32_MAX, num_warps=num_warps,
    )
    return out
