"""Triton path of `ascent_score`: W[tok] += lr[e] * row and per-example scores, one pass over rows.

Deterministic mode (default) -- sort, segment, reduce; no atomics:

  plan    Stable-sort the rows by token id (torch.sort, radix on int32 keys). Cut the sorted
          order into *pieces*: a piece starts wherever the token changes and at every multiple
          of P = PIECE_ROWS. So a piece holds <= P rows of one token, and a hot token (up to
          ~9% of the rows under Zipf) is spread over many programs instead of serialising one.
          The piece starts are compacted on the device into a bounds array sized for the most
          pieces there can be (one per vocabulary entry plus one per cut: counting the tokens
          present would need a device-to-host sync), and the programs of the empty pieces past
          the last exit at once.
          Each row's lr is gathered into sorted order here, once.
  pass 1  One program per (piece, D-chunk). It reads Q[tok] and W[tok] up front, then streams
          the piece's rows (gathered through the sort permutation) BLOCK_R at a time, fetching
          the next step's row indices while the current rows are in flight: per-row partial dots
          go to a float32 [n_chunks, R] buffer at the row's original index, and
          sum(lr[e_r] * row_r) accumulates in float32 registers. A piece that is its token's only
          piece (nearly all tokens: every run shorter than P that does not straddle a multiple
          of P) writes W[tok] = round(W[tok] + acc) itself; no other program reads or writes that
          W row, so Q aliasing W is safe. A piece of a token split at a multiple of P writes acc
          to scratch instead, at a slot computed from its position (no compaction needed): slot
          2c for the piece starting at cut c*P inside a run, slot 2c + 1 for the run's first
          piece when it lies in block c. At most 2 * cdiv(R, P) slots.
  pass 2  One program per (cut c >= 1, D-chunk). If cut c is the first cut inside a run, the
          program sums the run's head slot and its continuation slots in a fixed order and
          updates W[tok] once. It runs after pass 1 (stream order), so every Q read came first.
  scores  A fixed-order per-example sum of the per-row partial dots (see scoring_triton).

Launch constants (PIECE_*), measured on an H200 at 2M rows (benchmarks/ascent_tuning.py): the
kernel is bound by memory latency, not bandwidth -- the rows gathered in token order stream at
3.9 TB/s (index_select), and the kernel is no faster on rows already in token order -- so many
small programs win: one warp, 4 rows x 256 columns per step, 2 pipelining stages (2.0 ms in all).
Before the loads were moved up front, one warp x 8 rows took 3.3 ms and the former 4 warps x 16
rows 6.8 ms (results/ascent_tuning_nvidia-h200_before-prefetch.json). A design with fixed spans of
the sorted order and a segmented scan per step (equal work per program whatever the tokens)
measured 7.5-21 ms and was dropped (results/ascent_tuning_nvidia-h200_spans.json).

Every reduction has a fixed order for a given input, so results are bitwise reproducible,
and W is rounded once from a float32 sum (bf16 accumulation of colliding updates is ~60x
less accurate). Traffic beyond the floor: the sort, each row's lr in sorted order (4 bytes/row,
written once and read per D-chunk), 4 * n_chunks bytes/row of partial dots, and scratch only for
split tokens (<= 2 * R / P rows of D floats, ~3% at P = 256).

Atomic mode (opt-in): no sort; one program per (tile of rows, D-chunk) computes the dots and
atomically adds lr * row in float32. Straight into W when W is float32 and Q is a separate
tensor; otherwise into a float32 [V, D] scratch that is folded into W afterwards, because
bf16 atomics would accumulate in bf16 and, with Q aliasing W, a program could otherwise read
a row another program already updated (there is no ordering between programs).
"""

import torch
import triton
import triton.language as tl

from .checks import SparseRows
from .scoring import row_examples
from .scoring_triton import BLOCK_R, INTERPRETED, block_d_for, segment_sum

__all__ = ["INTERPRETED", "ascent_score_triton"]

# Rows per piece (P). Bounds the longest program (P / PIECE_BLOCK_R steps) and the work of
# the program that reduces the hottest token (its R_hot / P slots, CUT_BLOCK at a time).
PIECE_ROWS = 256
CUT_BLOCK = 16

# Pass 1: rows per loop step, D-chunk, warps and software-pipelining stages (module docstring).
PIECE_BLOCK_R = 4
PIECE_BLOCK_D = 256
PIECE_WARPS = 1
PIECE_STAGES = 2


@triton.jit
def _ascent_pieces_kernel(
    rows_ptr, scales_ptr, perm_ptr, sorted_tok_ptr, bounds_ptr, step_ptr,
    q_ptr, w_ptr, scratch_ptr, part_ptr,
    R, D, n_chunks, piece_rows,
    stride_xr, stride_xd, stride_qv, stride_qd, stride_wv, stride_wd,
    HAS_SCALES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    piece = pid // n_chunks
    chunk = pid % n_chunks
    start = tl.load(bounds_ptr + piece)
    end = tl.load(bounds_ptr + piece + 1)
    # The grid is sized for the most pieces there can be; the pieces past the last are empty.
    if start < end:
        cols = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = cols < D
        # Everything that does not depend on the rows is loaded up front, so a short piece
        # (most pieces: Zipf's tail) waits on three round trips to memory, not seven.
        tok = tl.load(sorted_tok_ptr + start).to(tl.int64)
        # Is this piece one of several for its token? Only if a cut at a multiple of P falls
        # inside the token's run: at this piece's start (a continuation) or at its end.
        prev_tok = tl.load(sorted_tok_ptr + tl.maximum(start - 1, 0))
        next_tok = tl.load(sorted_tok_ptr + tl.minimum(end, R - 1))
        # Q[tok] and W[tok] are read before anything in this launch writes W[tok]: the only
        # program that may write W[tok, cols] in pass 1 is this one, at the very end.
        q = tl.load(q_ptr + tok * stride_qv + cols * stride_qd, mask=dmask, other=0.0).to(tl.float32)
        w_ptrs = w_ptr + tok * stride_wv + cols * stride_wd
        w = tl.load(w_ptrs, mask=dmask, other=0.0).to(tl.float32)

        part_row = part_ptr + chunk.to(tl.int64) * R
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        i = start + tl.arange(0, BLOCK_R)
        orig = tl.load(perm_ptr + i, mask=i < end, other=0)
        step = tl.load(step_ptr + i, mask=i < end, other=0.0)
        for _ in range(start, end, BLOCK_R):
            imask = i < end
            mask = imask[:, None] & dmask[None, :]
            x = tl.load(rows_ptr + orig[:, None] * stride_xr + cols[None, :] * stride_xd, mask=mask, other=0.0)
            # The next tile's row indices are fetched while these rows are in flight: the
            # gather waits on one round trip per tile, not two.
            i_next = i + BLOCK_R
            orig_next = tl.load(perm_ptr + i_next, mask=i_next < end, other=0)
            step_next = tl.load(step_ptr + i_next, mask=i_next < end, other=0.0)
            x = x.to(tl.float32)
            if HAS_SCALES:
                x = x * tl.load(scales_ptr + orig, mask=imask, other=0.0)[:, None]
            tl.store(part_row + orig, tl.sum(x * q[None, :], axis=1), mask=imask)
            acc += tl.sum(x * step[:, None], axis=0)
            i, orig, step = i_next, orig_next, step_next

        continues = (start % piece_rows == 0) & (start > 0) & (prev_tok == tok)
        extends = (end % piece_rows == 0) & (end < R) & (next_tok == tok)
        if continues | extends:
            slot = 2 * (start // piece_rows) + tl.where(continues, 0, 1)
            tl.store(scratch_ptr + slot * D + cols, acc, mask=dmask)
        else:
            tl.store(w_ptrs, (w + acc).to(w_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _ascent_split_runs_kernel(
    sorted_tok_ptr, scratch_ptr, w_ptr,
    R, D, n_chunks, piece_rows, stride_wv, stride_wd,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cut = (pid // n_chunks + 1).to(tl.int64)  # cuts 1 .. cdiv(R, P) - 1, so cut * P < R
    chunk = pid % n_chunks
    pos = cut * piece_rows
    tok = tl.load(sorted_tok_ptr + pos)
    inside_run = tl.load(sorted_tok_ptr + pos - 1) == tok
    # The previous cut is inside the same run iff the row before it has this token too
    # (rows are sorted); then that cut's program owns the run.
    prev_inside = (cut >= 2) & (tl.load(sorted_tok_ptr + tl.maximum(pos - piece_rows - 1, 0)) == tok)
    if inside_run & (prev_inside == 0):
        cols = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = cols < D
        # Head piece (the run starts in block cut - 1), then continuation slots 2c for
        # c = cut, cut + 1, ... while sorted_tok[c * P] is still this token.
        acc = tl.load(scratch_ptr + (2 * cut - 1) * D + cols, mask=dmask, other=0.0)
        c = cut
        more = inside_run
        while more:
            cv = c + tl.arange(0, BLOCK_C)
            cpos = cv * piece_rows
            in_bounds = cpos < R
            valid = in_bounds & (tl.load(sorted_tok_ptr + cpos, mask=in_bounds, other=-1) == tok)
            x = tl.load(
                scratch_ptr + (2 * cv)[:, None] * D + cols[None, :],
                mask=valid[:, None] & dmask[None, :],
                other=0.0,
            )
            acc += tl.sum(x, axis=0)
            # Sorted order makes `valid` a prefix: a full tile means the run may go on.
            more = tl.sum(valid.to(tl.int32), axis=0) == BLOCK_C
            c += BLOCK_C
        w_ptrs = w_ptr + tok.to(tl.int64) * stride_wv + cols * stride_wd
        w = tl.load(w_ptrs, mask=dmask, other=0.0).to(tl.float32)
        tl.store(w_ptrs, (w + acc).to(w_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _ascent_atomic_kernel(
    rows_ptr, scales_ptr, tok_ptr, example_ptr, lr_ptr, q_ptr, target_ptr, part_ptr,
    R, D, n_chunks,
    stride_xr, stride_xd, stride_qv, stride_qd, stride_tv, stride_td,
    HAS_SCALES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    tile = pid // n_chunks
    chunk = pid % n_chunks
    r = tile.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < R
    cols = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = cols < D
    mask = rmask[:, None] & dmask[None, :]

    tok = tl.load(tok_ptr + r, mask=rmask, other=0).to(tl.int64)
    x = tl.load(rows_ptr + r[:, None] * stride_xr + cols[None, :] * stride_xd, mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_SCALES:
        x = x * tl.load(scales_ptr + r, mask=rmask, other=0.0)[:, None]
    # The launcher guarantees Q and the atomic target never share memory, so these reads
    # cannot see another program's update.
    q = tl.load(q_ptr + tok[:, None] * stride_qv + cols[None, :] * stride_qd, mask=mask, other=0.0)
    tl.store(part_ptr + chunk.to(tl.int64) * R + r, tl.sum(x * q.to(tl.float32), axis=1), mask=rmask)
    step = tl.load(lr_ptr + tl.load(example_ptr + r, mask=rmask, other=0), mask=rmask, other=0.0)
    target = target_ptr + tok[:, None] * stride_tv + cols[None, :] * stride_td
    tl.atomic_add(target, x * step[:, None], mask=mask, sem="relaxed")


def _plan_pieces(token_ids: torch.Tensor, piece_rows: int, vocab_size: int):
    """Stable sort by token and the piece boundaries: (sorted int32 ids, perm int64, bounds int64).

    bounds has max_pieces + 1 entries: the starts of the pieces, then R repeated (empty pieces).
    Sizing the grid for the most pieces there can be -- one per vocabulary entry plus one per
    cut inside a run -- instead of counting them keeps the device-to-host sync out of the plan.
    """
    R = token_ids.numel()
    device = token_ids.device
    # int32 keys halve the radix-sort passes; ids are < V < 2**31 (checked before launch).
    sorted_tok, perm = torch.sort(token_ids.to(torch.int32), stable=True)
    is_start = torch.empty(R, dtype=torch.bool, device=device)
    torch.ne(sorted_tok[1:], sorted_tok[:-1], out=is_start[1:])
    is_start[::piece_rows] = True  # includes row 0
    max_pieces = min(R, vocab_size + triton.cdiv(R, piece_rows) - 1)
    # Piece k starts at the k-th start; rows that start nothing write to a spare last slot.
    slot = torch.where(is_start, torch.cumsum(is_start, 0) - 1, max_pieces + 1)
    bounds = torch.full((max_pieces + 2,), R, dtype=torch.int64, device=device)
    bounds.scatter_(0, slot, torch.arange(R, device=device))
    return sorted_tok, perm, bounds[: max_pieces + 1]


def _sorted_steps(batch: SparseRows, lr: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """float32 [R]: each row's lr, in sorted order -- gathered once here rather than through two
    dependent loads (row -> example -> lr) in every program."""
    counts = batch.offsets[1:] - batch.offsets[:-1]
    return torch.repeat_interleave(lr, counts, output_size=batch.R)[perm]


def _ascent_pieces(W: torch.Tensor, Q: torch.Tensor, batch: SparseRows, lr: torch.Tensor) -> torch.Tensor:
    """Deterministic `ascent_score` by pieces of one token (see the module docstring)."""
    R, D = batch.R, batch.D
    device = W.device
    block_d = min(PIECE_BLOCK_D, triton.next_power_of_2(D))
    n_chunks = triton.cdiv(D, block_d)
    piece_rows = PIECE_ROWS
    sorted_tok, perm, bounds = _plan_pieces(batch.token_ids, piece_rows, W.shape[0])
    step = _sorted_steps(batch, lr, perm)
    part = torch.empty((n_chunks, R), dtype=torch.float32, device=device)
    rows = batch.rows
    has_scales = batch.scales is not None
    n_pieces = bounds.numel() - 1
    n_cuts = triton.cdiv(R, piece_rows)
    scratch = torch.empty((2 * n_cuts, D), dtype=torch.float32, device=device)  # only used slots are read
    _ascent_pieces_kernel[(n_pieces * n_chunks,)](
        rows, batch.scales if has_scales else part, perm, sorted_tok, bounds, step,
        Q, W, scratch, part,
        R, D, n_chunks, piece_rows,
        rows.stride(0), rows.stride(1), Q.stride(0), Q.stride(1), W.stride(0), W.stride(1),
        HAS_SCALES=has_scales, BLOCK_R=PIECE_BLOCK_R, BLOCK_D=block_d,
        num_warps=PIECE_WARPS, num_stages=PIECE_STAGES,
    )
    if n_cuts > 1:
        _ascent_split_runs_kernel[((n_cuts - 1) * n_chunks,)](
            sorted_tok, scratch, W,
            R, D, n_chunks, piece_rows, W.stride(0), W.stride(1),
            BLOCK_C=CUT_BLOCK, BLOCK_D=block_d,
        )
    return segment_sum(part, batch.offsets)


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same elements at the same places: each program then reads Q[tok] before it writes W[tok]."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def ascent_score_triton(
    W: torch.Tensor,
    Q: torch.Tensor | None,
    batch: SparseRows,
    lr: torch.Tensor,
    *,
    deterministic: bool = True,
) -> torch.Tensor:
    """Triton `ascent_score` on validated inputs (see `gradstore_kernels.ascent_score`).

    W: [V, D] float32/bfloat16/float16, updated in place. Q: [V, D] float or None (= W
    before the update). lr: float32 [n]. Returns float32 [n].
    """
    R, D = batch.R, batch.D
    device = W.device
    if R == 0 or D == 0:  # nothing to move, and every score is an empty sum
        return torch.zeros(batch.n, dtype=torch.float32, device=device)
    Q = W if Q is None else Q
    if Q is not W and _shares_memory(Q, W) and not _same_view(Q, W):
        # Q overlaps W's memory without being W (a shifted view, W.t()): a program would read Q rows that
        # another has already updated. Q must be read as it was before the update: take a copy.
        Q = Q.clone()
    if deterministic:
        return _ascent_pieces(W, Q, batch, lr)
    block_d = block_d_for(D)
    n_chunks = triton.cdiv(D, block_d)
    part = torch.empty((n_chunks, R), dtype=torch.float32, device=device)
    example = row_examples(batch.offsets, R, dtype=torch.int32)
    rows = batch.rows
    has_scales = batch.scales is not None
    scales = batch.scales if has_scales else part  # unread dummy when HAS_SCALES=False

    direct = W.dtype == torch.float32 and not _shares_memory(Q, W)
    if direct:
        target = W
    else:
        target = torch.zeros(W.shape, dtype=torch.float32, device=device)
    _ascent_atomic_kernel[(triton.cdiv(R, BLOCK_R) * n_chunks,)](
        rows, scales, batch.token_ids, example, lr, Q, target, part,
        R, D, n_chunks,
        rows.stride(0), rows.stride(1), Q.stride(0), Q.stride(1), target.stride(0), target.stride(1),
        HAS_SCALES=has_scales, BLOCK_R=BLOCK_R, BLOCK_D=block_d,
    )
    if not direct:
        # Round once: W = round(W + sum of updates), the sum held in float32.
        target += W
        W.copy_(target)
    return segment_sum(part, batch.offsets)
