"""Hugging Face `Trainer` integration: a collator that carries example IDs and a `TrainerCallback`.

    from gradstore_unlearn.hf import CaptureCollator, GradStoreCallback
    trainer = Trainer(model=model, args=args, train_dataset=dataset,      # items: {"id": ..., "input_ids": [...]}
                      data_collator=CaptureCollator(pad_token_id=tokenizer.pad_token_id),
                      callbacks=[GradStoreCallback(store)])
    trainer.train()

The collator puts the batch's IDs under the `gradstore_ids` key; the capture's forward pre-hook removes it
before the model sees it.

The Trainer drops item fields that the model's `forward` does not take, `id` included, unless
`TrainingArguments(remove_unused_columns=False)`; the callback checks for it when the Trainer is built.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import TrainerCallback

from gradstore import GradStore

from .capture import ID_KWARG, IGNORE_INDEX, CaptureReport, GradientCapture, LossConvention


class CaptureCollator:
    """Pads a list of `{"id": ..., "input_ids": [...]}` items (right padding) and keeps their IDs.

    Output: input_ids / attention_mask int64 [B, L], labels [B, L] (-100 on padding) and `gradstore_ids`.
    With `base`, the items (minus their ID) go to that collator instead and the IDs are added to its output.
    """

    def __init__(self, pad_token_id: int = 0, *, id_key: str = "id", max_length: int | None = None,
                 base: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None):
        self.pad_token_id = pad_token_id
        self.id_key = id_key
        self.max_length = max_length
        self.base = base

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        try:
            ids = [item[self.id_key] for item in items]
        except KeyError:
            raise KeyError(f"every item needs an {self.id_key!r} field for gradient capture (with the Trainer, "
                           "set TrainingArguments(remove_unused_columns=False) so that it reaches the collator)") from None
        if self.base is not None:
            batch = dict(self.base([{k: v for k, v in item.items() if k != self.id_key} for item in items]))
        else:
            sequences = [list(item["input_ids"])[: self.max_length] for item in items]
            length = max(len(s) for s in sequences)
            input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(items), length), dtype=torch.long)
            for i, sequence in enumerate(sequences):
                input_ids[i, : len(sequence)] = torch.as_tensor(sequence)
                mask[i, : len(sequence)] = 1
            batch = {"input_ids": input_ids, "attention_mask": mask,
                     "labels": input_ids.masked_fill(mask == 0, IGNORE_INDEX)}
        batch[ID_KWARG] = ids
        return batch


def trainer_loss_convention(args: Any, model: torch.nn.Module) -> LossConvention:
    """The constant the Trainer multiplies the model's loss by before backward (mirrors `Trainer.training_step`).

    When the model accepts loss kwargs the Trainer passes `num_items_in_batch` (target tokens over all the
    micro-batches of an accumulation step, and over all processes when `average_tokens_across_devices`), and
    then multiplies by the number of processes in the latter case; otherwise the model averages over its own
    micro-batch and the Trainer divides by the accumulation steps.
    """
    world = max(int(getattr(args, "world_size", 1) or 1), 1)
    average = bool(getattr(args, "average_tokens_across_devices", False))
    accumulation = max(int(getattr(args, "gradient_accumulation_steps", 1) or 1), 1)
    return LossConvention(multiplier=float(world) if average and world > 1 else 1.0,
                          multiplier_without_items=1.0 / accumulation)


def _accepts_loss_kwargs(model: torch.nn.Module) -> bool:
    forward = getattr(model, "forward", None)
    try:
        return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return False


class GradStoreCallback(TrainerCallback):
    """Starts a `GradientCapture` when training begins and finishes it (all rows committed) when it ends.

    Keyword arguments go to `GradientCapture` (policy, position_store, max_pending, ...). The capture's report is
    available as `callback.report` after training.
    """

    def __init__(self, store: GradStore, **capture_kwargs: Any):
        self.store = store
        self.capture_kwargs = capture_kwargs
        self.capture: GradientCapture | None = None
        self.report: CaptureReport | None = None

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if getattr(args, "remove_unused_columns", False):
            raise ValueError("GradStoreCallback needs TrainingArguments(remove_unused_columns=False): otherwise the "
                             "Trainer drops the examples' IDs before the collator sees them")

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        if model is None:
            raise ValueError("GradStoreCallback needs the model (the Trainer passes it to callbacks)")
        convention = trainer_loss_convention(args, model)
        if not _accepts_loss_kwargs(model):  # the Trainer then never passes num_items_in_batch
            convention = LossConvention(convention.multiplier_without_items, convention.multiplier_without_items)
        self.capture = GradientCapture(model, self.store, optimizer=optimizer, loss_convention=convention,
                                       writer_name=f"trainer-rank{getattr(args, 'process_index', 0)}",
                                       **self.capture_kwargs)
        self.capture.start()

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.capture is not None:
            self.capture.epoch = round(state.epoch or 0)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.capture is not None:
            self.capture.global_step = state.global_step

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.capture is not None:
            self.report = self.capture.close()
            self.capture = None
