"""Fixtures for the unlearning-side tests."""

from __future__ import annotations

import pytest
from tiny_models import tiny_gpt2, tiny_llama


@pytest.fixture(params=["gpt2", "llama"])
def tiny_model(request):
    return {"gpt2": tiny_gpt2, "llama": tiny_llama}[request.param]()
