"""Triton kernels against the torch reference (on CPU under TRITON_INTERPRET=1, or on CUDA).

PIECE_ROWS and the D-block are shrunk in most tests so that tiny batches still split token
runs across pieces (the scratch / second-pass path) and D spans several partial chunks.
"""

import itertools

import pytest
import torch

from gradstore_kernels import ascent_score, score

pytestmark = pytest.mark.triton

ascent_triton = pytest.importorskip("gradstore_kernels.ascent_triton")
scoring_triton = pytest.importorskip("gradstore_kernels.scoring_triton")


@pytest.fixture
def small_blocks(monkeypatch):
    """Pieces of at most `rows` rows and D-chunks of `cols` columns."""

    def shrink(rows: int | None = None, cols: int | None = None) -> None:
        if rows is not None:
            monkeypatch.setattr(ascent_triton, "PIECE_ROWS", rows)
        if cols is not None:
            monkeypatch.setattr(scoring_triton, "MAX_BLOCK_D", cols)
            monkeypatch.setattr(ascent_triton, "PIECE_BLOCK_D", cols)

    return shrink


def _q(kind: str, W: torch.Tensor) -> torch.Tensor | None:
    V, D = W.shape
    if kind == "alias":
        return None
    if kind == "self":  # Q passed explicitly as W: the same memory is read and written
        return W
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[kind]
    return torch.randn(V, D, device=W.device).to(dtype)


ASCENT_CASES = {
    # name: (counts, V, D, rows dtype, W dtype, Q, deterministic, hot fraction)
    "fp32-alias-hot": ([5, 0, 40, 1, 3, 0, 20], 60, 33, torch.float32, torch.float32, "alias", True, 0.5),
    "bf16rows-separateQ": ([9, 30, 0, 12], 50, 7, torch.bfloat16, torch.float32, "fp32", True, 0.3),
    "fp16rows-bf16W": ([20, 20, 1, 0], 70, 100, torch.float16, torch.bfloat16, "alias", True, 0.4),
    "int8rows-bf16Q": ([0, 15, 31], 40, 1, torch.int8, torch.float32, "bf16", True, 0.6),
    "fp16W-Q-is-W": ([13, 13, 13], 30, 33, torch.bfloat16, torch.float16, "self", True, 0.5),
    "atomic-fp32W-direct": ([5, 0, 40, 1, 3, 0, 20], 60, 33, torch.float32, torch.float32, "fp32", False, 0.5),
    "atomic-fp32W-alias": ([25, 0, 30], 45, 7, torch.bfloat16, torch.float32, "alias", False, 0.5),
    "atomic-bf16W": ([17, 22, 0, 4], 50, 33, torch.bfloat16, torch.bfloat16, "fp64", False, 0.5),
    "atomic-int8-Q-is-W": ([8, 8], 20, 100, torch.int8, torch.float32, "self", False, 0.3),
}


# Deterministic cases run twice: default blocks (one piece per run here) and split runs.
ASCENT_PARAMS = [(name, False) for name in ASCENT_CASES] + [
    (name, True) for name, case in ASCENT_CASES.items() if case[6]
]


@pytest.mark.parametrize(("name", "split_runs"), ASCENT_PARAMS)
def test_ascent_score_matches_reference(make_case, weights_close, small_blocks, name, split_runs):
    counts, V, D, rows_dtype, w_dtype, q_kind, deterministic, hot = ASCENT_CASES[name]
    if split_runs:
        small_blocks(rows=5, cols=16)
    case = make_case(counts, V, D, rows_dtype=rows_dtype, hot_fraction=hot)
    W = torch.randn(V, D, device=case.rows.device).to(w_dtype)
    W_ref = W.clone()
    Q = _q(q_kind, W)
    Q_ref = W_ref if q_kind == "self" else Q
    got = ascent_score(W, *case.csr, case.lr, Q, scales=case.scales, backend="triton", deterministic=deterministic)
    want = ascent_score(W_ref, *case.csr, case.lr, Q_ref, scales=case.scales, backend="reference")
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    weights_close(W, W_ref)
    assert torch.all(got[torch.tensor(counts) == 0] == 0)


@pytest.mark.parametrize("piece_rows", [1, 2, 3, 16])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_one_hot_token_split_into_many_pieces(make_case, weights_close, small_blocks, piece_rows, w_dtype):
    # ~60% of rows on one token, cut into pieces of `piece_rows`; the second pass sums
    # them (several CUT_BLOCK tiles of slots when piece_rows is 1 or 2).
    small_blocks(rows=piece_rows, cols=16)
    case = make_case([70, 1, 0, 45], 25, 20, rows_dtype=torch.bfloat16, hot_fraction=0.6)
    W = torch.randn(25, 20, device=case.rows.device).to(w_dtype)
    W_ref = W.clone()
    got = ascent_score(W, *case.csr, case.lr, backend="triton")
    want = ascent_score(W_ref, *case.csr, case.lr, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    weights_close(W, W_ref)


def test_many_singletons(make_case, weights_close, small_blocks):
    small_blocks(rows=4)
    case = make_case([60, 0, 90, 1], 300, 33, singletons=True)
    W = torch.randn(300, 33, device=case.rows.device)
    W_ref = W.clone()
    got = ascent_score(W, *case.csr, case.lr, backend="triton")
    want = ascent_score(W_ref, *case.csr, case.lr, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    weights_close(W, W_ref)


@pytest.mark.parametrize("deterministic", [True, False])
def test_non_contiguous_inputs(make_case, weights_close, small_blocks, deterministic):
    small_blocks(rows=3, cols=16)
    V, D = 40, 21
    case = make_case([11, 0, 19, 6], V, D, rows_dtype=torch.bfloat16, hot_fraction=0.4)
    device = case.rows.device
    rows = torch.zeros(D, case.rows.shape[0], dtype=case.rows.dtype, device=device).t()  # column-major
    rows.copy_(case.rows)
    token_ids = torch.stack([case.token_ids, case.token_ids], 1)[:, 0]  # stride 2
    offsets = case.offsets.to(torch.int32)
    lr = torch.stack([case.lr, case.lr], 1)[:, 1]
    big_W = torch.randn(V, D + 5, device=device)
    W = big_W[:, 2 : 2 + D]  # row stride D + 5, updated in place through the view
    Q = torch.randn(D, V, device=device).t()  # transposed storage
    assert not (rows.is_contiguous() or token_ids.is_contiguous() or W.is_contiguous() or Q.is_contiguous())
    W_ref = W.contiguous()
    outside = big_W[:, :2].clone(), big_W[:, 2 + D :].clone()
    got = ascent_score(W, offsets, token_ids, rows, lr, Q, backend="triton", deterministic=deterministic)
    want = ascent_score(W_ref, *case.csr, case.lr, Q.contiguous(), backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    weights_close(W, W_ref)
    assert torch.equal(big_W[:, :2], outside[0]) and torch.equal(big_W[:, 2 + D :], outside[1])


def test_empty_batch_and_empty_examples():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    W = torch.randn(10, 4, device=device)
    before = W.clone()
    nothing = torch.zeros(0, dtype=torch.int64, device=device)
    out = ascent_score(W, torch.zeros(1, dtype=torch.int64, device=device), nothing,
                       torch.zeros(0, 4, device=device), 0.5, backend="triton")
    assert out.shape == (0,)
    out = ascent_score(W, torch.zeros(3, dtype=torch.int64, device=device), nothing,
                       torch.zeros(0, 4, device=device), 0.5, backend="triton", deterministic=False)
    assert torch.equal(out, torch.zeros(2, device=device))
    out = score(W, torch.zeros(3, dtype=torch.int64, device=device), nothing, torch.zeros(0, 4, device=device),
                backend="triton")
    assert torch.equal(out, torch.zeros(2, device=device)) and torch.equal(W, before)


def test_aliasing_reads_q_before_any_update(make_case, small_blocks):
    # Deterministic mode runs the same kernels either way, so reading Q = W must give
    # bitwise the same result as reading a snapshot of W.
    small_blocks(rows=4, cols=16)
    case = make_case([30, 30], 12, 33, hot_fraction=0.7)
    W = torch.randn(12, 33, device=case.rows.device)
    W_snapshot = W.clone()
    aliased = ascent_score(W, *case.csr, case.lr, backend="triton")
    separate = ascent_score(W_snapshot, *case.csr, case.lr, W_snapshot.clone(), backend="triton")
    assert torch.equal(aliased, separate) and torch.equal(W, W_snapshot)


@pytest.mark.parametrize("deterministic", [True, False])
def test_q_overlapping_w_without_being_w_is_read_before_any_update(make_case, small_blocks, deterministic):
    """A Q that is a shifted view of W's memory: programs must not read rows another has already updated."""
    small_blocks(rows=4, cols=16)
    case = make_case([20, 20], 12, 9, hot_fraction=0.5)
    buffer = torch.randn(13, 9, device=case.rows.device)
    W, Q = buffer[1:], buffer[:12]  # Q[t] is W[t - 1]: updated before token t is read, in program order
    expected_W, expected_Q = W.clone(), Q.clone()
    expected = ascent_score(expected_W, *case.csr, case.lr, expected_Q, backend="reference")
    scores = ascent_score(W, *case.csr, case.lr, Q, backend="triton", deterministic=deterministic)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(W, expected_W, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("deterministic", [True, False])
def test_rows_of_width_zero_move_nothing(deterministic):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    W = torch.zeros(5, 0, device=device)
    out = ascent_score(W, torch.tensor([0, 2], device=device), torch.tensor([1, 3], device=device),
                       torch.zeros(2, 0, device=device), 0.5, backend="triton", deterministic=deterministic)
    assert torch.equal(out, torch.zeros(1, device=device))


def test_deterministic_mode_is_bitwise_reproducible(make_case, small_blocks):
    small_blocks(rows=3, cols=16)
    case = make_case([40, 7, 0, 33], 30, 40, rows_dtype=torch.bfloat16, hot_fraction=0.5)
    W1 = torch.randn(30, 40, device=case.rows.device).bfloat16()
    W2 = W1.clone()
    s1 = ascent_score(W1, *case.csr, case.lr, backend="triton")
    s2 = ascent_score(W2, *case.csr, case.lr, backend="triton")
    assert torch.equal(s1, s2) and torch.equal(W1, W2)


def test_pieces_hold_one_token_and_at_most_piece_rows():
    tok = torch.tensor([5, 1, 5, 5, 2, 5, 5, 1, 5, 0, 5, 5, 5])
    sorted_tok, perm, bounds = ascent_triton._plan_pieces(tok, 3, vocab_size=6)
    assert torch.equal(sorted_tok.long(), tok[perm]) and torch.equal(perm[sorted_tok == 5], torch.nonzero(tok == 5).flatten())
    b = bounds.tolist()
    # Sized for the most pieces possible -- one per token (6) plus one per cut (4 inside the
    # 13 rows) -- without counting them on the host: the real pieces, then empty ones.
    assert len(b) == 6 + 4 + 1 and b[0] == 0 and b[-1] == tok.numel()
    real = b[: b.index(tok.numel()) + 1]
    assert all(x == tok.numel() for x in b[len(real) :])
    for lo, hi in itertools.pairwise(real):
        assert 0 < hi - lo <= 3 and sorted_tok[lo:hi].unique().numel() == 1


@pytest.mark.parametrize(
    ("D", "rows_dtype", "q_dtype"),
    [(1, torch.float32, torch.float32), (33, torch.bfloat16, torch.bfloat16), (100, torch.int8, torch.float64),
     (7, torch.float16, torch.float32)],
)
def test_score_matches_reference(make_case, small_blocks, D, rows_dtype, q_dtype):
    small_blocks(cols=16)
    case = make_case([4, 0, 50, 9, 1], 64, D, rows_dtype=rows_dtype, hot_fraction=0.3)
    Q = torch.randn(64, D, device=case.rows.device).to(q_dtype)
    got = score(Q, *case.csr, scales=case.scales, backend="triton")
    want = score(Q, *case.csr, scales=case.scales, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert got[1] == 0
