"""Suite-wide configuration: the `gpu` marker skips without CUDA; tests are deterministic."""

from __future__ import annotations

import os

import torch

# triton.jit picks interpret-vs-compile from TRITON_INTERPRET when a kernel is decorated, so
# without CUDA the interpreter must be requested before gradstore_kernels loads its kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
