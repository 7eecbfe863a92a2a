"""Checks that need a CUDA device: compiled kernels at realistic shapes (skipped without CUDA)."""

import logging

import pytest
import torch

from gradstore_kernels import ascent_score, score
from gradstore_kernels import backend as backend_module

pytestmark = [pytest.mark.gpu, pytest.mark.triton]

V, D = 50257, 768


def zipf_batch(n_examples: int, rows_per_example: int, *, rows_dtype=torch.bfloat16, seed: int = 0):
    """Zipf(1) token ids over the vocabulary (hottest token ~9% of rows), on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    R = n_examples * rows_per_example
    weights = 1.0 / torch.arange(1, V + 1, device="cuda", dtype=torch.float64)
    cdf = torch.cumsum(weights / weights.sum(), 0)
    ranks = torch.searchsorted(cdf, torch.rand(R, device="cuda", generator=g, dtype=torch.float64))
    ranks = ranks.clamp_(max=V - 1)
    rank_to_token = torch.randperm(V, device="cuda", generator=g)
    token_ids = rank_to_token[ranks].to(torch.int32)
    offsets = torch.arange(0, R + 1, rows_per_example, device="cuda", dtype=torch.int64)
    rows = (torch.randn(R, D, device="cuda", generator=g) * 1e-2).to(rows_dtype)
    lr = torch.full((n_examples,), 1e-2, device="cuda")
    return offsets, token_ids, rows, lr


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_deterministic_mode_is_bitwise_reproducible_on_gpu(w_dtype):
    offsets, tok, rows, lr = zipf_batch(256, 256)
    W = torch.randn(V, D, device="cuda").to(w_dtype)
    runs = []
    for _ in range(2):
        W_run = W.clone()
        scores = ascent_score(W_run, offsets, tok, rows, lr, backend="triton", deterministic=True)
        runs.append((W_run, scores))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize(
    ("w_dtype", "deterministic", "alias"),
    [
        (torch.float32, True, True),
        (torch.bfloat16, True, False),
        (torch.float32, False, False),  # atomics straight into W
        (torch.float32, False, True),  # atomics into a float32 scratch (Q aliases W)
        (torch.bfloat16, False, True),  # bf16 W: float32 scratch, rounded once
    ],
)
def test_gpu_matches_reference(w_dtype, deterministic, alias):
    offsets, tok, rows, lr = zipf_batch(128, 256, seed=1)
    W = torch.randn(V, D, device="cuda").to(w_dtype)
    Q = None if alias else torch.randn(V, D, device="cuda")
    W_ref = W.clone()
    got = ascent_score(W, offsets, tok, rows, lr, Q, backend="triton", deterministic=deterministic)
    want = ascent_score(W_ref, offsets, tok, rows, lr, Q, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    rtol = 1e-5 if w_dtype == torch.float32 else 2**-7  # one bf16 rounding step
    torch.testing.assert_close(W.float(), W_ref.float(), rtol=rtol, atol=1e-5)


def test_bf16_accumulation_would_be_worse():
    # The reason W is summed in float32: adding the hot token's updates one by one in
    # bf16 drifts far more than rounding the float32 sum once.
    offsets, tok, rows, _ = zipf_batch(64, 256, seed=2)
    W = torch.zeros(V, D, device="cuda", dtype=torch.bfloat16)
    ascent_score(W, offsets, tok, rows, 1.0, backend="triton")
    exact = torch.zeros(V, D, device="cuda", dtype=torch.float64).index_add_(0, tok.long(), rows.double())
    naive = torch.zeros(V, D, device="cuda", dtype=torch.bfloat16).index_add_(0, tok.long(), rows)
    ours = (W.double() - exact).abs().max()
    assert ours < (naive.double() - exact).abs().max()


def test_auto_picks_triton_on_cuda(caplog, monkeypatch):
    monkeypatch.setattr(backend_module, "_announced", set())
    offsets, tok, rows, _ = zipf_batch(4, 16)
    with caplog.at_level(logging.INFO, logger="gradstore_kernels"):
        score(torch.randn(V, D, device="cuda"), offsets, tok, rows)
    assert any("uses triton" in r.getMessage() for r in caplog.records)
