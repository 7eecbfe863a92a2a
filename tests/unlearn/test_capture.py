"""Capture: stored rows equal a per-example reference; policies; slow stores; the plain-loop API."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from tiny_models import VOCAB, pad_batch

from gradstore import GradStore, InvalidInputError
from gradstore_unlearn.capture import GradientCapture, epoch_record_id

SEQUENCES = [[5, 9, 9, 3, 12, 9, 40], [7, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [33, 33, 33, 33]]


def reference_rows(model, sequence: list[int]) -> dict[int, torch.Tensor]:
    """Each example alone: d(its own mean token loss) / d(embedding output), scattered by token, float64 sum."""
    captured = {}

    def keep_gradient(module, inputs, output):
        output.register_hook(lambda g: captured.__setitem__("g", g))

    handle = model.get_input_embeddings().register_forward_hook(keep_gradient)
    ids = torch.tensor([sequence])
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    handle.remove()
    rows: dict[int, torch.Tensor] = {}
    for t, token in enumerate(sequence):
        rows[token] = rows.get(token, 0) + captured["g"][0, t].double()
    return rows


def make_store(tmp_path, model, name="store", **kwargs):
    dim = model.get_input_embeddings().weight.shape[1]
    return GradStore.create(tmp_path / name, dim=dim, vocab_size=VOCAB, dtype="float32", **kwargs)


def train_steps(model, capture, batches, epochs=1, optimizer=None):
    for epoch in range(epochs):
        capture.epoch = epoch
        for ids, sequences in batches:
            with capture.batch(ids):
                model(**pad_batch(sequences)).loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad()


def test_captured_rows_equal_per_example_reference(tmp_path, tiny_model):
    store = make_store(tmp_path, tiny_model)
    tiny_model.train()
    with GradientCapture(tiny_model, store) as capture:
        train_steps(tiny_model, capture, [(["a", "b", "c", "d"], SEQUENCES)])
    assert capture.report.examples_captured == 4 and capture.report.stall_seconds >= 0
    store = GradStore.open(store.uri)
    for example_id, sequence in zip("abcd", SEQUENCES, strict=True):
        ex = store.get(example_id)
        expected = reference_rows(tiny_model, sequence)
        assert sorted(ex.token_ids.tolist()) == sorted(expected)
        for token, row in zip(ex.token_ids.tolist(), ex.rows, strict=True):
            torch.testing.assert_close(row.double(), expected[token], rtol=1e-4, atol=1e-6)
        assert ex.meta["tokens"] == sequence and ex.meta["n_tokens"] == len(sequence) - 1
        ids = torch.tensor([sequence])
        assert ex.meta["loss"] == pytest.approx(float(tiny_model(input_ids=ids, labels=ids).loss.detach()), rel=1e-5)


def test_position_rows_are_captured_by_position(tmp_path):
    from tiny_models import tiny_gpt2

    model = tiny_gpt2()
    store = make_store(tmp_path, model)
    positions = GradStore.create(tmp_path / "pos", dim=32, vocab_size=64, dtype="float32")
    with GradientCapture(model, store, position_store=positions) as capture:
        train_steps(model, capture, [(["a", "b"], SEQUENCES[:2])])
    rows = GradStore.open(positions.uri).get("a")
    assert rows.token_ids.tolist() == list(range(len(SEQUENCES[0])))
    token_rows = GradStore.open(store.uri).get("a")
    # Summing position rows by their token gives the token rows: both are the same per-position gradient.
    by_token = dict(zip(token_rows.token_ids.tolist(), token_rows.rows, strict=True))
    nines = [p for p, t in enumerate(SEQUENCES[0]) if t == 9]
    torch.testing.assert_close(rows.rows[nines].sum(0), by_token[9])


def test_policies_first_all_off_across_two_epochs(tmp_path):
    from tiny_models import tiny_gpt2

    batches = [(["a", "b"], SEQUENCES[:2]), (["c", "a"], [SEQUENCES[2], SEQUENCES[0]])]  # "a" twice per epoch
    results = {}
    for policy in ("first", "all", "off"):
        model = tiny_gpt2()
        store = make_store(tmp_path, model, name=policy, capture_policy=policy)
        with GradientCapture(model, store, policy=policy) as capture:
            train_steps(model, capture, batches, epochs=2)
        results[policy] = (sorted(map(str, GradStore.open(store.uri).ids())), capture.report)
    assert results["first"][0] == ["a", "b", "c"]
    assert results["first"][1].examples_seen == 8 and results["first"][1].examples_skipped == 5
    assert results["all"][0] == sorted(["a", "b", "c"] + [str(epoch_record_id(i, 1)) for i in "abc"])
    assert results["off"][0] == []
    with pytest.raises(InvalidInputError, match="capture_policy='all'"):  # copies in a store that would not know
        GradientCapture(tiny_gpt2(), make_store(tmp_path, tiny_gpt2(), name="first-store"), policy="all")


def test_first_policy_skips_ids_already_in_the_store(tmp_path):
    from tiny_models import tiny_gpt2

    model = tiny_gpt2()
    store = make_store(tmp_path, model)
    with GradientCapture(model, store) as capture:
        train_steps(model, capture, [(["a"], SEQUENCES[:1])])
    with GradientCapture(model, GradStore.open(store.uri)) as capture:  # a resumed run
        train_steps(model, capture, [(["a", "b"], SEQUENCES[:2])])
    assert capture.report.examples_captured == 1 and sorted(GradStore.open(store.uri).ids()) == ["a", "b"]


def test_a_slow_store_stalls_training_but_drops_nothing(tmp_path, monkeypatch):
    from tiny_models import tiny_gpt2

    model = tiny_gpt2()
    store = make_store(tmp_path, model)
    capture = GradientCapture(model, store, max_pending=1, writer_threads=1)
    (writer,) = capture._writers
    real_append = writer.append

    # The store is slow exactly while training waits on it: the writer's first append holds until the training
    # thread blocks on the full queue behind it, then takes 0.4 s more. (A store that is merely slow, 0.5 s an
    # append, measured no stall on a loaded 2-core machine, where training was as slow as the store; and training
    # may block once before the writer has taken its first job, which is no wait on the store.)
    blocking_put = capture._queue.put
    appending, training_waits = threading.Event(), threading.Event()

    def put(item, block=True, timeout=None):  # put_nowait comes here too, with block=False
        if block and appending.is_set():  # `_enqueue` blocks only once put_nowait found the queue full
            training_waits.set()
        return blocking_put(item, block, timeout)

    def slow_append(*args, **kwargs):
        if not appending.is_set():
            appending.set()
            assert training_waits.wait(timeout=60), "training never waited on the full queue"
            time.sleep(0.4)
        return real_append(*args, **kwargs)

    monkeypatch.setattr(capture._queue, "put", put)
    monkeypatch.setattr(writer, "append", slow_append)
    batches = [([f"x{s}-{i}" for i in range(2)], SEQUENCES[:2]) for s in range(6)]
    with capture:
        train_steps(model, capture, batches)
    assert capture.report.stall_seconds > 0.3
    assert capture.report.examples_captured == 12 and len(GradStore.open(store.uri)) == 12


def test_eval_forwards_and_forwards_without_ids_are_not_captured(tmp_path):
    from tiny_models import tiny_gpt2

    model = tiny_gpt2()
    store = make_store(tmp_path, model)
    with GradientCapture(model, store) as capture:
        model(**pad_batch(SEQUENCES[:2])).loss.backward()  # no IDs: not captured
        model.eval()
        with torch.no_grad(), capture.batch(["a", "b"]):
            model(**pad_batch(SEQUENCES[:2]))
        model.train()
    assert len(GradStore.open(store.uri)) == 0


def test_errors_are_clear(tmp_path):
    from tiny_models import tiny_gpt2

    model = tiny_gpt2()
    with pytest.raises(ValueError, match="width 32, the store's dim is 16"):
        GradientCapture(model, GradStore.create(tmp_path / "s", dim=16, vocab_size=VOCAB))
    store = make_store(tmp_path, model, name="ok")
    with GradientCapture(model, store) as capture:
        with pytest.raises(ValueError, match="3 example IDs for a batch of 2"), capture.batch(["a", "b", "c"]):
            model(**pad_batch(SEQUENCES[:2]))
        with pytest.raises(RuntimeError, match="backward\\(\\) was not called"), capture.batch(["a", "b"]):
            model(**pad_batch(SEQUENCES[:2]))
