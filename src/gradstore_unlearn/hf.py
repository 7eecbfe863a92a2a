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
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import TrainerCallback

from gradstore import GradStore

from .capture import ID_KWARG, IGNORE_INDEX, CaptureReport, GradientCapture, LossConvention

log = logging.getLogger("gradstore_unlearn.hf")


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


def trainer_loss_convention(args: Any, model: torch.nn.Module, window: int | None = None) -> LossConvention:
    """The constant the Trainer multiplies the model's loss by before backward (mirrors `Trainer.training_step`).

    When the model accepts loss kwargs the Trainer passes `num_items_in_batch` (target tokens over all the
    micro-batches of an accumulation step, and over all processes when `average_tokens_across_devices`), and
    then multiplies by the number of processes in the latter case; otherwise the model averages over its own
    micro-batch and the Trainer divides by the number of micro-batches in the current accumulation window
    (`window`: the last window of an epoch may be short; default `gradient_accumulation_steps`). The fp16
    GradScaler's factor is not part of it: the capture reads it from the scaler.
    """
    world = max(int(getattr(args, "world_size", 1) or 1), 1)
    average = bool(getattr(args, "average_tokens_across_devices", False))
    accumulation = window or max(int(getattr(args, "gradient_accumulation_steps", 1) or 1), 1)
    convention = LossConvention(multiplier=float(world) if average and world > 1 else 1.0,
                                multiplier_without_items=1.0 / accumulation)
    if not _accepts_loss_kwargs(model):  # the Trainer then never passes num_items_in_batch
        convention = LossConvention(convention.multiplier_without_items, convention.multiplier_without_items)
    return convention


def _accepts_loss_kwargs(model: torch.nn.Module) -> bool:
    """Whether the Trainer passes `num_items_in_batch` to the model: the model's `accepts_loss_kwargs` when it
    says, else whether `forward` takes **kwargs (the Trainer's own test)."""
    model = getattr(model, "module", model)  # DDP
    model = getattr(model, "get_base_model", lambda: model)()  # PEFT
    if hasattr(model, "accepts_loss_kwargs"):
        return bool(model.accepts_loss_kwargs)
    forward = getattr(model, "forward", None)
    try:
        return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return False


def _update_steps_per_epoch(args: Any, train_dataloader: Any) -> tuple[int | None, int | None]:
    """(micro-batches, optimizer steps) per epoch, as the Trainer computes them; (None, max_steps or None)
    for a dataloader without a length."""
    accumulation = max(int(getattr(args, "gradient_accumulation_steps", 1) or 1), 1)
    try:
        batches = len(train_dataloader)
    except (TypeError, NotImplementedError):
        max_steps = int(getattr(args, "max_steps", -1) or -1)
        return None, max_steps if max_steps > 0 else None
    return batches, max(-(-batches // accumulation), 1)


class GradStoreCallback(TrainerCallback):
    """Starts a `GradientCapture` when training begins and finishes it (all rows committed) when it ends.

    Keyword arguments go to `GradientCapture` (policy, position_store, max_pending, ...). The capture's report is
    available as `callback.report` after training. Under fp16 the capture finds the GradScaler on the
    optimizer the Trainer passes (accelerate's), and divides the rows by its scale.

    If `train()` raises, the Trainer never calls `on_train_end` and the capture stays open: the next `train()`
    closes it first (committing the rows it had appended), and otherwise they are committed when the process
    exits.
    """

    def __init__(self, store: GradStore, **capture_kwargs: Any):
        self.store = store
        self.capture_kwargs = capture_kwargs
        self.capture: GradientCapture | None = None
        self.report: CaptureReport | None = None
        # Where the Trainer is, mirrored from its own arithmetic (set in on_train_begin).
        self._model: Any = None
        self._batches_per_epoch: int | None = None
        self._steps_per_epoch: int | None = None
        self._resumed_at = 0
        self._epoch: int | None = None
        self._window_index = 0

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if getattr(args, "remove_unused_columns", False):
            raise ValueError("GradStoreCallback needs TrainingArguments(remove_unused_columns=False): otherwise the "
                             "Trainer drops the examples' IDs before the collator sees them")

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("GradStoreCallback needs the model (the Trainer passes it to callbacks)")
        if self.capture is not None:
            # A previous train() raised, so on_train_end never ran: commit what that capture appended and take
            # its hooks off the model (they would take this run's IDs). Its failure, if it had one, belonged
            # to that run, which has already ended with an exception.
            stale, self.capture = self.capture, None
            try:
                stale.close(failed=True)
            except RuntimeError as err:
                log.error("the capture of an earlier train() call that raised had failed too: %s", err)
        self._model = model
        self._batches_per_epoch, self._steps_per_epoch = _update_steps_per_epoch(args, train_dataloader)
        self._resumed_at = state.global_step  # > 0 when resuming from a checkpoint
        self._epoch = None
        self._window_index = 0
        self.capture = GradientCapture(model, self.store, optimizer=optimizer,
                                       loss_convention=trainer_loss_convention(args, model),
                                       writer_name=f"trainer-rank{getattr(args, 'process_index', 0)}",
                                       **self.capture_kwargs)
        self.capture.start()

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.capture is None:
            return
        # The Trainer's own epoch counter: on resume state.epoch is the checkpoint's fractional epoch (0.75 is
        # still epoch 0), and the first epoch is global_step // steps-per-epoch; each later one is one more.
        if self._epoch is None:
            if self._steps_per_epoch:
                self._epoch = state.global_step // self._steps_per_epoch
            else:
                self._epoch = math.floor((state.epoch or 0) + 1e-6)
            resumed_mid_epoch = self._resumed_at > 0 and not getattr(args, "ignore_data_skip", False)
            self._window_index = (state.global_step % self._steps_per_epoch
                                  if resumed_mid_epoch and self._steps_per_epoch else 0)
        else:
            self._epoch += 1
            self._window_index = 0
        self.capture.epoch = self._epoch

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.capture is None:
            return
        self.capture.global_step = state.global_step
        # Without num_items_in_batch the Trainer divides each micro-batch's loss by the number of
        # micro-batches in this accumulation window, which is shorter for the last window of an epoch that
        # does not divide evenly (mirrors the Trainer's `remainder`).
        window = None
        if self._batches_per_epoch is not None and self._window_index == self._steps_per_epoch - 1:
            accumulation = max(int(getattr(args, "gradient_accumulation_steps", 1) or 1), 1)
            window = self._batches_per_epoch % accumulation or accumulation
        self.capture.loss_convention = trainer_loss_convention(args, self._model, window)
        self._window_index += 1

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.capture is not None:
            capture, self.capture = self.capture, None
            self.report = capture.report  # also when close() raises: what was captured, and committed
            capture.close()
            if getattr(state, "is_world_process_zero", True):
                from .unlearn import record_trained_model  # (unlearn imports the capture, which this imports)

                # The model as training left it (best checkpoint loaded, if asked): where the audit chain starts.
                record_trained_model(self.store, self._model)
