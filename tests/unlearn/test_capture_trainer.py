"""The Hugging Face Trainer path and the plain-loop path produce the same store for the same run."""

from __future__ import annotations

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
    return transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, num_train_epochs=1, learning_rate=0.05,
        lr_scheduler_type="constant", optim="sgd", weight_decay=0.0, max_grad_norm=0.0, report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_num_workers=0, remove_unused_columns=False, **kwargs)


def run_trainer(tmp_path, name, **kwargs):
    model = tiny_gpt2(seed=1)
    store = GradStore.create(tmp_path / name, dim=32, vocab_size=VOCAB, dtype="float32")
    callback = GradStoreCallback(store)
    trainer = InOrderTrainer(model=model, args=trainer_args(tmp_path, **kwargs), train_dataset=DATA,
                             data_collator=CaptureCollator(pad_token_id=0), callbacks=[callback])
    trainer.train()
    return GradStore.open(store.uri), callback.report


def test_trainer_and_plain_loop_write_the_same_store(tmp_path):
    trained, report = run_trainer(tmp_path, "trainer")
    assert report.examples_captured == len(DATA)

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
    import pytest

    store = GradStore.create(tmp_path / "s", dim=32, vocab_size=VOCAB, dtype="float32")
    args = trainer_args(tmp_path)
    args.remove_unused_columns = True
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        InOrderTrainer(model=tiny_gpt2(), args=args, train_dataset=DATA, data_collator=CaptureCollator(),
                       callbacks=[GradStoreCallback(store)])
