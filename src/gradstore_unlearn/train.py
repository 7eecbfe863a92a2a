"""Training GPT-2-architecture models from a config, with gradient capture into a store.

Weights are never downloaded: models are built from `MODEL_SIZES` and trained here. `train_model` is the
loop used by `gradstore train`, the demo, the ablations, and `retrain_without` (the reference model that
never saw the forget set, which evaluation compares against).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm

from gradstore import GradStore

from .capture import CaptureReport, GradientCapture

log = logging.getLogger("gradstore_unlearn")

MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 2, "n_head": 4, "n_embd": 128},  # the CPU demo: seconds per epoch on 2 cores
    "small": {"n_layer": 4, "n_head": 4, "n_embd": 256},
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768},  # GPT-2 124M's architecture
}


def build_model(size: str, vocab_size: int, n_positions: int, *, seed: int = 0, dropout: float = 0.0,
                pad_token_id: int | None = None, eos_token_id: int | None = None) -> transformers.GPT2LMHeadModel:
    """A freshly initialised GPT-2-architecture model (tied embeddings, as GPT-2)."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(MODEL_SIZES)}")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, **MODEL_SIZES[size],
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        loss_type="ForCausalLM",
    )
    model = transformers.GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # transformers infers it from the class name, which GPT-2's does not match
    return model


@dataclass
class TrainConfig:
    """Hyper-parameters of `train_model`."""

    epochs: int = 10
    batch_size: int = 16  # an epoch is split into the fewest near-equal batches of at most this size
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    seed: int = 0
    device: str = "cpu"
    autocast_dtype: str | None = None  # "bfloat16" on GPUs that have it
    pad_token_id: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        """Raise ValueError naming the first value that cannot train (zero epochs would save an untrained
        model; a zero batch size divides by zero half-way through setting up)."""
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (math.isfinite(self.lr)
                                                                                     and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float
    tokens_per_second: float
    losses: list[float] = field(default_factory=list)
    capture: CaptureReport | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["capture"] = self.capture.to_dict() if self.capture else None
        return out


def pad_batch(sequences: Sequence[Sequence[int]], pad_token_id: int, device: str | torch.device = "cpu"
              ) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask int64 [B, L] and labels with -100 on padding."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, sequence in enumerate(sequences):
        input_ids[i, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
        mask[i, : len(sequence)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def train_model(model: transformers.PreTrainedModel, sequences: Sequence[Sequence[int]], ids: Sequence[Any],
                config: TrainConfig, *, store: GradStore | None = None, capture_policy: str | None = None,
                progress: bool = True, description: str = "train", record_trained: bool = True) -> TrainResult:
    """Train `model` on token sequences (one per example ID) with AdamW, capturing into `store` if given.

    Each epoch visits every example once in a seeded random order. The learning rate warms up linearly, then
    decays with a cosine to 10%. With a store, each example's gradient rows are captured as the capture
    policy says (by default, the store's: `first`), and the model training ended with is recorded in the store's
    audit log (`record_trained_model`: where the forget audit chain starts); `record_trained=False` leaves that to
    the caller, who records the model once it is saved.
    """
    config.validate()
    if len(sequences) != len(ids):
        raise ValueError(f"{len(sequences)} sequences but {len(ids)} ids")
    device = torch.device(config.device)
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    steps_per_epoch = math.ceil(len(sequences) / config.batch_size)
    bounds = [round(b * len(sequences) / steps_per_epoch) for b in range(steps_per_epoch + 1)]
    total_steps = steps_per_epoch * config.epochs

    def lr_factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress_ = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress_, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    capture = (GradientCapture(model, store, optimizer=optimizer, policy=capture_policy)
               if store is not None else None)
    autocast = (torch.autocast(device.type, dtype=getattr(torch, config.autocast_dtype))
                if config.autocast_dtype else None)
    rng = random.Random(config.seed)
    order = list(range(len(sequences)))
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=total_steps, desc=description, disable=not progress, unit="step", leave=False, mininterval=2.0)
    try:
        if capture is not None:
            capture.start()
        for epoch in range(config.epochs):
            if capture is not None:
                capture.epoch = epoch
            rng.shuffle(order)
            for b in range(steps_per_epoch):
                # Near-equal batches (sizes differ by at most one), not full batches and a remainder: Adam takes
                # a full-size step on a batch of any size, so a remainder of one example jolts the model at every
                # epoch's end. Measured on the demo corpus, retain loss: 2.15 with a remainder of one; 1.15 and
                # 1.52 on two near-equal splits; 0.82 and 1.25 for seeds 0 and 1 on the full data, so runs of
                # this tiny model differ by ~0.4 nats from order alone.
                chosen = order[bounds[b] : bounds[b + 1]]
                batch = pad_batch([sequences[i] for i in chosen], config.pad_token_id, device)
                tokens += int(batch["attention_mask"].sum())
                with capture.batch([ids[i] for i in chosen]) if capture is not None else _null():
                    with autocast or _null():
                        loss = model(**batch).loss
                    loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.3f}")
    except BaseException:
        bar.close()
        if capture is not None:
            try:
                capture.close(failed=True)  # commits what was captured before the failure
            except Exception as close_error:  # the training failure is the one to raise, not this one
                log.warning("gradient capture did not close cleanly after training failed: %s", close_error)
        raise
    bar.close()
    report = capture.close() if capture is not None else None
    model.eval()
    if store is not None and record_trained:
        from .unlearn import record_trained_model  # (unlearn imports this module)

        record_trained_model(store, model)  # where the forget audit chain starts (rank 0 writes it)
    seconds = time.perf_counter() - start
    return TrainResult(steps=len(losses), seconds=seconds, final_loss=sum(losses[-steps_per_epoch:]) /
                       max(1, len(losses[-steps_per_epoch:])), tokens_per_second=tokens / seconds,
                       losses=losses, capture=report)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def check_device(device: str) -> str:
    """`device` if torch can run on it here, else `ValueError` naming what is wrong ("cuda" on a machine or a
    torch build without CUDA, a name torch does not know)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}: {err}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available here (torch {torch.__version__}, "
                         f"{'a CPU build' if torch.version.cuda is None else 'no GPU found'})")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def check_new_model_dir(out_dir: str | os.PathLike[str]) -> Path:
    """`out_dir` if a new model may be saved there (absent, or an empty directory), else `ValueError`: saving
    over a model would replace weights that a store's audit chain, a server or a forget may be using."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory: choose a new model directory")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty (a model is saved there?): choose a new model directory, or "
                         "remove it first")
    return out


def save_model(model: transformers.PreTrainedModel, tokenizer: Any, out_dir: str | os.PathLike[str],
               extra: dict[str, Any] | None = None) -> Path:
    """`save_pretrained` (safetensors) of the model and tokenizer, plus `gradstore-train.json` if `extra`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if extra is not None:
        (out / "gradstore-train.json").write_text(json.dumps(extra, indent=2, default=str))
    return out


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars from transformers inside the block; the caller's setting is restored after.

    transformers draws a bar on stderr for every load ("Loading weights") and save ("Writing model shards"):
    noise around a one-line error in the command line, and stray lines in the server's log.
    """
    bar_was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar_was_enabled:
            transformers.utils.logging.enable_progress_bar()


def load_model(model_dir: str | os.PathLike[str], device: str = "cpu") -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from a directory written by `save_model`."""
    path = Path(model_dir)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a saved model (no config.json)")
    with quiet_transformers():
        model = transformers.AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"  # as in build_model: the plain next-token loss, without a warning
    tokenizer = transformers.AutoTokenizer.from_pretrained(path) if (path / "tokenizer.json").exists() else None
    return model, tokenizer


def retrain_without(size: str, vocab_size: int, n_positions: int, sequences: Sequence[Sequence[int]],
                    ids: Sequence[Any], exclude: set[Any], config: TrainConfig, *, progress: bool = True
                    ) -> transformers.PreTrainedModel:
    """The gold standard of unlearning: the same recipe, trained from scratch without the `exclude` IDs."""
    keep = [i for i, example_id in enumerate(ids) if example_id not in exclude]
    model = build_model(size, vocab_size, n_positions, seed=config.seed, pad_token_id=config.pad_token_id)
    train_model(model, [sequences[i] for i in keep], [ids[i] for i in keep], config, progress=progress,
                description="retrain without forget set")
    return model
