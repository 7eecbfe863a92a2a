"""Several processes write into one store at once: every example is present exactly once afterwards."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import torch

from gradstore import GradStore


def write_range(uri: str, worker: int, n: int) -> None:
    store = GradStore.open(uri)
    rng = np.random.default_rng(worker)
    with store.writer(name=f"worker{worker}") as w:
        for start in range(0, n, 5):
            ids = [f"w{worker}-{i}" for i in range(start, start + 5)]
            tokens = [rng.choice(100, size=3, replace=False) for _ in ids]
            rows = [torch.full((3, 4), float(worker)) for _ in ids]
            w.append(ids, tokens, rows)


def test_four_processes_append_concurrently(tmp_path):
    uri = str(tmp_path / "store")
    GradStore.create(uri, dim=4, vocab_size=100, dtype="bfloat16")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=write_range, args=(uri, w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    store = GradStore.open(uri)
    ids = store.ids()
    assert len(ids) == len(set(ids)) == 160
    assert store.stats().shadowed_copies == 0
    batch = store.get_many(ids)
    for j, example_id in enumerate(batch.ids):
        worker = int(example_id[1 : example_id.index("-")])
        assert bool((batch.example(j).rows.float() == worker).all())
    # Compaction merges the 32 small segments without losing or duplicating anything.
    store.compact()
    reopened = GradStore.open(uri)
    assert sorted(reopened.ids()) == sorted(ids) and reopened.stats().segments == 1
