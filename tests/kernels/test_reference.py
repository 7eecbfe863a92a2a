"""The torch reference against an independent dense float64 computation, and the input checks."""

import logging

import pytest
import torch

import gradstore_kernels
from gradstore_kernels import (
    BackendUnavailableError,
    KernelDtypeError,
    KernelInputError,
    ascent_score,
    score,
)
from gradstore_kernels import backend as backend_module


def dense_expected(case, W: torch.Tensor, Q: torch.Tensor):
    """Scatter every example's rows into a dense float64 [V, D] gradient, then matmul."""
    V, D = W.shape
    n = case.offsets.numel() - 1
    R = case.rows.shape[0]
    x = case.dequantised64().cpu()
    member = torch.zeros(n, R, dtype=torch.float64)
    bounds = case.offsets.tolist()
    for e in range(n):
        member[e, bounds[e] : bounds[e + 1]] = 1.0
    one_hot = torch.nn.functional.one_hot(case.token_ids.cpu(), V).to(torch.float64)  # [R, V]
    grads = torch.einsum("er,rv,rd->evd", member, one_hot, x).reshape(n, V * D)
    scores = grads @ Q.cpu().to(torch.float64).reshape(V * D)
    W_new = W.cpu().to(torch.float64) + (case.lr.cpu().to(torch.float64) @ grads).reshape(V, D)
    return scores, W_new


@pytest.mark.parametrize(
    ("D", "rows_dtype", "w_dtype", "q_kind"),
    [
        (1, torch.float32, torch.float32, "alias"),
        (7, torch.bfloat16, torch.float32, "separate"),
        (33, torch.float16, torch.bfloat16, "alias"),
        (100, torch.int8, torch.float32, "separate_bf16"),
        (33, torch.int8, torch.float16, "alias"),
    ],
)
def test_ascent_reference_matches_dense_float64(make_case, D, rows_dtype, w_dtype, q_kind):
    V = 50
    case = make_case([5, 0, 30, 1, 12, 0], V, D, rows_dtype=rows_dtype, hot_fraction=0.3, device="cpu")
    W = torch.randn(V, D).to(w_dtype)
    Q = {"alias": None, "separate": torch.randn(V, D), "separate_bf16": torch.randn(V, D).bfloat16()}[q_kind]
    expected_scores, expected_W = dense_expected(case, W, W if Q is None else Q)
    scores = ascent_score(W, *case.csr, case.lr, Q, scales=case.scales, backend="reference")
    assert scores.dtype == torch.float32 and scores.shape == (6,)
    torch.testing.assert_close(scores.double(), expected_scores, rtol=1e-5, atol=1e-4)
    # W is rounded once from a float32 sum: within one rounding step of the float64 result.
    ulp = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-10}[w_dtype]
    torch.testing.assert_close(W.double(), expected_W, rtol=ulp, atol=1e-5)
    assert scores[1] == 0 and scores[5] == 0


def test_score_reference_matches_dense_float64(make_case):
    V, D = 40, 9
    case = make_case([3, 17, 0, 8], V, D, rows_dtype=torch.bfloat16, hot_fraction=0.5, device="cpu")
    Q = torch.randn(V, D, dtype=torch.float64)
    expected, _ = dense_expected(case, torch.zeros(V, D), Q)
    got = score(Q, *case.csr, backend="reference")
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_reference_reads_q_before_the_update(make_case):
    V, D = 30, 5
    case = make_case([10, 10], V, D, hot_fraction=0.8, device="cpu")
    W = torch.randn(V, D)
    W_copy = W.clone()
    aliased = ascent_score(W, *case.csr, case.lr, backend="reference")
    separate = ascent_score(W_copy, *case.csr, case.lr, W_copy.clone(), backend="reference")
    assert torch.equal(aliased, separate) and torch.equal(W, W_copy)
    explicit = W.clone()
    again = ascent_score(explicit, *case.csr, case.lr, explicit, backend="reference")  # Q is W itself
    expected = ascent_score(W, *case.csr, case.lr, W.clone(), backend="reference")
    assert torch.equal(again, expected) and torch.equal(explicit, W)


def test_reference_chunking_does_not_change_results(make_case, monkeypatch):
    from gradstore_kernels import scoring

    case = make_case([9, 0, 14, 3], 25, 7, rows_dtype=torch.bfloat16, hot_fraction=0.4, device="cpu")
    W_one, Q = torch.randn(25, 7), torch.randn(25, 7)
    W_many = W_one.clone()
    one = ascent_score(W_one, *case.csr, case.lr, backend="reference")
    one_score = score(Q, *case.csr, backend="reference")
    monkeypatch.setattr(scoring, "REFERENCE_CHUNK_ELEMENTS", {"cpu": 20, "cuda": 20})  # 2 rows a chunk
    many = ascent_score(W_many, *case.csr, case.lr, backend="reference")
    torch.testing.assert_close(many, one, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(W_many, W_one, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(score(Q, *case.csr, backend="reference"), one_score, rtol=1e-6, atol=1e-6)


def test_empty_batches_and_empty_examples(make_case):
    W = torch.randn(10, 4)
    before = W.clone()
    for backend in ("reference", "auto"):
        empty = ascent_score(W, torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                             torch.zeros(0, 4), 0.1, backend=backend)
        assert empty.shape == (0,)
        no_rows = ascent_score(W, torch.zeros(4, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
                               torch.zeros(0, 4), torch.ones(3), backend=backend)
        assert torch.equal(no_rows, torch.zeros(3))
    assert torch.equal(W, before)


# ----------------------------------------------------------------------------- input checks

def _inputs(V=20, D=6):
    offsets = torch.tensor([0, 2, 2, 5])
    token_ids = torch.tensor([1, 4, 4, 0, 19])
    rows = torch.randn(5, D)
    return dict(W=torch.randn(V, D), offsets=offsets, token_ids=token_ids, rows=rows, lr=torch.ones(3))


def _call(args, backend):
    args = dict(args)
    W, offsets, token_ids, rows, lr = (args.pop(k) for k in ("W", "offsets", "token_ids", "rows", "lr"))
    return ascent_score(W, offsets, token_ids, rows, lr, backend=backend, **args)


def _set(i, value):
    def mutate(t):
        t = t.clone()
        t[i] = value
        return t
    return mutate


BAD_INPUTS = [
    ("token_ids", _set(3, 20), KernelInputError, r"token_ids\[3\] = 20 is out of range \[0, 20\)"),
    ("token_ids", _set(1, -1), KernelInputError, r"token_ids\[1\] = -1 is out of range"),
    ("offsets", lambda o: torch.tensor([0, 3, 2, 5]), KernelInputError, r"non-decreasing: offsets\[1\] = 3 > offsets\[2\] = 2"),
    ("offsets", lambda o: torch.tensor([1, 2, 2, 5]), KernelInputError, r"offsets\[0\] must be 0, got 1"),
    ("offsets", lambda o: torch.tensor([0, 2, 2, 4]), KernelInputError, r"offsets\[-1\] must equal the number of rows R = 5, got 4"),
    ("offsets", lambda o: o.reshape(1, 4), KernelInputError, r"offsets must be 1-D"),
    ("offsets", lambda o: o.float(), KernelDtypeError, r"offsets has dtype float32"),
    ("lr", _set(1, float("nan")), KernelInputError, r"lr\[1\] = nan is not finite"),
    ("lr", lambda lr: torch.full((3,), 1e39, dtype=torch.float64), KernelInputError, r"lr\[0\] = inf is not finite"),
    ("lr", lambda lr: float("inf"), KernelInputError, r"lr = inf is not finite"),
    ("lr", lambda lr: torch.ones(4), KernelInputError, r"lr must be a float or a tensor of shape \(3,\)"),
    ("lr", lambda lr: torch.ones(3, dtype=torch.int64), KernelDtypeError, r"lr must be a floating-point tensor"),
    ("lr", lambda lr: "0.1", KernelDtypeError, r"lr must be a float"),
    ("rows", lambda r: r.double(), KernelDtypeError, r"rows has dtype float64; expected one of float32, bfloat16, float16, int8"),
    ("rows", lambda r: r[:, 0], KernelInputError, r"rows must be 2-D \[R, D\]"),
    ("rows", lambda r: r[:, :5], KernelInputError, r"rows.shape\[1\] = 5 does not match the matrix dim D = 6"),
    ("rows", lambda r: r[:4], KernelInputError, r"token_ids has 5 entries but rows has 4 rows"),
    ("rows", lambda r: r.to(torch.int8), KernelInputError, r"int8 rows need scales"),
    ("rows", lambda r: r.to("meta"), KernelInputError, r"rows is on meta but the other inputs are on cpu"),
    ("scales", lambda _: torch.ones(5), KernelInputError, r"scales are only for int8 rows; rows are float32"),
    ("token_ids", lambda t: t.float(), KernelDtypeError, r"token_ids has dtype float32"),
    ("token_ids", lambda t: t.tolist(), KernelDtypeError, r"token_ids must be a torch.Tensor, got list"),
    ("W", lambda w: w.double(), KernelDtypeError, r"W has dtype float64"),
    ("W", lambda w: w[0], KernelInputError, r"W must be 2-D \[V, D\]"),
    ("Q", lambda _: torch.randn(21, 6), KernelInputError, r"Q has shape \(21, 6\) but W has shape \(20, 6\)"),
    ("Q", lambda _: torch.ones(20, 6, dtype=torch.int32), KernelDtypeError, r"Q must be a floating-point tensor"),
]


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize(("name", "mutate", "error", "message"), BAD_INPUTS)
def test_input_errors(backend, name, mutate, error, message):
    args = _inputs()
    args[name] = mutate(args.get(name))
    with pytest.raises(error, match=message):
        _call(args, backend)


def test_int8_scales_checks():
    args = _inputs()
    args["rows"] = args["rows"].to(torch.int8)
    args["scales"] = torch.ones(4)
    with pytest.raises(KernelInputError, match=r"scales must have shape \(5,\), got \(4,\)"):
        _call(args, "reference")
    args["scales"] = torch.ones(5, dtype=torch.int32)
    with pytest.raises(KernelDtypeError, match="scales must be floating point"):
        _call(args, "reference")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_int8_scales_must_be_finite_and_non_negative(bad):
    """A non-finite scale would write inf or NaN into W in place; a negative one flips the row's sign."""
    W = torch.zeros(4, 3)
    scales = torch.tensor([1.0, bad])
    with pytest.raises(KernelInputError, match=r"scales\[1\] = .* is not a finite non-negative scale"):
        ascent_score(W, torch.tensor([0, 2]), torch.tensor([1, 2]), torch.ones(2, 3, dtype=torch.int8), 0.1,
                     scales=scales)
    assert torch.equal(W, torch.zeros(4, 3))


def test_input_errors_are_builtin_exceptions():
    assert issubclass(KernelInputError, ValueError)
    assert issubclass(KernelDtypeError, TypeError) and issubclass(KernelDtypeError, ValueError)


def test_score_checks_its_inputs():
    args = _inputs()
    with pytest.raises(KernelInputError, match=r"token_ids\[4\] = 19 is out of range \[0, 10\)"):
        score(torch.randn(10, 6), args["offsets"], args["token_ids"], args["rows"])


# ----------------------------------------------------------------------------- backend choice

def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        _call(_inputs(), "cuda")


def test_auto_uses_the_reference_on_cpu_and_says_so_once(caplog, monkeypatch):
    monkeypatch.setattr(backend_module, "_announced", set())
    with caplog.at_level(logging.INFO, logger="gradstore_kernels"):
        for _ in range(3):
            _call(_inputs(), "auto")
    messages = [r.getMessage() for r in caplog.records if r.name == "gradstore_kernels"]
    assert len(messages) == 1 and "uses reference" in messages[0]


@pytest.mark.triton
def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    from gradstore_kernels import scoring_triton

    monkeypatch.setattr(scoring_triton, "INTERPRETED", False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        _call(_inputs(), "triton")


def test_public_api():
    assert set(gradstore_kernels.__all__) >= {"ascent_score", "score", "topk_influence", "TopK"}
