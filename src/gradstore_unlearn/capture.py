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
what the unlearning engine ascends.

Cost: nothing on the training stream waits for the host. The hook copies the per-position gradient (and the
batch's token ids and masks) to pinned host memory on a side CUDA stream and records an event; a background
thread waits on that event, selects the non-padding positions, sums repeated tokens in float32, rescales,
and appends to the store (which compresses and writes). The queue between them is bounded: if the store falls
behind, the training thread blocks — nothing is dropped — and the time it waited is reported as stall time.

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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from gradstore import GradStore, InvalidInputError
from gradstore._encoding import normalize_id
from gradstore_kernels import KernelInputError, token_cross_entropy

log = logging.getLogger("gradstore_unlearn.capture")

ID_KWARG = "gradstore_ids"  # a forward() keyword that carries the batch's example IDs (popped before the model sees it)
POLICIES = ("first", "all", "off")
IGNORE_INDEX = -100


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
    (1 / gradient-accumulation steps, a gradient-scaler factor, the number of processes when tokens are
    averaged across devices). `multiplier` is that constant as seen *when `num_items_in_batch` is passed*
    and `multiplier_without_items` when it is not (the Trainer treats the two cases differently).
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
    hooked: bool = False


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
    position_store: optionally also capture position-embedding rows (keyed by position) into a second store.
    record_loss: compute each example's own mean token loss from the logits (no grad) and store it.
    max_pending: bound of the queue to the writer, in batches; a full queue blocks training (stall time).
    transfer_dtype: dtype of the device-to-host copy (float32 keeps every bit until the single final rounding).
    writer_buffer_bytes: segments are committed when this much is buffered, and at the end.
    """

    def __init__(self, model: torch.nn.Module, store: GradStore, *, policy: str | None = None,
                 optimizer: torch.optim.Optimizer | None = None, position_store: GradStore | None = None,
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
        self.embedding = embedding
        # Wrapped optimizers (accelerate's AcceleratedOptimizer) keep the real one in `.optimizer`.
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
        self.close()

    def start(self) -> None:
        """Install the hooks and start the background writer."""
        if self._threads:
            return
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

    def close(self) -> CaptureReport:
        """Remove the hooks, wait for the writer to finish, commit everything. Re-raises a writer failure."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        self._threads = []
        if self._error is None:
            for writer in self._writers:
                writer.close()
            if self._position_writer is not None:
                self._position_writer.close()
            # A distributed sampler may pad an epoch by repeating examples on other ranks: the same ID can then
            # be captured twice. Once every rank has committed, one of them removes the extra copies.
            if _barrier():
                if torch.distributed.get_rank() == 0:
                    self.store.refresh()
                    self.store.remove_shadowed()
                _barrier()
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"gradient capture failed in the background writer: {error}") from error
        return self.report

    @contextmanager
    def batch(self, ids: Sequence[Any], *, step: int | None = None, lr: float | None = None) -> Iterator[None]:
        """The IDs of the examples of the next forward/backward (in batch order), for the plain-loop API."""
        self._raise_if_failed()
        self._pending_ids, self._pending_step, self._pending_lr = list(ids), step, lr
        try:
            yield
            if self._current is not None and self._current.hooked:
                raise RuntimeError("capture.batch(): the forward pass ran but backward() was not called inside the block")
        finally:
            self._pending_ids = self._pending_step = self._pending_lr = None
            self._current = None

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
        self._current = None
        if ids is None or self.policy == "off" or not module.training or not torch.is_grad_enabled():
            return args, kwargs  # evaluation, generation, or a forward without IDs: not captured
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("gradient capture needs input_ids (inputs_embeds-only forwards carry no tokens)")
        if len(ids) != input_ids.shape[0]:
            raise ValueError(f"{len(ids)} example IDs for a batch of {input_ids.shape[0]}")
        self.report.examples_seen += len(ids)
        record_ids: list[int | str | None] = []
        for raw in ids:
            example_id = normalize_id(raw)
            key = example_id if self.policy == "first" else epoch_record_id(example_id, self.epoch)
            if key in self._seen:
                record_ids.append(None)
                self.report.examples_skipped += 1
            else:
                self._seen.add(key)
                record_ids.append(key)
        if not any(r is not None for r in record_ids):
            return args, kwargs
        num_items = kwargs.get("num_items_in_batch")
        convention = self.loss_convention
        lr = self._pending_lr
        if lr is None and self.optimizer is not None:
            lr = float(self.optimizer.param_groups[0]["lr"])
        self._current = _Step(
            ids=[normalize_id(i) for i in ids], record_ids=record_ids, input_ids=input_ids,
            attention_mask=kwargs.get("attention_mask"), labels=kwargs.get("labels"), num_items=num_items,
            step=self.global_step if self._pending_step is None else self._pending_step, epoch=self.epoch, lr=lr,
            multiplier=convention.multiplier if num_items is not None else convention.multiplier_without_items,
        )
        return args, kwargs

    def _after_embedding(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        current = self._current
        if current is None or current.hooked or not output.requires_grad:
            return
        current.hooked = True
        output.register_hook(lambda grad, current=current: self._on_gradient(current, grad))

    def _after_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        current = self._current
        if current is None or not self.record_loss:
            return
        logits = output["logits"] if isinstance(output, dict) or hasattr(output, "keys") else output[0]
        with torch.no_grad():
            current.losses = _per_example_loss(logits.detach(), _targets(current))

    def _on_gradient(self, current: _Step, grad: torch.Tensor) -> None:
        """Runs inside backward: deduplicate and rescale on the device, hand the rows to the host, never wait.

        Everything here is a fixed-shape tensor operation, so nothing synchronises with the host: the number of
        distinct tokens per example stays a device tensor, and the host slices the padded result later.
        """
        with torch.no_grad():
            rows, tokens, counts, scale, keep = _deduplicate(current, grad.detach(), self.embedding.weight.shape[0])
            rows = rows.to(self.transfer_dtype if self.store.dtype == "float32" else torch.bfloat16
                           if self.store.dtype == "bfloat16" else self.transfer_dtype)
            tensors = {"rows": rows, "tokens": tokens, "counts": counts, "input_ids": current.input_ids,
                       "keep": keep, "n_targets": scale[1]}
            if current.losses is not None:
                tensors["losses"] = current.losses
            if self._position_writer is not None:  # positions need the per-position gradient itself
                tensors["grad"] = (grad.detach().float() * scale[0][:, None, None]).to(self.transfer_dtype)
        host, ready = self._to_host(tensors)
        self.report.bytes_transferred += sum(t.numel() * t.element_size() for t in tensors.values())
        self.report.steps += 1
        job = _Job(current, host, ready)
        if self._current is current:
            self._current.hooked = False  # backward happened: the batch() block may end
        self._enqueue(job)

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
                if self._error is None:  # after a failure keep consuming, so that training never deadlocks
                    self._write(job, writer)
            except BaseException as err:
                log.exception("gradient capture failed")
                self._error = err
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
        for i, record_id in enumerate(step.record_ids):
            if record_id is None:
                continue
            k = counts[i]
            sequence = host["input_ids"][i][host["keep"][i]]
            ids.append(record_id)
            tokens.append(host["tokens"][i, :k])
            rows.append(host["rows"][i, :k])
            loss = None if losses is None else float(losses[i])
            metas.append({"step": step.step, "epoch": step.epoch, "lr": step.lr, "optimizer": optimizer,
                          "loss": loss if loss is None or math.isfinite(loss) else None,
                          "n_tokens": int(n_targets[i]), "tokens": sequence.tolist(), "example_id": step.ids[i]})
            if self._position_writer is not None:
                pos_ids.append(record_id)
                positions = torch.nonzero(host["keep"][i]).flatten()
                pos_tokens.append(positions if k else positions[:0])
                pos_rows.append(host["grad"][i][positions].float() if k else host["grad"].new_zeros(0, self.store.dim))
        if ids:
            writer.append(ids, tokens, rows, metas)
            itemsize = {"float32": 4, "bfloat16": 2, "int8": 1}[self.store.dtype]
            with self._report_lock:
                self.report.examples_captured += len(ids)
                self.report.rows_captured += sum(len(t) for t in tokens)
                self.report.bytes_captured += sum(len(t) for t in tokens) * self.store.dim * itemsize
        if pos_ids:
            self._position_writer.append(pos_ids, pos_tokens, pos_rows)


def _deduplicate(current: _Step, grad: torch.Tensor, vocab: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per-example rows of distinct tokens, rescaled to each example's own mean loss, without a host sync.

    grad float [B, L, D] (d batch loss / d embedding output). Returns rows float32 [B, L, D] (example i's first
    counts[i] rows are its distinct tokens' summed, rescaled gradients, the rest zero), tokens int64 [B, L]
    (matching token ids), counts int64 [B], (scale float32 [B], n_targets int64 [B]) and keep bool [B, L].

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
