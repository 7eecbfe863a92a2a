"""A hypothesis state machine: append / get / get_many / erase / compact / reopen against a dict model."""

from __future__ import annotations

import shutil
import tempfile

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gradstore import DuplicateIdError, ErasedError, GradStore, UnknownIdError

DIM, VOCAB = 3, 20
ids_strategy = st.one_of(st.integers(0, 30), st.sampled_from(["a", "b", "c", "ü", "long-" + "x" * 60]))


@st.composite
def examples(draw):
    k = draw(st.integers(0, 4))
    tokens = draw(st.lists(st.integers(0, VOCAB - 1), min_size=k, max_size=k, unique=True))
    values = draw(st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=k * DIM, max_size=k * DIM))
    return tokens, np.asarray(values, dtype=np.float32).reshape(k, DIM)


class StoreModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp()
        self.uri = f"{self.dir}/s"
        self.store = GradStore.create(self.uri, dim=DIM, vocab_size=VOCAB, dtype="float32")
        self.model: dict = {}
        self.erased: set = set()

    def teardown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(batch=st.lists(st.tuples(ids_strategy, examples()), min_size=1, max_size=4), replace=st.booleans())
    def append(self, batch, replace):
        ids = [i for i, _ in batch]
        clash = len(set(ids)) < len(ids) or (not replace and any(i in self.model for i in ids))
        with self.store.writer() as w:
            if clash:
                with pytest.raises(DuplicateIdError):
                    w.append(ids, [t for _, (t, _) in batch], [torch.from_numpy(r) for _, (_, r) in batch],
                             replace=replace)
                return
            w.append(ids, [t for _, (t, _) in batch], [torch.from_numpy(r) for _, (_, r) in batch], replace=replace)
        for i, ex in batch:
            self.model[i] = ex
            self.erased.discard(i)

    def check_example(self, ex, example_id):
        tokens, rows = self.model[example_id]
        assert ex.token_ids.tolist() == tokens
        assert np.array_equal(ex.rows.numpy(), rows)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def get(self, data):
        example_id = data.draw(st.sampled_from(sorted(self.model, key=str)))
        self.check_example(self.store.get(example_id), example_id)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def get_many(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.model, key=str)), max_size=5))
        batch = self.store.get_many(ids)
        assert batch.ids == ids
        for j, example_id in enumerate(ids):
            self.check_example(batch.example(j), example_id)

    @rule(example_id=ids_strategy)
    def get_absent(self, example_id):
        if example_id in self.model:
            return
        with pytest.raises(ErasedError if example_id in self.erased else UnknownIdError):
            self.store.get(example_id)

    @precondition(lambda self: self.model or self.erased)
    @rule(data=st.data())
    def erase(self, data):
        pool = sorted(set(self.model) | self.erased, key=str)
        ids = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3))
        receipt = self.store.erase(ids)
        assert set(receipt.erased) == {i for i in ids if i in self.model}
        for i in ids:
            if i in self.model:
                del self.model[i]
                self.erased.add(i)

    @rule()
    def compact(self):
        self.store.compact(target_rows=64, small_rows=32)

    @rule()
    def reopen(self):
        self.store = GradStore.open(self.uri)

    @invariant()
    def same_ids(self):
        assert sorted(self.store.ids(), key=str) == sorted(self.model, key=str)
        assert len(self.store) == len(self.model)


StoreModel.TestCase.settings = settings(max_examples=20, stateful_step_count=12, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])
test_store_state_machine = StoreModel.TestCase
