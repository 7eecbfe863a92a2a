"""Round trips on every backend: float32 exact, bfloat16 bit-exact, int8 within its documented bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradstore import Batch, ErasedError, UnknownIdError


def random_examples(n, dim, vocab, seed=0, max_k=20):
    rng = np.random.default_rng(seed)
    ks = rng.integers(0, max_k, size=n)
    ks[:2] = [0, 1]  # always cover the edge cases
    token_ids = [rng.choice(vocab, size=k, replace=False) for k in ks]
    # Heavy-tailed values like real gradients: a per-row scale spanning several orders of magnitude.
    rows = [torch.from_numpy((rng.standard_normal((k, dim)) * np.exp(3 * rng.standard_normal((k, 1))))
                             .astype(np.float32)) for k in ks]
    return token_ids, rows


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_round_trip(make_store, dtype):
    store, reopen = make_store(dim=7, vocab_size=50, dtype=dtype)
    ids = [0, "doc-β", 2**63 - 1, 7, "x" * 256, 11]
    token_ids, rows = random_examples(len(ids), 7, 50)
    metas = [{"step": i, "loss": 1.5, "tokens": list(range(i + 2))} for i in range(len(ids))]
    with store.writer() as w:
        w.append(ids[:3], token_ids[:3], rows[:3], metas[:3])
        w.append(ids[3:], token_ids[3:], rows[3:], metas[3:])
    store = reopen()
    assert len(store) == len(ids) and all(i in store for i in ids)
    for i, example_id in enumerate(ids):
        ex = store.get(example_id)
        assert ex.id == example_id
        assert ex.token_ids.dtype == torch.int32
        assert torch.equal(ex.token_ids, torch.as_tensor(token_ids[i], dtype=torch.int32))
        assert ex.meta == metas[i]
        expected = rows[i]
        if dtype == "float32":
            assert ex.rows.dtype == torch.float32 and torch.equal(ex.rows, expected)
        elif dtype == "bfloat16":
            assert ex.rows.dtype == torch.bfloat16
            assert torch.equal(ex.rows.view(torch.int16), expected.to(torch.bfloat16).view(torch.int16))
        else:
            assert ex.rows.dtype == torch.int8 and ex.scales.shape == (len(expected),)
            bound = expected.abs().amax(dim=1, keepdim=True) / 254 * (1 + 1e-5) + 1e-30
            assert bool(((ex.dequantized() - expected).abs() <= bound).all())


def test_bfloat16_input_is_bit_exact(make_store):
    store, reopen = make_store(dim=5, vocab_size=10, dtype="bfloat16")
    bits = torch.randint(-2**15, 2**15, (4, 5), dtype=torch.int32).to(torch.int16)
    bits[(bits.view(torch.bfloat16).isnan()) | (bits.view(torch.bfloat16).isinf())] = 0
    rows = bits.view(torch.bfloat16)
    with store.writer() as w:
        w.append(["a"], [[0, 3, 5, 9]], [rows])
    assert torch.equal(reopen().get("a").rows.view(torch.int16), rows.view(torch.int16))


def test_get_many_is_csr_in_request_order(make_store):
    store, reopen = make_store(dim=4, vocab_size=30)
    token_ids, rows = random_examples(10, 4, 30, seed=1)
    with store.writer() as w:
        w.append(list(range(5)), token_ids[:5], rows[:5])
        w.append(list(range(5, 10)), token_ids[5:], rows[5:])
    order = [9, 0, 4, 5, 0]  # across segments, with a repeat
    batch = reopen().get_many(order)
    assert isinstance(batch, Batch) and batch.ids == order
    assert batch.offsets.tolist() == [0, *np.cumsum([len(token_ids[i]) for i in order]).tolist()]
    for j, i in enumerate(order):
        lo, hi = int(batch.offsets[j]), int(batch.offsets[j + 1])
        assert torch.equal(batch.rows[lo:hi], rows[i])
        assert batch.token_ids[lo:hi].tolist() == list(token_ids[i])
    empty = reopen().get_many([])
    assert len(empty) == 0 and empty.rows.shape == (0, 4) and empty.offsets.tolist() == [0]


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_a_batch_selects_examples_in_any_order(tmp_path, dtype):
    from gradstore import GradStore

    store = GradStore.create(tmp_path / "s", dim=4, vocab_size=30, dtype=dtype)
    token_ids, rows = random_examples(8, 4, 30, seed=2)  # examples 0 and 1 hold 0 and 1 rows
    with store.writer() as w:
        w.append(list(range(8)), token_ids, rows, [{"i": i} for i in range(8)])
    batch = store.get_many(list(range(8)), with_meta=True)
    picked = [5, 0, 1, 5, 7]
    sub = batch.select(picked)
    assert sub.ids == picked and [m["i"] for m in sub.meta] == picked
    for j, i in enumerate(picked):
        got, want = sub.example(j), batch.example(i)
        assert torch.equal(got.token_ids, want.token_ids) and torch.equal(got.rows, want.rows)
        assert (got.scales is None) == (dtype != "int8") and (got.scales is None or torch.equal(got.scales, want.scales))
    none = batch.select([])
    assert len(none) == 0 and none.offsets.tolist() == [0] and none.rows.shape == (0, 4)
    with pytest.raises(IndexError, match="must lie in"):
        batch.select([8])


def test_unknown_and_erased_ids_raise_key_errors_naming_them(make_store):
    store, _ = make_store()
    with store.writer() as w:
        w.append([1, 2], [[1], [2]], [torch.ones(1, 8), torch.ones(1, 8)])
    with pytest.raises(UnknownIdError, match="unknown ID 3") as info:
        store.get(3)
    assert isinstance(info.value, KeyError)
    store.erase([1])
    with pytest.raises(ErasedError, match="ID 1 was erased"):
        store.get(1)
    with pytest.raises(ErasedError):
        store.get_many([2, 1])
    assert store.get(2).id == 2


def test_int_and_string_ids_are_distinct(make_store):
    store, reopen = make_store()
    with store.writer() as w:
        w.append([5, "5"], [[1], [2]], [torch.ones(1, 8), 2 * torch.ones(1, 8)])
    store = reopen()
    assert store.get(5).token_ids.tolist() == [1] and store.get("5").token_ids.tolist() == [2]
    store.erase([5])
    assert "5" in store and 5 not in store


def test_stats_report_counts_bytes_and_ratio(make_store):
    store, reopen = make_store(dim=64, vocab_size=1000, dtype="bfloat16")
    token_ids, rows = random_examples(20, 64, 1000, max_k=50)
    with store.writer() as w:
        w.append(list(range(20)), token_ids, rows)
    stats = reopen().stats()
    assert stats.examples == 20 and stats.segments == 1 and stats.rows == sum(len(t) for t in token_ids)
    assert stats.rows_logical_bytes == stats.rows * 64 * 2
    assert stats.bytes_on_disk > stats.rows_stored_bytes > 0
    assert stats.to_dict()["compression_ratio"] == pytest.approx(stats.compression_ratio, abs=1e-4)


def test_iter_batches_streams_every_live_example(make_store):
    store, _ = make_store()
    with store.writer() as w:
        for s in range(3):
            w.append([f"{s}-{i}" for i in range(5)], [[i] for i in range(5)], [torch.ones(1, 8)] * 5)
    store.erase(["1-3"])
    seen = [i for b in store.iter_batches(batch_size=2) for i in b.ids]
    assert sorted(seen) == sorted(store.ids()) and len(seen) == 14
