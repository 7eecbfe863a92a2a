"""Fixtures for the unlearning-side tests."""

from __future__ import annotations

import copy
import shutil

import pytest
from forget_setup import World, build_world
from tiny_models import tiny_gpt2, tiny_llama

from gradstore import GradStore


@pytest.fixture(params=["gpt2", "llama"])
def tiny_model(request):
    return {"gpt2": tiny_gpt2, "llama": tiny_llama}[request.param]()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The engine tests' small world (forget_setup.py), trained once per test module."""
    return build_world(tmp_path_factory.mktemp("world") / "store")


@pytest.fixture
def world(built, tmp_path):
    """A private copy of the trained model and its store, so that each test may forget freely."""
    shutil.copytree(built.store.uri, tmp_path / "store")
    return World(copy.deepcopy(built.model), GradStore.open(tmp_path / "store"), built.train, built.holdout,
                 built.judge)
