"""Capture when things go wrong: writer failures, overflow steps, fp16 loss scaling, retried batches, unusual
forwards (tuple outputs, a frozen embedding, a graph differentiated twice), inputs refused early."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_capture import SEQUENCES, make_store, reference_rows
from tiny_models import VOCAB, pad_batch, tiny_gpt2

from gradstore import GradStore, InvalidInputError
from gradstore_unlearn.capture import GradientCapture


def assert_rows_match_reference(store, model, example_id, sequence):
    ex = GradStore.open(store.uri).get(example_id)
    expected = reference_rows(model, sequence)
    assert sorted(ex.token_ids.tolist()) == sorted(expected)
    for token, row in zip(ex.token_ids.tolist(), ex.rows, strict=True):
        torch.testing.assert_close(row.double(), expected[token], rtol=1e-4, atol=1e-6)


def test_a_non_finite_batch_is_skipped_counted_and_captured_when_next_seen(tmp_path):
    model = tiny_gpt2()
    store = make_store(tmp_path, model)
    # The middle batch's loss is infinite, as in a GradScaler overflow step: its rows are inf/NaN.
    batches = [(["a", "b"], 1.0), (["c", "d"], float("inf")), (["e", "f"], 1.0)]
    with GradientCapture(model, store, writer_threads=1) as capture:
        for epoch, scales in enumerate([[1.0, float("inf"), 1.0], [1.0, 1.0, 1.0]]):
            capture.epoch = epoch
            for (ids, _), scale in zip(batches, scales, strict=True):
                with capture.batch(ids):
                    (model(**pad_batch(SEQUENCES[:2])).loss * scale).backward()
                model.zero_grad()
    assert capture.report.examples_nonfinite == 2
    assert sorted(GradStore.open(store.uri).ids()) == ["a", "b", "c", "d", "e", "f"]  # c, d in epoch 1
    assert GradStore.open(store.uri).get("c").meta["epoch"] == 1
    assert_rows_match_reference(store, model, "c", SEQUENCES[0])


def test_a_writer_failure_stops_training_at_the_next_batch_and_keeps_earlier_rows(tmp_path, monkeypatch):
    model = tiny_gpt2()
    store = make_store(tmp_path, model)
    capture = GradientCapture(model, store, writer_threads=1)  # default buffer: no commit before close
    (writer,) = capture._writers
    real_append, calls = writer.append, []

    def append_failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("the disk is full")
        return real_append(*args, **kwargs)

    monkeypatch.setattr(writer, "append", append_failing_once)
    batches = [(["a", "b"], SEQUENCES[:2]), (["c", "d"], SEQUENCES[2:4]), (["e", "f"], SEQUENCES[:2])]
    with pytest.raises(RuntimeError, match="the disk is full") as raised, capture:
        for ids, sequences in batches:
            with capture.batch(ids):
                model(**pad_batch(sequences)).loss.backward()
            capture._queue.join()  # let the writer catch up: the failure is known before the next batch
    assert "every row appended before the failure was committed" in str(raised.value)
    assert len(calls) == 2  # the third batch never ran: its forward raised
    assert sorted(GradStore.open(store.uri).ids()) == ["a", "b"]


def test_rows_are_divided_by_the_grad_scalers_scale(tmp_path):
    model = tiny_gpt2()
    store = make_store(tmp_path, model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    # The scale doubles after every good step and halves after an overflow: the steps run at 2**16, 2**17
    # (overflow), 2**16 and 2**17, and it ends at 2**18.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1)
    with GradientCapture(model, store, optimizer=optimizer, scaler=scaler) as capture:
        for step in range(4):
            overflow = float("inf") if step == 1 else 1.0
            with capture.batch([f"s{step}-a", f"s{step}-b"]):
                scaler.scale(model(**pad_batch(SEQUENCES[:2])).loss * overflow).backward()
            scaler.step(optimizer)  # skipped at the overflow step
            scaler.update()
            optimizer.zero_grad()
    assert scaler.get_scale() == 2.0**18
    assert capture.report.examples_nonfinite == 2
    assert sorted(GradStore.open(store.uri).ids()) == sorted(f"s{s}-{x}" for s in (0, 2, 3) for x in "ab")
    for step in (0, 2, 3):
        assert_rows_match_reference(store, model, f"s{step}-a", SEQUENCES[0])


def test_tuple_outputs_return_dict_false(tmp_path):
    model = tiny_gpt2()
    store = make_store(tmp_path, model)
    with GradientCapture(model, store) as capture, capture.batch(["a", "b"]):
        model(**pad_batch(SEQUENCES[:2]), return_dict=False)[0].backward()
    assert_rows_match_reference(store, model, "a", SEQUENCES[0])
    ids = torch.tensor([SEQUENCES[0]])
    loss = float(model(input_ids=ids, labels=ids).loss.detach())
    assert GradStore.open(store.uri).get("a").meta["loss"] == pytest.approx(loss, rel=1e-5)


def test_a_frozen_input_embedding_is_an_error_that_names_the_fix(tmp_path):
    model = tiny_gpt2()
    model.get_input_embeddings().weight.requires_grad_(False)  # as in LoRA fine-tuning
    store = make_store(tmp_path, model)
    with GradientCapture(model, store) as capture:
        with pytest.raises(RuntimeError, match="enable_input_require_grads"), capture.batch(["a", "b"]):
            model(**pad_batch(SEQUENCES[:2])).loss.backward()
        # The fix works also when applied after the capture started (its hook then runs after the capture's).
        model.enable_input_require_grads()
        with capture.batch(["a", "b"]):
            model(**pad_batch(SEQUENCES[:2])).loss.backward()
    assert_rows_match_reference(store, tiny_gpt2(), "a", SEQUENCES[0])  # the same weights, not frozen


def test_a_batch_whose_step_failed_is_captured_when_retried(tmp_path):
    model = tiny_gpt2()
    store = make_store(tmp_path, model)
    with GradientCapture(model, store) as capture:
        with pytest.raises(torch.OutOfMemoryError), capture.batch(["a", "b"]):
            model(**pad_batch(SEQUENCES[:2]))
            raise torch.OutOfMemoryError("out of memory before backward")
        with capture.batch(["a", "b"]):
            model(**pad_batch(SEQUENCES[:2])).loss.backward()
    assert capture.report.examples_captured == 2 and capture.report.examples_skipped == 0
    assert_rows_match_reference(store, model, "a", SEQUENCES[0])


def test_a_forward_differentiated_twice_is_captured_once(tmp_path):
    model = tiny_gpt2()
    store = make_store(tmp_path, model)
    with GradientCapture(model, store) as capture:
        with capture.batch(["a", "b"]):
            loss = model(**pad_batch(SEQUENCES[:2])).loss
            torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)  # a gradient-norm probe
            loss.backward()
        with capture.batch(["c", "d"]):
            model(**pad_batch(SEQUENCES[2:4])).loss.backward()
    assert capture.report.examples_captured == 4 and GradStore.open(store.uri).stats().shadowed_copies == 0
    assert sorted(GradStore.open(store.uri).ids()) == ["a", "b", "c", "d"]
    assert_rows_match_reference(store, model, "a", SEQUENCES[0])


def test_a_closed_capture_cannot_be_started_again(tmp_path):
    model = tiny_gpt2()
    store = make_store(tmp_path, model)
    with GradientCapture(model, store) as capture, capture.batch(["a"]):
        model(**pad_batch(SEQUENCES[:1])).loss.backward()
    with pytest.raises(RuntimeError, match="was closed"):
        capture.start()
    assert GradStore.open(store.uri).ids() == ["a"]


def test_a_second_capture_on_the_same_model_is_refused(tmp_path):
    model = tiny_gpt2()
    first = GradientCapture(model, make_store(tmp_path, model, name="one"))
    with first, pytest.raises(RuntimeError, match="another GradientCapture is active"):
        GradientCapture(model, make_store(tmp_path, model, name="two")).start()


def test_an_all_policy_key_too_long_is_refused_on_the_training_thread(tmp_path):
    # An ID that fits in epoch 0 but whose epoch-1 key '<ID>@epoch1' is over the store's 256 bytes.
    model = tiny_gpt2()
    store = make_store(tmp_path, model, capture_policy="all")
    ids = ["x" * 250, "short"]
    with GradientCapture(model, store, policy="all") as capture:
        with capture.batch(ids):
            model(**pad_batch(SEQUENCES[:2])).loss.backward()
        capture.epoch = 1
        with pytest.raises(InvalidInputError, match="keep string IDs to 249"), capture.batch(ids):
            model(**pad_batch(SEQUENCES[:2])).loss.backward()
    assert sorted(GradStore.open(store.uri).ids()) == sorted(ids)


def test_a_position_store_that_does_not_fit_is_refused_early(tmp_path):
    model = tiny_gpt2()
    store = make_store(tmp_path, model)
    narrow = GradStore.create(tmp_path / "p16", dim=16, vocab_size=64)
    with pytest.raises(ValueError, match="position store's dim is 16"):
        GradientCapture(model, store, position_store=narrow)
    short = GradStore.create(tmp_path / "p4", dim=32, vocab_size=4)
    capture = GradientCapture(model, store, position_store=short)
    refused = pytest.raises(ValueError, match=r"a batch of 7 positions.*vocab_size is 4")
    with capture, refused, capture.batch(["a"]):
        model(**pad_batch(SEQUENCES[:1]))


def test_a_capture_never_closed_commits_its_rows_at_exit(tmp_path):
    """Enough rows (> 2 chunks of 64) that the store encodes on its thread pool, which the interpreter has
    stopped by the time exit handlers run: the commit then encodes in its own thread."""
    uri = str(tmp_path / "store")
    GradStore.create(uri, dim=32, vocab_size=VOCAB, dtype="float32")
    script = textwrap.dedent(f"""
        import random, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from tiny_models import VOCAB, pad_batch, tiny_gpt2
        from gradstore import GradStore
        from gradstore_unlearn.capture import GradientCapture
        model = tiny_gpt2()
        capture = GradientCapture(model, GradStore.open({uri!r}), writer_threads=1)
        capture.start()
        rng = random.Random(0)
        sequences = [rng.sample(range(1, VOCAB), 50) for _ in range(4)]  # 4 x 50 distinct tokens: 200 rows
        with capture.batch(["a", "b", "c", "d"]):
            model(**pad_batch(sequences)).loss.backward()
        raise SystemExit("training failed")  # no close()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "never closed" in result.stderr, result.stderr[-2000:]
    assert sorted(GradStore.open(uri).ids()) == ["a", "b", "c", "d"], result.stderr[-2000:]


def test_a_training_failure_is_raised_even_when_closing_the_capture_fails_too(tmp_path, monkeypatch):
    """train_model closes the capture after a failure (committing what it holds); if that close fails as well,
    the error raised is still the training failure, the one that explains what happened."""
    from gradstore_unlearn.train import TrainConfig, train_model

    model = tiny_gpt2()
    store = make_store(tmp_path, model)
    real_close = GradientCapture.close

    def close_then_fail(self, **kwargs):
        real_close(self, **kwargs)
        raise RuntimeError("close failed")

    monkeypatch.setattr(GradientCapture, "close", close_then_fail)
    broken = [[1, 2, 3], [1, VOCAB + 5, 2]]  # the second batch holds a token the embedding does not have
    with pytest.raises(IndexError):
        train_model(model, broken, ["a", "b"], TrainConfig(epochs=1, batch_size=1, warmup_steps=1), store=store,
                    progress=False)


def test_under_the_all_policy_a_skipped_epoch_leaves_no_record_unnamed(tmp_path):
    """Epoch 0's rows are not finite: the first record stored keeps the plain ID (it says its epoch); epoch 2's
    are not finite either: the engine still finds epoch 3's record, past the gap, for erasure."""
    from gradstore_unlearn.unlearn import Unlearner

    model = tiny_gpt2()
    store = make_store(tmp_path, model, capture_policy="all")
    with GradientCapture(model, store, policy="all", writer_threads=1) as capture:
        for epoch, scale in enumerate([float("inf"), 1.0, float("inf"), 1.0]):
            capture.epoch = epoch
            with capture.batch(["x", "y"]):
                (model(**pad_batch(SEQUENCES[:2])).loss * scale).backward()
            model.zero_grad()
            capture._queue.join()  # the writer has judged the rows before the next epoch starts
    store = GradStore.open(store.uri)
    assert sorted(store.ids()) == ["x", "x@epoch3", "y", "y@epoch3"]
    assert store.get("x").meta["epoch"] == 1
    later = Unlearner(model, store, holdout=[[1, 2, 3, 4]])._later_epoch_records(["x", "y"])
    assert later == {"x": ["x@epoch3"], "y": ["y@epoch3"]}


def test_whole_model_checkpointing_and_a_second_undifferentiated_forward_are_captured(tmp_path):
    """A checkpoint's recompute runs the model's forward inside backward, and a stop-gradient second view runs a
    forward that is never differentiated: neither is a step of its own, and neither fails the batch block."""
    import torch.utils.checkpoint as checkpoint

    model = tiny_gpt2()
    store = make_store(tmp_path, model)
    with GradientCapture(model, store, writer_threads=1) as capture:
        with capture.batch(["a", "b"]):
            batch = pad_batch(SEQUENCES[:2])
            loss = checkpoint.checkpoint(lambda i, m, labels: model(input_ids=i, attention_mask=m, labels=labels).loss,
                                         batch["input_ids"], batch["attention_mask"], batch["labels"],
                                         use_reentrant=False)
            loss.backward()
        model.zero_grad()
        with capture.batch(["c", "d"]):
            out = model(**pad_batch(SEQUENCES[2:4]))
            target = model(**pad_batch(SEQUENCES[2:4])).logits.detach()  # a stop-gradient second view
            out.loss.backward()
            del target
    assert sorted(GradStore.open(store.uri).ids()) == ["a", "b", "c", "d"]
    assert_rows_match_reference(store, model, "a", SEQUENCES[0])


def test_reentrant_whole_model_checkpointing_is_captured(tmp_path):
    """Reentrant checkpointing runs the forward without grad, then again inside backward: that recompute is
    the forward that is differentiated, and the one captured."""
    import torch.utils.checkpoint as checkpoint

    model = tiny_gpt2()
    store = make_store(tmp_path, model)
    with GradientCapture(model, store, writer_threads=1) as capture, capture.batch(["a", "b"]):
        batch = pad_batch(SEQUENCES[:2])
        gate = torch.ones(1, requires_grad=True)  # reentrant checkpointing needs an input that requires grad
        loss = checkpoint.checkpoint(
            lambda g, i, m, labels: model(input_ids=i, attention_mask=m, labels=labels).loss * g,
            gate, batch["input_ids"], batch["attention_mask"], batch["labels"], use_reentrant=True)
        loss.backward()
    assert sorted(GradStore.open(store.uri).ids()) == ["a", "b"]
    assert_rows_match_reference(store, model, "a", SEQUENCES[0])


def test_the_trainer_path_keeps_no_step_after_its_backward(tmp_path):
    """Without `batch()` blocks (IDs passed to forward) nothing may accumulate per step: the steps hold the
    batch's tensors, on the training device."""
    model = tiny_gpt2()
    store = make_store(tmp_path, model)
    with GradientCapture(model, store, writer_threads=1) as capture:
        for step in range(20):
            batch = pad_batch(SEQUENCES[:2])
            model(**batch, gradstore_ids=[f"x{step}a", f"x{step}b"]).loss.backward()
            model.zero_grad()
        assert capture._block_steps == []
    assert len(GradStore.open(store.uri).ids()) == 40


def test_under_the_all_policy_a_repeat_in_the_epoch_of_the_first_record_is_not_stored_again(tmp_path):
    model = tiny_gpt2()
    store = make_store(tmp_path, model, capture_policy="all")
    with GradientCapture(model, store, policy="all", writer_threads=1) as capture:
        capture.epoch = 1  # first seen in epoch 1 (new then, or its epoch-0 rows were not finite)...
        for _ in range(2):  # ...and twice in it (oversampling, a sampler with replacement)
            with capture.batch(["a", "b"]):
                model(**pad_batch(SEQUENCES[:2])).loss.backward()
            model.zero_grad()
        capture.epoch = 2
        with capture.batch(["a", "b"]):
            model(**pad_batch(SEQUENCES[:2])).loss.backward()
    assert sorted(GradStore.open(store.uri).ids()) == ["a", "a@epoch2", "b", "b@epoch2"]
