"""topk_influence: dense and sparse queries, streaming over batches, ties, and inputs."""

from dataclasses import dataclass

import pytest
import torch

from gradstore_kernels import KernelInputError, TopK, score, topk_influence

BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.triton)]
# The query lives here; batches stay on the CPU and are moved per batch, as from a store.
QUERY_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class StoreBatch:  # the attributes topk_influence reads from the store's Batch
    ids: list
    offsets: torch.Tensor
    token_ids: torch.Tensor
    rows: torch.Tensor
    scales: torch.Tensor | None = None


def _batches(make_case, sizes, V, D, rows_dtype=torch.float32):
    out, next_id = [], 0
    for i, counts in enumerate(sizes):
        case = make_case(counts, V, D, rows_dtype=rows_dtype, hot_fraction=0.2, seed=i, device="cpu")
        ids = [f"ex-{next_id + j}" for j in range(len(counts))]
        next_id += len(counts)
        out.append(StoreBatch(ids, *case.csr, case.scales))
    return out


def _all_scores(Q, batches):
    return torch.cat([score(Q, b.offsets, b.token_ids, b.rows, scales=b.scales, backend="reference") for b in batches])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_query_streams_batches(make_case, backend):
    V, D = 50, 12
    batches = _batches(make_case, [[3, 0, 7], [5, 5, 1, 9], [], [2, 8]], V, D)
    Q = torch.randn(V, D)
    all_scores = _all_scores(Q, batches)
    all_ids = [i for b in batches for i in b.ids]
    top = topk_influence(Q.to(QUERY_DEVICE), iter(batches), 4, backend=backend)
    assert isinstance(top, TopK) and top.scores.dtype == torch.float32
    order = torch.sort(all_scores, descending=True, stable=True).indices[:4]
    torch.testing.assert_close(top.scores.cpu(), all_scores[order], rtol=1e-5, atol=1e-5)
    assert top.ids == [all_ids[i] for i in order.tolist()]
    assert torch.all(top.scores[:-1] >= top.scores[1:])


def test_streaming_does_not_depend_on_batch_boundaries(make_case):
    V, D = 40, 6
    batches = _batches(make_case, [[4, 4, 4], [4, 4], [4, 4, 4, 4]], V, D)
    merged_case = torch.cat([b.rows for b in batches])
    tok = torch.cat([b.token_ids for b in batches])
    offsets = torch.arange(0, merged_case.shape[0] + 1, 4)
    ids = [i for b in batches for i in b.ids]
    Q = torch.randn(V, D)
    one = topk_influence(Q, [(ids, offsets, tok, merged_case)], 5)
    many = topk_influence(Q, batches, 5)
    assert one.ids == many.ids and torch.equal(one.scores, many.scores)


def test_ties_go_to_the_example_scanned_first():
    V, D = 8, 3
    Q = torch.ones(V, D)
    row = torch.ones(1, D)
    batch = lambda ids: (ids, torch.tensor([0, 1, 2]), torch.tensor([1, 2]), torch.cat([row, row]))  # noqa: E731
    top = topk_influence(Q, [batch(["a", "b"]), batch(["c", "d"]), batch(["e", "f"])], 3)
    assert top.ids == ["a", "b", "c"] and torch.equal(top.scores, torch.full((3,), 3.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_query_equals_its_dense_form(make_case, backend):
    V, D = 60, 9
    batches = _batches(make_case, [[6, 2, 0], [9, 9, 3]], V, D, rows_dtype=torch.int8)
    q_tok = torch.tensor([3, 20, 3, 41])  # a repeated token is summed
    q_rows = torch.randn(4, D).bfloat16()
    dense = torch.zeros(V, D)
    dense.index_add_(0, q_tok, q_rows.float())
    want = topk_influence(dense, batches, 3, backend="reference")
    query = (q_tok.to(QUERY_DEVICE), q_rows.to(QUERY_DEVICE))
    inferred = topk_influence(query, batches, 3, backend=backend)  # V from the query
    explicit = topk_influence(query, batches, 3, vocab_size=V, backend=backend)
    for got in (inferred, explicit):
        assert got.ids == want.ids
        torch.testing.assert_close(got.scores.cpu(), want.scores, rtol=1e-5, atol=1e-5)


def test_sparse_int8_query_and_vocab_checks(make_case):
    V, D = 30, 5
    batches = _batches(make_case, [[4, 4]], V, D)
    q = (torch.tensor([2, 7]), torch.tensor([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]], dtype=torch.int8), torch.tensor([0.5, 2.0]))
    dense = torch.zeros(V, D)
    dense[2], dense[7] = q[1][0].float() * 0.5, q[1][1].float() * 2.0
    assert topk_influence(q, batches, 2).ids == topk_influence(dense, batches, 2).ids
    with pytest.raises(KernelInputError, match=r"out of range \[0, 5\)"):
        topk_influence(q, batches, 2, vocab_size=5)  # the query's own token 7
    with pytest.raises(KernelInputError, match=r"token_ids\[\d+\] = \d+ is out of range \[0, 8\)"):
        topk_influence((torch.tensor([1]), torch.ones(1, D)), batches, 2, vocab_size=8)


def test_k_edge_cases(make_case):
    V, D = 20, 4
    batches = _batches(make_case, [[2, 3], [1]], V, D)
    Q = torch.randn(V, D)

    def never_read():
        raise AssertionError("k = 0 must not read the store")
        yield

    none = topk_influence(Q, never_read(), 0)
    assert none.ids == [] and none.scores.shape == (0,)
    everything = topk_influence(Q, batches, 100)
    assert len(everything.ids) == 3 and everything.scores.shape == (3,)
    empty = topk_influence(Q, [], 5)
    assert empty.ids == [] and empty.scores.shape == (0,)
    for k in (-1, 2.5, True):
        with pytest.raises(KernelInputError, match="k must be a non-negative int"):
            topk_influence(Q, batches, k)


def test_bad_batches_are_reported(make_case):
    V, D = 20, 4
    (b,) = _batches(make_case, [[2, 3]], V, D)
    Q = torch.randn(V, D)
    with pytest.raises(KernelInputError, match="a batch has 1 ids but its offsets describe 2 examples"):
        topk_influence(Q, [(["only-one"], b.offsets, b.token_ids, b.rows)], 1)
    with pytest.raises(KernelInputError, match="4 or 5 items"):
        topk_influence(Q, [(b.ids, b.offsets, b.token_ids)], 1)
    with pytest.raises(KernelInputError, match="must have ids, offsets, token_ids and rows"):
        topk_influence(Q, [object()], 1)
    with pytest.raises(KernelInputError, match="query must be a dense"):
        topk_influence("query", [b], 1)
    with pytest.raises(KernelInputError, match=r"rows.shape\[1\] = 4 does not match the matrix dim D = 3"):
        topk_influence(torch.randn(V, 3), [b], 1)


def test_a_non_finite_score_is_an_error_naming_the_example():
    """A NaN would sort above every real score and push the real results out."""
    rows = torch.tensor([[1.0, 0.0], [float("nan"), 0.0]])
    batch = (["good", "corrupt"], torch.tensor([0, 1, 2]), torch.tensor([1, 2]), rows)
    with pytest.raises(KernelInputError, match="example 'corrupt' scores nan"):
        topk_influence(torch.ones(4, 2), [batch], 2)


def test_sparse_query_errors_name_the_query_and_float64_rows_are_accepted():
    batch = (["a"], torch.tensor([0, 1]), torch.tensor([1]), torch.ones(1, 2))
    with pytest.raises(KernelInputError, match="the sparse query: token_ids has 2 entries but rows has 1 rows"):
        topk_influence((torch.tensor([1, 2]), torch.ones(1, 2)), [batch], 1)
    top = topk_influence((torch.tensor([1]), torch.ones(1, 2, dtype=torch.float64)), [batch], 1)
    assert top.ids == ["a"] and float(top.scores[0]) == 2.0
