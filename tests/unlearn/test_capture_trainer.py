"""The Hugging Face Trainer path and the plain-loop path produce the same store for the same run."""

from __future__ import annotations

import pytest
import torch
import transformers
from test_capture import reference_rows
from tiny_models import VOCAB, pad_batch, tiny_gpt2
from torch.utils.data import SequentialSampler

from gradstore import GradStore
from gradstore_unlearn.capture import GradientCapture
from gradstore_unlearn.hf import CaptureCollator, GradStoreCallback

DATA = [{"id": f"ex{i}", "input_ids": [(7 * i + 3 * j) % VOCAB for j in range(3 + i % 5)]} for i in range(8)]


class InOrderTrainer(transformers.Trainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def trainer_args(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, num_train_epochs=1,
        learning_rate=0.05,
        lr_scheduler_type="constant", optim="sgd", weight_decay=0.0, max_grad_norm=0.0, report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_num_workers=0, remove_unused_columns=False)
    return transformers.TrainingArguments(**{**defaults, **kwargs})


def run_trainer(tmp_path, name, model=None, **kwargs):
    model = model if model is not None else tiny_gpt2(seed=1)
    store = GradStore.create(tmp_path / name, dim=32, vocab_size=VOCAB, dtype="float32")
    callback = GradStoreCallback(store)
    trainer = InOrderTrainer(model=model, args=trainer_args(tmp_path, **kwargs), train_dataset=DATA,
                             data_collator=CaptureCollator(pad_token_id=0), callbacks=[callback])
    trainer.train()
    return GradStore.open(store.uri), callback.report


def assert_rows_are_per_example(store, model, items):
    for item in items:
        ex = store.get(item["id"])
        expected = reference_rows(model, item["input_ids"])
        for token, row in zip(ex.token_ids.tolist(), ex.rows, strict=True):
            torch.testing.assert_close(row.double(), expected[token], rtol=1e-4, atol=1e-6)


def test_trainer_and_plain_loop_write_the_same_store(tmp_path):
    from gradstore_unlearn.unlearn import model_hash

    model = tiny_gpt2(seed=1)
    trained, report = run_trainer(tmp_path, "trainer", model=model)
    assert report.examples_captured == len(DATA)
    # The callback recorded the model training ended with: where the forget audit chain starts.
    assert [(r["kind"], r["model_hash"]) for r in trained.audit_log()] == [("trained", model_hash(model))]

    model = tiny_gpt2(seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    store = GradStore.create(tmp_path / "plain", dim=32, vocab_size=VOCAB, dtype="float32")
    model.train()
    with GradientCapture(model, store, optimizer=optimizer) as capture:
        for start in range(0, len(DATA), 2):
            items = DATA[start : start + 2]
            batch = pad_batch([x["input_ids"] for x in items])
            # The same loss as the Trainer's: it passes its own count of label tokens as num_items_in_batch.
            with capture.batch([x["id"] for x in items]):
                model(**batch, num_items_in_batch=batch["labels"].ne(-100).sum()).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    plain = GradStore.open(store.uri)
    assert sorted(trained.ids()) == sorted(plain.ids())
    for example_id in plain.ids():
        a, b = trained.get(example_id), plain.get(example_id)
        assert torch.equal(a.token_ids, b.token_ids)
        torch.testing.assert_close(a.rows, b.rows, rtol=1e-4, atol=1e-7)
        assert a.meta["step"] == b.meta["step"] and a.meta["lr"] == b.meta["lr"] == 0.05


def test_trainer_with_gradient_accumulation_stores_each_examples_own_gradient(tmp_path):
    # The first optimizer step accumulates two micro-batches (4 examples) computed at the initial weights,
    # with the loss normalised by the tokens of both micro-batches: the rows must still be per-example.
    trained, _ = run_trainer(tmp_path, "ga", gradient_accumulation_steps=2)
    initial = tiny_gpt2(seed=1)
    for item in DATA[:4]:
        ex = trained.get(item["id"])
        expected = reference_rows(initial, item["input_ids"])
        for token, row in zip(ex.token_ids.tolist(), ex.rows, strict=True):
            torch.testing.assert_close(row.double(), expected[token], rtol=1e-4, atol=1e-6)


def test_callback_refuses_arguments_that_would_drop_the_ids(tmp_path):
    store = GradStore.create(tmp_path / "s", dim=32, vocab_size=VOCAB, dtype="float32")
    args = trainer_args(tmp_path)
    args.remove_unused_columns = True
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        InOrderTrainer(model=tiny_gpt2(), args=args, train_dataset=DATA, data_collator=CaptureCollator(),
                       callbacks=[GradStoreCallback(store)])


def test_a_short_last_accumulation_window_without_loss_kwargs(tmp_path):
    # Without num_items_in_batch the Trainer divides each micro-batch's loss by the micro-batches in its
    # window: 4 micro-batches with accumulation 3 make windows of 3 and 1.
    model = tiny_gpt2(seed=1)
    model.accepts_loss_kwargs = False
    trained, report = run_trainer(tmp_path, "short-window", model=model, gradient_accumulation_steps=3,
                                  learning_rate=0.0)
    assert report.examples_captured == len(DATA)
    assert_rows_are_per_example(trained, tiny_gpt2(seed=1), DATA)


def test_fp16_loss_scaling_is_undone(tmp_path):
    store = GradStore.create(tmp_path / "fp16", dim=32, vocab_size=VOCAB, dtype="float32")
    callback = GradStoreCallback(store)
    trainer = InOrderTrainer(model=tiny_gpt2(seed=1), args=trainer_args(tmp_path, learning_rate=0.0),
                             train_dataset=DATA, data_collator=CaptureCollator(pad_token_id=0),
                             callbacks=[callback])
    # accelerate makes no GradScaler on the CPU; this one stands in for the one it makes for fp16 on a GPU and
    # reaches the capture the same way, through the AcceleratedOptimizer that the Trainer hands to callbacks.
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1)
    trainer.train()
    assert trainer.accelerator.scaler.get_scale() == 2.0**20  # the scale changed at every step
    assert_rows_are_per_example(GradStore.open(store.uri), tiny_gpt2(seed=1), DATA)


class FailOnce(transformers.TrainerCallback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            self.at_step = None
            raise RuntimeError("simulated failure in training")


def test_train_raising_then_retried_keeps_every_example(tmp_path):
    # train() raises, so on_train_end never runs; the retry must close the first capture (committing its rows
    # and taking its hooks off the model) before it starts its own.
    model = tiny_gpt2(seed=1)
    store = GradStore.create(tmp_path / "retry", dim=32, vocab_size=VOCAB, dtype="float32")
    callback = GradStoreCallback(store)
    trainer = InOrderTrainer(model=model, args=trainer_args(tmp_path), train_dataset=DATA,
                             data_collator=CaptureCollator(pad_token_id=0), callbacks=[callback, FailOnce(2)])
    with pytest.raises(RuntimeError, match="simulated failure"):
        trainer.train()
    first = callback.capture
    trainer.train()
    assert not any(thread.is_alive() for thread in first._threads) and not model._forward_pre_hooks
    assert sorted(GradStore.open(store.uri).ids()) == sorted(x["id"] for x in DATA)
    assert first.report.examples_captured == 4 and callback.report.examples_captured == 4


def test_a_writer_failure_stops_the_trainer_at_the_next_step(tmp_path, monkeypatch):
    from gradstore.writer import StoreWriter

    real_append, calls = StoreWriter.append, []

    def append_failing_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("the disk is full")
        return real_append(self, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "append", append_failing_once)
    store = GradStore.create(tmp_path / "fails", dim=32, vocab_size=VOCAB, dtype="float32")
    callback, steps = GradStoreCallback(store), []

    class WaitForTheWriter(transformers.TrainerCallback):  # so that the failure is known before the next step
        def on_step_end(self, args, state, control, **kwargs):
            callback.capture._queue.join()
            steps.append(state.global_step)

    trainer = InOrderTrainer(model=tiny_gpt2(seed=1), args=trainer_args(tmp_path), train_dataset=DATA,
                             data_collator=CaptureCollator(pad_token_id=0),
                             callbacks=[callback, WaitForTheWriter()])
    with pytest.raises(RuntimeError, match="the disk is full"):
        trainer.train()
    assert steps == [1, 2]  # of 4: the third step's forward raised
    trainer.train()  # a retry commits the first batch, captured before the failure, and captures the rest
    assert sorted(GradStore.open(store.uri).ids()) == sorted(x["id"] for x in DATA)


def test_resuming_mid_epoch_keeps_the_epoch(tmp_path):
    # 4 steps per epoch; the first run stops after 3 (checkpoint at epoch 0.75), the resumed one finishes
    # epoch 0 (ex6, ex7) and runs epoch 1. Under policy 'all' each example has an epoch-0 and an epoch-1
    # record.
    store = GradStore.create(tmp_path / "resume", dim=32, vocab_size=VOCAB, dtype="float32",
                             capture_policy="all")
    for max_steps, resume in [(3, None), (-1, str(tmp_path / "out" / "checkpoint-3"))]:
        args = trainer_args(tmp_path, num_train_epochs=2, max_steps=max_steps, save_strategy="steps",
                            save_steps=3)
        trainer = InOrderTrainer(model=tiny_gpt2(seed=1), args=args, train_dataset=DATA,
                                 data_collator=CaptureCollator(pad_token_id=0),
                                 callbacks=[GradStoreCallback(GradStore.open(store.uri), policy="all")])
        trainer.train(resume_from_checkpoint=resume)
    store = GradStore.open(store.uri)
    for item in DATA:
        assert store.get(item["id"]).meta["epoch"] == 0
        assert store.get(f"{item['id']}@epoch1").meta["epoch"] == 1
    assert store.get("ex6").meta["step"] == 3
