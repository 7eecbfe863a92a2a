"""Capture each training example's input-embedding gradient rows during training, into a `GradStore`.

Why the embedding *output*: GPT-2 ties `lm_head` to `wte`, so `wte.weight.grad` is dense over the whole
vocabulary. The sparse, per-example object is the gradient at the embedding lookup's output, d loss / d e[i, t]
for example i and position t: scattering it by token id gives exactly example i's rows of d loss / d W_emb
through the lookup, and only for the tokens present in the example (repeats summed).

Why one ordinary backward gives every example's rows: with a loss that is a sum of per-example terms, the
gradient at example i's embedding output depends on example i only. The loss the model returns mixes a
1/N over all target tokens of the batch (N = `num_items_in_batch` when the caller passes it, else the batch's
target count), so the rows are rescaled by N / n_i (n_i = example i's target count) to become the gradient
of *that example's own mean token loss* — what `gradstore_unlearn.evaluate.sequence_losses` measures and
what the unlearning engine ascends. Under fp16 mixed precision the backward runs on the loss times a
`GradScaler`'s dynamic scale; the rows are divided by the scale that backward used (read from the scaler's
device tensor, so no host sync).

Cost: nothing on the training stream waits for the host. The hook copies the per-position gradient (and the
batch's token ids and masks) to pinned host memory on a side CUDA stream and records an event; a background
thread waits on that event, selects the non-padding positions, sums repeated tokens in float32, rescales,
and appends to the store (which compresses and writes). The queue between them is bounded: if the store falls
behind, the training thread blocks — nothing is dropped — and the time it waited is reported as stall time.

Failures: an example whose rows are not finite (a GradScaler overflow step, which the optimizer skips too) is
not stored, and counted; it is captured the next time it is seen. Any other writer failure (store I/O, an ID
already stored) is fatal: it is raised at the next captured forward and again by `close()`, which still
commits every row appended before it.

Plain PyTorch:

    capture = GradientCapture(model, store, optimizer=opt)
    with capture:
        for epoch in range(epochs):
            capture.epoch = epoch
            for batch in loader:
                with capture.batch(batch["ids"]):
                    model(input_ids=..., attention_mask=..., labels=...).loss.backward()
                opt.step(); opt.zero_grad()
    print(capture.report)

Hugging Face `Trainer`: see `gradstore_unlearn.hf` (a collator that carries IDs and a `TrainerCallback`).
"""

from __future__ import annotations

import logging
import math
import queue
import re
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from gradstore import GradStore, InvalidInputError
from gradstore._encoding import MAX_ID_BYTES, normalize_id
from gradstore_kernels import KernelInputError, token_cross_entropy

log = logging.getLogger("gradstore_unlearn.capture")

ID_KWARG = "gradstore_ids"  # a forward() keyword that carries the batch's example IDs (popped before the model sees it)
POLICIES = ("first", "all", "off")
IGNORE_INDEX = -100


def _inside_backward() -> bool:
    """Whether autograd is running a backward pass on this thread now (a recompute of checkpointing)."""
    return torch._C._current_graph_task_id() != -1


def epoch_record_id(example_id: int | str, epoch: int) -> int | str:
    """Store key of an example's record for a later epoch under the `all` policy (epoch 0 keeps the plain ID)."""
    return example_id if epoch == 0 else f"{example_id}@epoch{epoch}"


_LATER_EPOCH = re.compile(r".+@epoch[1-9][0-9]*")


def is_later_epoch_record(key: int | str) -> bool:
    """Whether a store key has the form `epoch_record_id` gives a later epoch's record (meaningful only in a
    store captured with the `all` policy, where such keys are copies of an example, not examples)."""
    return isinstance(key, str) and _LATER_EPOCH.fullmatch(key) is not None


@dataclass
class CaptureReport:
    """What a capture did. Bytes are logical (rows x D x itemsize of the store's dtype)."""

    steps: int = 0
    examples_seen: int = 0
    examples_captured: int = 0
    examples_skipped: int = 0
    examples_nonfinite: int = 0  # rows not finite (fp16 overflow steps): not stored, captured when next seen
    rows_captured: int = 0
    bytes_captured: int = 0
    bytes_transferred: int = 0
    stall_seconds: float = 0.0
    writer_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LossConvention:
    """How the loss passed to `backward()` relates to the per-token cross-entropies.

    Hugging Face causal LMs return sum(ce) / N; training loops then often multiply that by a constant
    (1 / gradient-accumulation steps, the number of processes when tokens are averaged across devices).
    `multiplier` is that constant as seen *when `num_items_in_batch` is passed* and `multiplier_without_items`
    when it is not (the Trainer treats the two cases differently). A `GradScaler`'s factor is not constant:
    pass the scaler to `GradientCapture` instead.
    """

    multiplier: float = 1.0
    multiplier_without_items: float = 1.0


@dataclass
class _Step:
    """What the forward pass of one captured batch leaves for the gradient hook."""

    ids: list[int | str]
    record_ids: list[int | str | None]  # store key per example, None = not captured
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    labels: torch.Tensor | None
    num_items: torch.Tensor | float | None
    step: int
    epoch: int
    lr: float | None
    multiplier: float
    losses: torch.Tensor | None = None
    hooked: bool = False  # a gradient hook is on the embedding output and has not fired yet
    unhooked_output: torch.Tensor | None = None  # the embedding output, while it does not (yet) require grad
    taken: bool = False  # the gradient was taken: later differentiations of this forward are ignored
    in_backward: bool = False  # set up by a forward that backward ran (reentrant checkpointing's recompute)


@dataclass
class _Job:
    """A batch's gradient and inputs on the host (valid once `ready` has fired), for the background writer."""

    step: _Step
    host: dict[str, torch.Tensor]
    ready: Any = None  # torch.cuda.Event, or None when the copy was synchronous
    created: float = field(default_factory=time.perf_counter)


class GradientCapture:
    """Hooks on a causal LM that stream per-example embedding-gradient rows into a store.

    model: a Hugging Face causal LM (anything with `get_input_embeddings()`), possibly wrapped in DDP.
    store: the `GradStore` to write into (its `dim` must match the embedding width).
    policy: `first` (an ID is captured the first time it is seen; IDs already in the store count as seen),
        `all` (once per epoch; epoch e > 0 under the key `epoch_record_id(id, e)`), or `off`.
        Default: the store's capture policy.
    optimizer: if given, its learning rate and class name are recorded and its steps counted as global steps.
    scaler: the `torch.amp.GradScaler` whose `scale(loss)` is backpropagated (fp16 mixed precision); rows are
        divided by its current scale. Default: the optimizer's own when it has one (accelerate's
        `AcceleratedOptimizer`, which is what the Hugging Face Trainer hands to callbacks).
    position_store: optionally also capture position-embedding rows (keyed by position) into a second store
        of the same dim, whose vocab_size is at least the longest sequence.
    record_loss: compute each example's own mean token loss from the logits (no grad) and store it.
    max_pending: bound of the queue to the writer, in batches; a full queue blocks training (stall time).
    transfer_dtype: dtype of the device-to-host copy (float32 keeps every bit until the single final rounding).
    writer_buffer_bytes: segments are committed when this much is buffered, and at the end.
    """

    def __init__(self, model: torch.nn.Module, store: GradStore, *, policy: str | None = None,
                 optimizer: torch.optim.Optimizer | None = None, scaler: Any = None,
                 position_store: GradStore | None = None,
                 record_loss: bool = True, max_pending: int = 4, transfer_dtype: torch.dtype = torch.float32,
                 writer_buffer_bytes: int = 64 << 20, writer_name: str | None = None, writer_threads: int = 2,
                 loss_convention: LossConvention | None = None):
        self.model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        self.store = store
        self.policy = policy or store.config.capture.get("policy", "first")
        if self.policy == "all" and store.config.capture.get("policy") != "all":
            # Later-epoch records are copies of an example; only a store that says so treats them as copies
            # (when it counts examples, samples retained ones, or matches texts).
            raise InvalidInputError(
                f"capture policy 'all' needs a store created with capture_policy='all'; {store.uri} was created "
                f"with {store.config.capture.get('policy')!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown capture policy {self.policy!r}; choose one of {POLICIES}")
        embedding = self.model.get_input_embeddings()
        if embedding is None or embedding.weight.shape[1] != store.dim:
            width = None if embedding is None else embedding.weight.shape[1]
            raise ValueError(f"the model's input embedding has width {width}, the store's dim is {store.dim}")
        if embedding.weight.shape[0] > store.vocab_size:
            raise ValueError(f"the model's vocabulary ({embedding.weight.shape[0]}) exceeds the store's "
                             f"vocab_size ({store.vocab_size})")
        if position_store is not None and position_store.dim != store.dim:
            raise ValueError(f"the position store's dim is {position_store.dim}, the store's is {store.dim}: "
                             "position rows are the same per-position gradient as token rows")
        self.embedding = embedding
        # Wrapped optimizers (accelerate's AcceleratedOptimizer) keep the real one in `.optimizer`, and the
        # GradScaler that `accelerator.backward` multiplies the loss by in `.scaler`.
        self.scaler = scaler if scaler is not None else getattr(optimizer, "scaler", None)
        self.optimizer = getattr(optimizer, "optimizer", optimizer)
        self.position_store = position_store
        self.record_loss = record_loss
        self.transfer_dtype = transfer_dtype
        self.loss_convention = loss_convention or LossConvention()
        self.report = CaptureReport()
        self._epoch = 0
        self.global_step = 0
        # Several writer threads, each with a writer of its own (segments are independent): deduplication
        # happens on the device, but validating, converting and compressing ~8 MB of rows per GPT-2 step took a
        # single thread ~55 ms on an H200 host, as long as the step itself (blosc and numpy release the GIL).
        name = writer_name or f"capture-{uuid.uuid4().hex[:6]}"
        self._writers = [store.writer(buffer_bytes=writer_buffer_bytes, name=f"{name}-w{k}")
                         for k in range(max(1, writer_threads))]
        self._position_writer = (position_store.writer(buffer_bytes=writer_buffer_bytes, name=writer_name)
                                 if position_store is not None else None)
        self._seen: set[int | str] = set(store.ids()) if self.policy != "off" else set()
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_pending)
        self._pending_ids: list[Any] | None = None
        self._pending_step: int | None = None
        self._pending_lr: float | None = None
        self._current: _Step | None = None
        self._hooks: list[Any] = []
        self._threads: list[threading.Thread] = []
        self._report_lock = threading.Lock()
        self._error: BaseException | None = None
        self._copy_stream = None
        self._closed = False
        self._block_steps: list[_Step] = []  # the steps the current `batch()` block's forwards set up
        self._plain_epoch: dict[int | str, int] = {}  # policy `all`: the epoch whose record took the plain ID
        self._finalizer: weakref.finalize | None = None
        self._warned_twice_differentiated = False
        self._warned_no_logits = False

    # ------------------------------------------------------------------------------------------ lifecycle
    @property
    def epoch(self) -> int:
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        if value != self._epoch and self._threads and self.policy != "off":
            self.synchronize()
        self._epoch = int(value)

    def synchronize(self) -> None:
        """Commit everything captured so far and learn what other ranks captured (called at epoch boundaries).

        Under DDP a sampler that reshuffles per epoch hands an example to another rank in the next epoch; that
        rank must know it was already captured. So at an epoch boundary every rank commits its rows, waits for
        the others (a barrier, once per epoch) and adds the store's IDs to what it has seen.
        """
        self._queue.join()
        self._raise_if_failed()
        for writer in self._writers:
            writer.flush()
        if self._position_writer is not None:
            self._position_writer.flush()
        _barrier()
        self.store.refresh()
        self._seen.update(self.store.ids())

    def __enter__(self) -> GradientCapture:
        self.start()
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(failed=exc_type is not None)

    def start(self) -> None:
        """Install the hooks and start the background writer.

        Refused on a closed capture (its writers are closed) and while another capture's hooks are on the
        model: its forward pre-hook would take every batch's IDs first, and this capture would store nothing.
        """
        if self._threads:
            return
        if self._closed:
            raise RuntimeError("this GradientCapture was closed (its writers with it); create a new one")
        for hook in self.model._forward_pre_hooks.values():
            other = getattr(hook, "__self__", None)
            if isinstance(other, GradientCapture) and other is not self:
                raise RuntimeError("another GradientCapture is active on this model (its hooks are "
                                   "installed): close() it before starting a new one (after a Trainer's train() "
                                   "raised, that is the callback's `capture`)")
        self._hooks = [
            self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            self.embedding.register_forward_hook(self._after_embedding),
            self.model.register_forward_hook(self._after_forward, with_kwargs=True),
        ]
        if self.optimizer is not None:
            self._hooks.append(self.optimizer.register_step_post_hook(self._after_optimizer_step))
        self._threads = [threading.Thread(target=self._drain, args=(writer,), name=f"gradstore-capture-{k}",
                                          daemon=True) for k, writer in enumerate(self._writers)]
        for thread in self._threads:
            thread.start()
        # A capture that is never closed (an exception escaped a loop without `with`, or the Trainer's
        # train() raised, so on_train_end never ran) still commits what it appended when the interpreter
        # exits. The finalizer holds the capture (through the threads), so it runs at exit or is detached by
        # close(), never earlier.
        self._finalizer = weakref.finalize(self, _commit_at_exit, self._queue, self._threads,
                                           self._all_writers())

    def close(self, *, failed: bool = False) -> CaptureReport:
        """Remove the hooks, wait for the writer to finish, commit everything. Re-raises a writer failure.

        Every writer is closed (committing every row appended, also those appended before a failure) before a
        failure is raised, so a failure loses only the batches it concerns. `failed`: training is being
        abandoned (an exception is on its way): under DDP this rank then does not wait at the closing barrier
        for ranks that are still training, which would hold the real error behind a collective's timeout.
        """
        if self._closed:
            return self.report
        self._closed = True
        if self._finalizer is not None:
            self._finalizer.detach()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        self._threads = []
        commit_errors = []
        for writer in self._all_writers():
            try:
                writer.close()
            except Exception as err:  # the other writers' rows must still be committed
                log.exception("gradient capture: committing writer %s failed", writer.name)
                commit_errors.append(err)
        # A distributed sampler may pad an epoch by repeating examples on other ranks: the same ID can then be
        # captured twice. Once every rank has committed, one of them removes the extra copies. A rank that
        # failed (its writer, or its training) skips the barrier: the others are still in training's own
        # collectives, so it would wait there until the process group times out, and only then raise. It
        # raises at once instead, and the launcher tears the job down, as for any failing rank.
        if not (failed or self._error is not None or commit_errors) and _barrier():
            if torch.distributed.get_rank() == 0 and self._error is None and not commit_errors:
                self.store.refresh()
                self.store.remove_shadowed()
            _barrier()
        error, self._error = self._error, None
        if commit_errors:
            raise RuntimeError(f"gradient capture could not commit its rows: {commit_errors[0]}"
                               + (f" (and earlier, in the background writer: {error})" if error else "")
                               ) from commit_errors[0]
        if error is not None:
            raise RuntimeError(f"gradient capture failed in the background writer: {error} (every row "
                               "appended before the failure was committed)") from error
        return self.report

    def _all_writers(self) -> list[Any]:
        return self._writers + ([self._position_writer] if self._position_writer is not None else [])

    @contextmanager
    def batch(self, ids: Sequence[Any], *, step: int | None = None, lr: float | None = None) -> Iterator[None]:
        """The IDs of the examples of the next forward/backward (in batch order), for the plain-loop API."""
        self._raise_if_failed()
        self._pending_ids, self._pending_step, self._pending_lr = list(ids), step, lr
        self._block_steps = []
        try:
            yield
            # Several forwards may run in one block (a second forward under stop-gradient, a recompute): the
            # block is fine if one of them was differentiated.
            steps = self._block_steps
            if steps and not any(s.taken for s in steps) and any(s.hooked for s in steps):
                raise RuntimeError("capture.batch(): the forward pass ran but backward() was not called inside the block")
        finally:
            self._pending_ids = self._pending_step = self._pending_lr = None
            self._current = None
            self._block_steps = []

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"gradient capture failed in the background writer: {self._error}") from self._error

    def _after_optimizer_step(self, *args: Any) -> None:
        self.global_step += 1

    # ------------------------------------------------------------------------------------------------ hooks
    def _before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        ids = kwargs.pop(ID_KWARG, None)
        if ids is None:
            ids = self._pending_ids
        in_backward = _inside_backward()
        if in_backward and self._current is not None and not self._current.in_backward:
            # A forward that backward itself runs (non-reentrant checkpointing recomputing the whole model): the
            # step being differentiated is the one the original forward set up; this one is not another step.
            # (Under reentrant checkpointing the original forward ran without grad and set up nothing: its
            # recompute is the forward that is differentiated, and is captured.)
            return args, kwargs
        self._current = None
        if ids is None or self.policy == "off" or not module.training or not torch.is_grad_enabled():
            return args, kwargs  # evaluation, generation, or a forward without IDs: not captured
        # The Trainer path makes no per-step call of its own: a writer failure stops training here, at the
        # next captured forward, rather than at the end of the epoch with every batch since then dropped.
        self._raise_if_failed()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("gradient capture needs input_ids (inputs_embeds-only forwards carry no tokens)")
        if len(ids) != input_ids.shape[0]:
            raise ValueError(f"{len(ids)} example IDs for a batch of {input_ids.shape[0]}")
        if self.position_store is not None and input_ids.shape[1] > self.position_store.vocab_size:
            raise ValueError(f"a batch of {input_ids.shape[1]} positions, but the position store keys "
                             f"positions by token id and its vocab_size is {self.position_store.vocab_size}")
        # Keys are only proposed here; they count as seen once backward hands the gradient over (`_claim`),
        # so that a forward or backward that fails (an OOM, then the same batch retried) leaves them to the
        # retry.
        example_ids = [normalize_id(raw) for raw in ids]
        record_ids: list[int | str | None] = []
        in_batch: set[int | str] = set()
        for example_id in example_ids:
            key = self._record_key(example_id)
            if key in self._seen or key in in_batch:
                record_ids.append(None)
            else:
                in_batch.add(key)
                record_ids.append(key)
        if not in_batch:
            self.report.examples_seen += len(ids)
            self.report.examples_skipped += len(ids)
            return args, kwargs
        num_items = kwargs.get("num_items_in_batch")
        convention = self.loss_convention
        lr = self._pending_lr
        if lr is None and self.optimizer is not None:
            lr = float(self.optimizer.param_groups[0]["lr"])
        self._current = step = _Step(
            ids=example_ids, record_ids=record_ids, input_ids=input_ids,
            attention_mask=kwargs.get("attention_mask"), labels=kwargs.get("labels"), num_items=num_items,
            step=self.global_step if self._pending_step is None else self._pending_step, epoch=self.epoch, lr=lr,
            multiplier=convention.multiplier if num_items is not None else convention.multiplier_without_items,
            in_backward=in_backward,
        )
        if self._pending_ids is not None:  # inside a `batch()` block (the Trainer path has none to check)
            self._block_steps.append(step)
        return args, kwargs

    def _record_key(self, example_id: int | str) -> int | str:
        """The store key of an example's record in this epoch, checked here rather than by the writer.

        Under `all`, an example's first record keeps its plain ID whatever the epoch (its epoch-0 rows may
        have been skipped as not finite), so that the ID always names a record; later ones get
        `epoch_record_id` keys.
        """
        if self.policy == "first" or example_id not in self._seen:
            return example_id
        if self._plain_epoch.get(example_id) == self.epoch:
            return example_id  # its plain record is this epoch's: seen, so a repeat in this epoch is skipped
        key = epoch_record_id(example_id, self.epoch)
        try:
            return normalize_id(key)
        except InvalidInputError as err:
            suffix = len(f"@epoch{self.epoch}")
            raise InvalidInputError(
                f"under capture policy 'all' the epoch-{self.epoch} record of an example is stored under "
                f"'<ID>@epoch{self.epoch}', and for ID {str(example_id)[:40]!r}... that key is too long "
                f"({err}); keep string IDs to {MAX_ID_BYTES - suffix} UTF-8 bytes or fewer") from None

    def _after_embedding(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        current = self._current
        if current is not None and _inside_backward() != current.in_backward:
            return  # a recompute of a step set up outside backward: its gradient comes through the original
        if current is None or current.hooked or current.unhooked_output is not None:
            return  # not captured, or the embedding was already called in this forward
        if output.requires_grad:
            self._hook(current, output)
        else:
            # Not necessarily final: a forward hook registered after this one (`enable_input_require_grads()`)
            # may still set requires_grad on this very tensor. `_after_forward` decides.
            current.unhooked_output = output

    def _hook(self, current: _Step, output: torch.Tensor) -> None:
        current.hooked = True
        output.register_hook(lambda grad, current=current: self._on_gradient(current, grad))

    def _after_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        current = self._current
        if current is not None and _inside_backward() != current.in_backward:
            return
        if current is None:
            return
        pending, current.unhooked_output = current.unhooked_output, None
        if pending is not None and pending.requires_grad:
            self._hook(current, pending)
        elif not current.hooked:
            self._current = None
            if pending is not None:
                raise RuntimeError(
                    "gradient capture: the input embedding's output does not require grad (the embedding is "
                    "frozen, as in LoRA/adapter fine-tuning), so no gradient reaches it and nothing could be "
                    "captured. Call model.enable_input_require_grads() (Hugging Face models) or unfreeze the "
                    "input embedding.")
            raise RuntimeError("gradient capture: the forward pass did not call the model's input embedding "
                               "(get_input_embeddings()), so nothing could be captured")
        if not self.record_loss:
            return
        logits = _logits(output, current.input_ids.shape)
        if logits is None:
            if not self._warned_no_logits:
                self._warned_no_logits = True
                log.warning("gradient capture: found no logits [batch, length, vocab] in the model's output; "
                            "the examples' losses are not recorded")
            return
        with torch.no_grad():
            current.losses = _per_example_loss(logits.detach(), _targets(current))

    def _on_gradient(self, current: _Step, grad: torch.Tensor) -> None:
        """Runs inside backward: deduplicate and rescale on the device, hand the rows to the host, never wait.

        Everything here is a fixed-shape tensor operation, so nothing synchronises with the host: the number of
        distinct tokens per example stays a device tensor, and the host slices the padded result later.
        """
        current.hooked = False  # backward happened: the batch() block may end
        if current.taken:
            # The same forward differentiated again (say autograd.grad(loss, ..., retain_graph=True), then
            # loss.backward()). One record per example: the first gradient, which in the usual cases (a
            # diagnostic pass on the loss, or a gradient penalty built on top of it) is the loss's own.
            if not self._warned_twice_differentiated:
                self._warned_twice_differentiated = True
                log.warning("gradient capture: a forward pass was differentiated more than once; only its "
                            "first gradient is captured")
            return
        current.taken = True
        with torch.no_grad():
            vocab = self.embedding.weight.shape[0]
            loss_scale = self._loss_scale()
            rows, tokens, counts, scale, keep = _deduplicate(current, grad.detach(), vocab, loss_scale)
            rows = rows.to(self.transfer_dtype if self.store.dtype == "float32" else torch.bfloat16
                           if self.store.dtype == "bfloat16" else self.transfer_dtype)
            tensors = {"rows": rows, "tokens": tokens, "counts": counts, "input_ids": current.input_ids,
                       "keep": keep, "n_targets": scale[1]}
            if current.losses is not None:
                tensors["losses"] = current.losses
            if self._position_writer is not None:  # positions need the per-position gradient itself
                tensors["grad"] = (grad.detach().float() * scale[0][:, None, None]).to(self.transfer_dtype)
        host, ready = self._to_host(tensors)
        # Claimed only now: if anything above fails (an OOM), the examples are still free for a retry.
        if not self._claim(current):
            return
        self.report.bytes_transferred += sum(t.numel() * t.element_size() for t in tensors.values())
        self.report.steps += 1
        self._enqueue(_Job(current, host, ready))

    def _claim(self, current: _Step) -> bool:
        """Mark the step's keys as seen now that its gradient exists; returns whether any is left to capture.

        A key is dropped if another step claimed it since the forward (two forwards, then one backward).
        """
        record_ids = [None if key is None or key in self._seen else key for key in current.record_ids]
        current.record_ids = record_ids
        self._seen.update(key for key in record_ids if key is not None)
        if self.policy == "all":
            for example_id, key in zip(current.ids, record_ids, strict=True):
                if key is not None and key == example_id:
                    self._plain_epoch[example_id] = current.epoch
        self.report.examples_seen += len(record_ids)
        self.report.examples_skipped += sum(key is None for key in record_ids)
        return any(key is not None for key in record_ids)

    def _loss_scale(self) -> torch.Tensor | float:
        """The factor the loss was multiplied by before this backward: the GradScaler's current scale, else 1.

        torch's scaler keeps the scale in a device tensor that `update()` changes in place after the step;
        read as a tensor here, inside backward, it is the value this backward used, and reading it waits for
        nothing.
        """
        scaler = self.scaler
        if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
            return 1.0
        scale = getattr(scaler, "_scale", None)
        if isinstance(scale, torch.Tensor):
            return scale
        if hasattr(scaler, "_scale"):  # a torch scaler whose scale() was never called: this loss is unscaled
            return 1.0
        return float(scaler.get_scale())  # another implementation: its public getter (may wait for the GPU)

    def _to_host(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
        device = tensors["rows"].device
        if device.type != "cuda":
            return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}, None
        # A side stream, so that the copy overlaps the rest of backward instead of queueing behind it on the
        # training stream; record_stream keeps the caching allocator from reusing the gradient's memory
        # before the copy has read it.
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device=device)
        stream = self._copy_stream
        stream.wait_stream(torch.cuda.current_stream(device))
        host = {}
        with torch.cuda.stream(stream):
            for name, value in tensors.items():
                value = value.detach()
                pinned = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                pinned.copy_(value, non_blocking=True)
                value.record_stream(stream)
                host[name] = pinned
            ready = torch.cuda.Event()
            ready.record(stream)
        return host, ready

    def _enqueue(self, job: _Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            start = time.perf_counter()
            self._queue.put(job)  # the store is behind: block training rather than drop anything
            self.report.stall_seconds += time.perf_counter() - start

    # ----------------------------------------------------------------------------------- background writer
    def _drain(self, writer: Any) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                self._queue.task_done()
                return
            start = time.perf_counter()
            try:
                # Batches keep being written after a failure elsewhere: each is valid on its own, and training
                # stops at its next captured forward anyway. Consuming every job also means training never
                # deadlocks on a full queue.
                self._write(job, writer)
            except BaseException as err:
                if self._error is None:
                    log.exception("gradient capture failed")
                    self._error = err
                else:
                    log.error("gradient capture: another batch failed too: %s: %s", type(err).__name__, err)
            finally:
                self._queue.task_done()
            with self._report_lock:
                self.report.writer_seconds += time.perf_counter() - start

    def _write(self, job: _Job, writer: Any) -> None:
        if job.ready is not None:
            job.ready.synchronize()
        step, host = job.step, job.host
        counts = host["counts"].tolist()
        n_targets = host["n_targets"].tolist()
        losses = host.get("losses")
        optimizer = type(self.optimizer).__name__ if self.optimizer is not None else None
        ids, tokens, rows, metas, pos_ids, pos_tokens, pos_rows = [], [], [], [], [], [], []
        nonfinite = []
        for i, record_id in enumerate(step.record_ids):
            if record_id is None:
                continue
            k = counts[i]
            example_rows = host["rows"][i, :k]
            if self._position_writer is not None:
                positions = torch.nonzero(host["keep"][i]).flatten()
                example_positions = (host["grad"][i][positions].float() if k
                                     else host["grad"].new_zeros(0, self.store.dim, dtype=torch.float32))
            # Not finite: a GradScaler overflow step (the optimizer skips it too), or a diverged loss. The
            # store would refuse the whole append; this example alone is left out, to be captured when next
            # seen.
            if not (bool(torch.isfinite(example_rows).all()) and
                    (self._position_writer is None or bool(torch.isfinite(example_positions).all()))):
                nonfinite.append(record_id)
                continue
            sequence = host["input_ids"][i][host["keep"][i]]
            ids.append(record_id)
            tokens.append(host["tokens"][i, :k])
            rows.append(example_rows)
            loss = None if losses is None else float(losses[i])
            metas.append({"step": step.step, "epoch": step.epoch, "lr": step.lr, "optimizer": optimizer,
                          "loss": loss if loss is None or math.isfinite(loss) else None,
                          "n_tokens": int(n_targets[i]), "tokens": sequence.tolist(), "example_id": step.ids[i]})
            if self._position_writer is not None:
                pos_ids.append(record_id)
                pos_tokens.append(positions if k else positions[:0])
                pos_rows.append(example_positions)
        if nonfinite:
            self._seen.difference_update(nonfinite)
            with self._report_lock:
                self.report.examples_nonfinite += len(nonfinite)
            log.warning("gradient capture, step %s: %d example(s) with non-finite gradient rows (a "
                        "GradScaler overflow step?) not stored; each is captured the next time it is seen",
                        step.step, len(nonfinite))
        if ids:
            writer.append(ids, tokens, rows, metas)
            itemsize = {"float32": 4, "bfloat16": 2, "int8": 1}[self.store.dtype]
            with self._report_lock:
                self.report.examples_captured += len(ids)
                self.report.rows_captured += sum(len(t) for t in tokens)
                self.report.bytes_captured += sum(len(t) for t in tokens) * self.store.dim * itemsize
        if pos_ids:
            self._position_writer.append(pos_ids, pos_tokens, pos_rows)


def _commit_at_exit(jobs: queue.Queue, threads: list[threading.Thread], writers: list[Any]) -> None:
    """At interpreter exit, for a capture never closed: let the writer threads finish, commit what they
    appended (no hooks to remove, no barrier: other processes may be gone)."""
    log.warning("gradient capture was never closed: committing its rows at exit")
    live = [thread for thread in threads if thread.is_alive()]
    for _ in live:
        jobs.put(None)
    for thread in live:
        thread.join()
    for writer in writers:
        try:
            writer.close()
        except Exception:
            log.exception("gradient capture: committing writer %s at exit failed", writer.name)


def _logits(output: Any, shape: torch.Size) -> torch.Tensor | None:
    """The logits [B, L, V] in a model's output: a ModelOutput / dict, or the tuple of `return_dict=False`,
    which starts with the loss when labels were given."""
    if isinstance(output, dict) or hasattr(output, "keys"):
        return output.get("logits") if hasattr(output, "get") else output["logits"]
    if isinstance(output, torch.Tensor):
        return output if output.dim() == 3 else None
    for item in output if isinstance(output, (tuple, list)) else ():
        if isinstance(item, torch.Tensor) and item.dim() == 3 and tuple(item.shape[:2]) == tuple(shape[:2]):
            return item
    return None


def _deduplicate(current: _Step, grad: torch.Tensor, vocab: int, loss_scale: torch.Tensor | float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per-example rows of distinct tokens, rescaled to each example's own mean loss, without a host sync.

    grad float [B, L, D] (d batch loss / d embedding output); loss_scale: what the loss was multiplied by
    before backward besides the convention's multiplier (a GradScaler's scale, float32 tensor [] or [1]).
    Returns rows float32 [B, L, D] (example i's first counts[i] rows are its distinct tokens' summed, rescaled
    gradients, the rest zero), tokens int64 [B, L] (matching token ids), counts int64 [B], (scale float32 [B],
    n_targets int64 [B]) and keep bool [B, L].

    Sorting each example's token ids puts repeats next to each other; a running count of "new token" flags
    numbers the distinct tokens, and a scatter-add sums each run — all fixed-shape, so the number of distinct
    tokens never has to be known on the host. Sums are in float32, rounded once later by the store.
    """
    B, L, D = grad.shape
    keep = _positions(current.attention_mask, current.labels, current.input_ids.shape).to(grad.device)
    targets = _targets(current)
    n_targets = (targets[:, 1:] != IGNORE_INDEX).sum(dim=1)
    if isinstance(current.num_items, torch.Tensor):
        total = current.num_items.to(grad.device, torch.float32).reshape(())
    elif current.num_items is not None:
        total = torch.tensor(float(current.num_items), device=grad.device)
    else:
        total = n_targets.sum().float()
    if isinstance(loss_scale, torch.Tensor):
        total = total / loss_scale.to(grad.device, torch.float32).reshape(())
    elif loss_scale != 1.0:
        total = total / loss_scale
    # rows of d(own mean loss)/d e = (total / n_i) * (d batch loss / d e) / multiplier; none without targets
    scale = torch.where(n_targets > 0, total / (n_targets.clamp(min=1).float() * current.multiplier),
                        torch.zeros((), device=grad.device))
    sentinel = vocab  # padding sorts after every real token
    token_ids = current.input_ids.masked_fill(~keep, sentinel)
    sorted_ids, order = token_ids.sort(dim=1)
    fresh = torch.ones_like(sorted_ids, dtype=torch.bool)
    fresh[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    segment = fresh.long().cumsum(dim=1) - 1  # [B, L]: index of each sorted position's distinct token
    gathered = grad.float().gather(1, order[:, :, None].expand(-1, -1, D)) * scale[:, None, None]
    rows = torch.zeros(B, L, D, dtype=torch.float32, device=grad.device)
    rows.scatter_add_(1, segment[:, :, None].expand(-1, -1, D), gathered)
    tokens = torch.full((B, L), sentinel, dtype=torch.long, device=grad.device)
    tokens.scatter_(1, segment, sorted_ids)
    counts = torch.where(n_targets > 0, (tokens < sentinel).sum(dim=1), torch.zeros_like(n_targets))
    return rows, tokens, counts, (scale, n_targets), keep


def _barrier() -> bool:
    """A barrier across ranks when torch.distributed is in use; returns whether it was."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        return True
    return False


def _targets(current: _Step) -> torch.Tensor:
    return _targets_host(current.input_ids, current.attention_mask, current.labels)


def _targets_host(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  labels: torch.Tensor | None) -> torch.Tensor:
    """The unshifted labels the model's loss uses: `labels`, or the input ids with padding ignored."""
    if labels is not None:
        return labels
    if attention_mask is None:
        return input_ids
    return input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)


def _positions(attention_mask: torch.Tensor | None, labels: torch.Tensor | None, shape: torch.Size
               ) -> torch.Tensor:
    """[B, L] bool: positions that belong to the example (not padding).

    Padding is where the attention mask is 0. Without a mask, trailing positions labelled -100 are padding.
    Non-padding positions whose own label is -100 (a prompt masked out of the loss) are kept: their
    embeddings still influence the loss through later positions.
    """
    if attention_mask is not None:
        return attention_mask.to(torch.bool)
    if labels is None:
        return torch.ones(shape, dtype=torch.bool)
    valid = labels != IGNORE_INDEX
    last = torch.where(valid.any(dim=1), shape[1] - 1 - valid.flip(1).int().argmax(dim=1), -1)  # last valid index
    return torch.arange(shape[1], device=labels.device)[None, :] <= last[:, None]


def _per_example_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float32 [B]: each example's mean next-token cross-entropy (NaN if it has no target token).

    Per position, `token_cross_entropy` (logsumexp minus the target's logit, 0 where there is no target). On
    CUDA that is one Triton pass that reads the logits once in their own dtype and sums in float32: no float32
    copy of them (GPT-2's [16, 512, 50257] logits in float32 would be 1.6 GB of extra traffic per step for a
    number that is only recorded), none of `torch.logsumexp`'s extra passes and intermediates (~7% of a GPT-2
    124M step on an H200), and positions without a target (the last one, padding) are not read at all.
    Elsewhere it is the torch reference, the same math as `F.cross_entropy` on float32 logits. The logits go
    in whole, as [B * L, V] rows, so the reshape is a view; slicing off the last position first would force a
    copy. The targets are not range-checked (that check would wait for the device): the model's own loss has
    just used them, and an out-of-range one would give NaN here rather than read out of bounds.
    """
    next_tokens = torch.nn.functional.pad(targets[:, 1:], (0, 1), value=IGNORE_INDEX)  # [B, L]: target of each position
    valid = next_tokens != IGNORE_INDEX
    B, L, V = logits.shape
    rows, row_targets = logits.reshape(B * L, V), next_tokens.reshape(B * L)
    global _loss_backend
    try:
        ce = token_cross_entropy(rows, row_targets, ignore_index=IGNORE_INDEX, check_targets=False,
                                 backend=_loss_backend)
    except KernelInputError:
        raise
    except Exception as exc:  # a Triton build that fails on this machine must not stop training
        if _loss_backend == "reference":
            raise
        log.warning("per-example loss: the Triton kernel failed (%s: %s); using the torch reference from now on",
                    type(exc).__name__, exc)
        _loss_backend = "reference"
        ce = token_cross_entropy(rows, row_targets, ignore_index=IGNORE_INDEX, check_targets=False,
                                 backend=_loss_backend)
    ce = ce.view(B, L) * valid
    return ce.sum(dim=1) / valid.sum(dim=1)


_loss_backend = "auto"  # becomes "reference" if the Triton kernel cannot be built here
