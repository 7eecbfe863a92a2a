"""`token_cross_entropy`: Triton kernel and torch reference against `F.cross_entropy` on float32 logits.

Shapes are tiny and odd (V not a multiple of the block, rows starting at every alignment); most Triton
cases also run with BLOCK_V shrunk to 16, so that short rows still span whole unmasked chunks plus a
head and a tail.
"""

import logging

import pytest
import torch
import torch.nn.functional as F

import gradstore_kernels
from gradstore_kernels import KernelDtypeError, KernelInputError, token_cross_entropy
from gradstore_kernels import backend as backend_module

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Kernel and reference read the same values and both sum in float32: only the order differs.
TOL = {"rtol": 1e-5, "atol": 1e-5}


def expected(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The specification: float32 cross-entropy per row, 0 for ignored rows."""
    return F.cross_entropy(logits.float(), targets.long(), reduction="none", ignore_index=IGNORE)


def make_inputs(N: int, V: int, dtype=torch.float32, *, ignored=(), scale=3.0, seed=0, index_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * scale).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[list(ignored)] = IGNORE
    return logits.to(DEVICE), targets.to(index_dtype).to(DEVICE)


@pytest.fixture
def small_blocks(monkeypatch):
    """BLOCK_V of 16 columns (the kernel's other paths, at tiny V)."""

    def shrink(block_v: int = 16) -> None:
        from gradstore_kernels import cross_entropy_triton

        monkeypatch.setattr(cross_entropy_triton, "MAX_BLOCK_V", block_v)

    return shrink


BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.triton)]
BACKENDS_AND_BLOCKS = [
    pytest.param("reference", False, id="reference"),
    pytest.param("triton", False, marks=pytest.mark.triton, id="triton"),
    pytest.param("triton", True, marks=pytest.mark.triton, id="triton-block16"),
]


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize(("backend", "small"), BACKENDS_AND_BLOCKS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("N", "V"), [(1, 37), (5, 37), (5, 130), (3, 1), (2, 5)])
def test_matches_f_cross_entropy(small_blocks, backend, small, dtype, N, V):
    if small:
        small_blocks()
    logits, targets = make_inputs(N, V, DTYPES[dtype], ignored=[0] if N > 1 else ())
    got = token_cross_entropy(logits, targets, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (N,)
    torch.testing.assert_close(got, expected(logits, targets), **TOL)
    ref = token_cross_entropy(logits, targets, backend="reference")
    torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.triton
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_triton_long_rows_and_int32_targets(small_blocks, index_dtype):
    """Many whole chunks per row (online rescaling across chunks), and int32 targets."""
    small_blocks()
    logits, targets = make_inputs(4, 1003, torch.bfloat16, ignored=[2], index_dtype=index_dtype)
    got = token_cross_entropy(logits, targets, backend="triton")
    torch.testing.assert_close(got, expected(logits, targets), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_are_zero_and_not_read(small_blocks, backend):
    small_blocks()
    logits, targets = make_inputs(4, 37, torch.bfloat16, ignored=[0, 1, 2, 3])
    logits[1] = torch.nan  # an ignored row's logits do not matter
    got = token_cross_entropy(logits, targets, backend=backend)
    assert torch.equal(got.cpu(), torch.zeros(4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index(backend):
    logits, targets = make_inputs(3, 37, torch.float32)
    targets[1] = 36
    got = token_cross_entropy(logits, targets, ignore_index=36, backend=backend)
    want = F.cross_entropy(logits, targets, reduction="none", ignore_index=36)
    torch.testing.assert_close(got, want, **TOL)
    assert got[1] == 0


def _layouts(V: int, dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    big = (torch.randn(12, V + 11, generator=g) * 3).to(dtype).to(DEVICE)
    return {
        "column-slice": big[:5, 3:3 + V],  # row stride V + 11, base not 16-byte aligned
        "row-step": big[::2, :V],  # every other row
        "transposed": big[:5, :V].t().contiguous().t(),  # column stride 5: copied before the kernel
        "expanded": big[:1, :V].expand(4, V),  # row stride 0
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["column-slice", "row-step", "transposed", "expanded"])
def test_non_contiguous_logits(small_blocks, backend, dtype, layout):
    small_blocks()
    logits = _layouts(37, DTYPES[dtype])[layout]
    if layout == "transposed":
        assert logits.stride(1) != 1
    else:
        assert not logits.is_contiguous()
    targets = torch.randint(0, logits.shape[1], (2 * logits.shape[0],)).to(DEVICE)[::2]  # strided too
    got = token_cross_entropy(logits, targets, backend=backend)
    torch.testing.assert_close(got, expected(logits, targets), **TOL)


@pytest.mark.parametrize(("backend", "small"), BACKENDS_AND_BLOCKS)
def test_large_magnitudes_are_stable(small_blocks, backend, small):
    """±1e4 logits overflow a naive sum of exp; the running max must be rescaled, not just added."""
    if small:
        small_blocks()
    g = torch.Generator().manual_seed(2)
    V = 130
    logits = (torch.rand(6, V, generator=g) * 2e4 - 1e4).to(DEVICE)
    logits[1] = -1e4  # a constant row: loss = log(V), to float32's resolution at 1e4 (~1e-3)
    logits[2, :] = torch.linspace(-1e4, 1e4, V)  # increasing: the max moves at every chunk
    logits[3, :] = torch.linspace(1e4, -1e4, V)  # decreasing: the max is in the first chunk
    logits[4, 100:] = -torch.inf  # masked vocabulary
    logits[5, 7] = 1e4 + 5.0  # one clear winner
    targets = torch.tensor([0, 17, V - 1, 0, 3, 7]).to(DEVICE)
    got = token_cross_entropy(logits, targets, backend=backend)
    want = F.cross_entropy(logits.double(), targets, reduction="none").float()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
    assert abs(float(got[1]) - torch.log(torch.tensor(float(V))).item()) < 1e-3
    assert abs(float(got[2])) < 1e-3 and abs(float(got[5])) < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    got = token_cross_entropy(torch.zeros(0, 7, device=DEVICE), torch.zeros(0, dtype=torch.int64, device=DEVICE),
                              backend=backend)
    assert got.shape == (0,) and got.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_out_of_range_targets_give_nan(small_blocks, backend):
    small_blocks()
    logits, targets = make_inputs(4, 37, torch.float32, ignored=[3])
    targets[0], targets[2] = 37, -1
    got = token_cross_entropy(logits, targets, check_targets=False, backend=backend)
    assert torch.isnan(got[0]) and torch.isnan(got[2]) and got[3] == 0
    torch.testing.assert_close(got[1], expected(logits[1:2], targets[1:2])[0], **TOL)


# ----------------------------------------------------------------------------- input errors

def _inputs():
    return make_inputs(4, 10, torch.float32)


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (lambda x, t: (x[None], t), KernelInputError, r"logits must be 2-D \[N, V\], got shape \(1, 4, 10\)"),
        (lambda x, t: (x.double(), t), KernelDtypeError, "logits has dtype float64; expected one of float32"),
        (lambda x, t: (x.long(), t), KernelDtypeError, "logits has dtype int64"),
        (lambda x, t: (x, t[:, None]), KernelInputError, r"targets must be 1-D \[N\], got shape \(4, 1\)"),
        (lambda x, t: (x, t.float()), KernelDtypeError, "targets has dtype float32; expected one of int32, int64"),
        (lambda x, t: (x, t[:3]), KernelInputError, "targets has 3 entries but logits has 4 rows"),
        (lambda x, t: (x[:, :0], t), KernelInputError, r"no columns \(V = 0\)"),
        (lambda x, t: (x, t.index_fill(0, torch.tensor([2], device=t.device), 10)), KernelInputError,
         r"targets\[2\] = 10 is out of range \[0, 10\) and is not ignore_index = -100"),
        (lambda x, t: (x, t.index_fill(0, torch.tensor([1], device=t.device), -1)), KernelInputError,
         r"targets\[1\] = -1 is out of range"),
        (lambda x, t: (x.tolist(), t), KernelDtypeError, "logits must be a torch.Tensor, got list"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_input_errors(backend, mutate, error, message):
    logits, targets = mutate(*_inputs())
    with pytest.raises(error, match=message):
        token_cross_entropy(logits, targets, backend=backend)


def test_bad_ignore_index_and_backend():
    logits, targets = _inputs()
    with pytest.raises(KernelDtypeError, match="ignore_index must be an int, got float"):
        token_cross_entropy(logits, targets, ignore_index=-100.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        token_cross_entropy(logits, targets, backend="cuda")


@pytest.mark.skipif(DEVICE != "cpu", reason="auto picks Triton on CUDA")
def test_auto_uses_the_reference_on_cpu(caplog, monkeypatch):
    monkeypatch.setattr(backend_module, "_announced", set())
    logits, targets = _inputs()
    with caplog.at_level(logging.INFO, logger="gradstore_kernels"):
        got = token_cross_entropy(logits, targets)
    assert torch.equal(got, token_cross_entropy(logits, targets, backend="reference"))
    assert any("uses reference" in r.getMessage() for r in caplog.records)


def test_public_api():
    assert {"token_cross_entropy", "token_cross_entropy_reference"} <= set(gradstore_kernels.__all__)


# ----------------------------------------------------------------------------- GPU (real shapes)

GPT2_V = 50257


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize(
    ("N", "dtype", "layout"),
    [
        (8192, torch.bfloat16, "contiguous"),  # GPT-2, batch 16 x 512: rows start at every alignment
        (1024, torch.float32, "contiguous"),
        (1024, torch.float16, "padded-slice"),  # row stride 50304, base 2 bytes past an alignment
    ],
)
def test_gpu_gpt2_shapes_match(N, dtype, layout):
    g = torch.Generator(device="cuda").manual_seed(0)
    width = GPT2_V if layout == "contiguous" else 50304
    logits = (torch.randn(N, width, device="cuda", generator=g) * 4).to(dtype)
    if layout == "padded-slice":
        logits = logits[:, 1:1 + GPT2_V]
    targets = torch.randint(0, GPT2_V, (N,), device="cuda", generator=g)
    targets[::7] = IGNORE
    got = token_cross_entropy(logits, targets, backend="triton")
    ref = token_cross_entropy(logits, targets, backend="reference")
    # float32 sums of the same rounded inputs: ~1e-6 in practice; 1e-3 leaves room for exp approximations.
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got, expected(logits, targets), rtol=1e-3, atol=1e-3)
    assert torch.all(got[::7] == 0)


@pytest.mark.gpu
@pytest.mark.triton
def test_gpu_unchecked_call_does_not_sync():
    logits = torch.randn(64, GPT2_V, device="cuda").to(torch.bfloat16)
    targets = torch.randint(0, GPT2_V, (64,), device="cuda")
    token_cross_entropy(logits, targets, check_targets=False)  # compiles outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        token_cross_entropy(logits, targets, check_targets=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
