"""Small CSR batches for the kernel tests, and the guard for running Triton on this machine.

Shapes are tiny and odd on purpose (D not a multiple of the block, hot tokens, singletons,
empty examples): under TRITON_INTERPRET=1 every program runs in Python.
"""

import importlib.util
import os
from dataclasses import dataclass

import pytest
import torch

TRITON_RUNNABLE = importlib.util.find_spec("triton") is not None and (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs a Triton kernel (CUDA, or TRITON_INTERPRET=1 on CPU)")


def pytest_collection_modifyitems(config, items):
    if TRITON_RUNNABLE:
        return
    skip = pytest.mark.skip(reason="needs triton with CUDA, or TRITON_INTERPRET=1")
    for item in items:
        if item.get_closest_marker("triton") is not None:
            item.add_marker(skip)


@dataclass
class Case:
    offsets: torch.Tensor  # int64 [n + 1]
    token_ids: torch.Tensor  # int64 [R]
    rows: torch.Tensor  # [R, D]
    scales: torch.Tensor | None  # float32 [R] for int8 rows
    lr: torch.Tensor  # float32 [n]

    @property
    def csr(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.offsets, self.token_ids, self.rows

    def dequantised64(self) -> torch.Tensor:
        x = self.rows.to(torch.float64)
        return x if self.scales is None else x * self.scales.to(torch.float64)[:, None]


def build_case(
    counts: list[int],
    V: int,
    D: int,
    *,
    rows_dtype: torch.dtype = torch.float32,
    hot_fraction: float = 0.0,
    singletons: bool = False,
    seed: int = 0,
    device: str = DEVICE,
) -> Case:
    """A batch with the given rows per example; tokens uniform, or with a hot token / all distinct."""
    g = torch.Generator().manual_seed(seed)
    counts_t = torch.tensor(counts, dtype=torch.int64)
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = counts_t.cumsum(0)
    R = int(offsets[-1])
    if singletons:
        assert R <= V
        tok = torch.randperm(V, generator=g)[:R]
    else:
        tok = torch.randint(0, V, (R,), generator=g)
        hot = torch.rand(R, generator=g) < hot_fraction
        tok[hot] = V // 3
    scales = None
    if rows_dtype == torch.int8:
        rows = torch.randint(-127, 128, (R, D), generator=g, dtype=torch.int8)
        scales = torch.rand(R, generator=g) / 64 + 1e-3
    else:
        rows = torch.randn(R, D, generator=g).to(rows_dtype)
    lr = torch.rand(len(counts), generator=g) + 0.1
    scales = None if scales is None else scales.to(device)
    return Case(offsets.to(device), tok.to(device), rows.to(device), scales, lr.to(device))


@pytest.fixture
def make_case():
    return build_case


def assert_weights_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """W after the update. bf16/fp16 allow a rounding step: the sums differ in order, and the
    Triton interpreter casts float32 -> bfloat16 by truncation where the GPU rounds to nearest."""
    assert actual.dtype == expected.dtype
    a, e = actual.to(torch.float64).cpu(), expected.to(torch.float64).cpu()
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[actual.dtype]
    torch.testing.assert_close(a, e, rtol=rtol, atol=1e-5)


@pytest.fixture
def weights_close():
    return assert_weights_close
