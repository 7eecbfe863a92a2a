"""The server's hold on one store and one model: many readers, one writer, and what readers may see.

Readers (lookups, influence, fuzzy matching, dry runs) take the read side of a `RWLock` for the whole of
their work and read the *published snapshot*: a model object nobody mutates plus an `Unlearner` over it.
The writer (one forget at a time, on the job runner's thread) calibrates a *private copy* of the model, so
the long part of a forget — seconds to minutes of loss evaluations — never blocks a reader. Only its commit
(weights saved atomically, examples erased from the store, audit record, and the new weights published to
readers) takes the write side. A reader therefore sees the store and the model either both before or both
after a forget, never a mix: no torn reads.

Work that touches the model's autograd (the gradient of a query text) is serialised by a second lock: the
library's gradient helpers hook the embedding module, and two threads' hooks on one module would capture
each other's gradients. On a GPU that work is serialised by the device anyway.

Everything here is synchronous and runs on worker threads (FastAPI's threadpool for requests, the job
runner's thread for forgets); nothing here may be called on the event loop.
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from gradstore import ErasedError, GradStore, InvalidInputError, UnknownIdError
from gradstore._encoding import canonical_int_id, normalize_id
from gradstore_kernels import topk_influence
from gradstore_unlearn.capture import is_later_epoch_record
from gradstore_unlearn.evaluate import context_length
from gradstore_unlearn.gradients import sparse_rows
from gradstore_unlearn.model_lock import ModelDirLock
from gradstore_unlearn.tables import json_safe
from gradstore_unlearn.train import load_model
from gradstore_unlearn.unlearn import (
    ForgetConfig,
    ForgetError,
    ForgetReport,
    Unlearner,
    audit_head,
    model_hash,
    on_audit_record,
    verify_audit_chain,
    weights_fingerprint,
)

from .errors import ApiError
from .rwlock import RWLock
from .settings import Settings, SettingsError

log = logging.getLogger("gradstore_server")

INFLUENCE_BATCH = 256
# The files a model directory's weights live in (safetensors, possibly sharded; older pickled checkpoints).


class NotWritable(ApiError):
    """The engine refuses to start or commit a forget (degraded, stopping, or the weights on disk changed).
    Raised before anything was changed: the job can run again after a restart."""

    def __init__(self, message: str):
        super().__init__(503, "degraded", message)


class CommitFailed(Exception):
    """A forget's commit failed, or what follows it (publishing) did: the engine is degraded, and which state
    the store and the model on disk are in (before or after the request) is settled by the next start."""


@dataclass(frozen=True)
class Snapshot:
    """What readers see: a model that nobody mutates, an `Unlearner` over it, and its hash."""

    model: torch.nn.Module
    unlearner: Unlearner
    model_hash: str
    version: int


# The library's private step the server builds on: `_commit` (save + erase + audit).
for _name in ("_commit",):
    if not callable(getattr(Unlearner, _name, None)):  # pragma: no cover - guards a library refactor
        raise ImportError(f"gradstore_server needs Unlearner.{_name} (a step of the library's forget)")


class _PublishingUnlearner(Unlearner):
    """The writer's `Unlearner`: its commit runs inside the engine's write section, which also publishes.

    `Unlearner._commit` is where the library saves the weights, erases the examples and records the audit;
    wrapping it is the one place where "store after" and "model after" can be made visible together. (A
    public hook in the library, e.g. a commit context manager passed to `forget`, would be cleaner.)
    """

    def __init__(self, *args: Any,
                 commit_hook: Callable[[Callable[[], None], ForgetReport, Unlearner], None], **kwargs: Any):
        self._commit_hook = commit_hook
        super().__init__(*args, **kwargs)

    def _commit(self, ids: list[Any], report: ForgetReport) -> None:
        self._commit_hook(functools.partial(Unlearner._commit, self, ids, report), report, self)


class Engine:
    """Store + model + locks. `start()` opens them (and settles any forget a crash interrupted)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._rw = RWLock()
        self._autograd = threading.Lock()
        self._writer_serial = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._writer: _PublishingUnlearner | None = None
        self._model_lock: ModelDirLock | None = None
        self._weights: tuple[Any, ...] | None = None  # `weights_fingerprint` of the files the server serves
        self.store: GradStore | None = None
        self.tokenizer: Any = None
        self.degraded: str | None = None  # set when a commit failed half-way: forgets are refused until restart
        try:
            self.forget_config = ForgetConfig(**settings.forget_config)
            self.forget_config.validate()
        except (TypeError, ValueError) as err:  # an unknown field or an out-of-range value
            raise SettingsError(f"GRADSTORE_FORGET_CONFIG: {err}") from None

    # ------------------------------------------------------------------------------------------ lifecycle
    @property
    def started(self) -> bool:
        # Holding the model directory is what being started means: `stop()` lets go, and a later `start()`
        # (an application whose lifespan runs again) opens everything afresh, lock included.
        return self._model_lock is not None and self._model_lock.held

    def start(self) -> None:
        """Open the store and the model; let the library finish or roll back an interrupted forget.

        Idempotent: `gradstore serve` starts the engine before it binds its socket (so that a bad store or
        model fails fast, with one line), and the application's startup then finds it started."""
        if self.started:
            return
        # One process owns the model: two writers of one model directory would each publish their own weights.
        self._model_lock = ModelDirLock(self.settings.model)
        try:
            self.store = GradStore.open(self.settings.store, storage_options=self.settings.storage_options)
            # Taken before the weights are read: if anything replaced them in between, the first forget sees
            # a difference and refuses, instead of overwriting weights this server never loaded.
            weights = weights_fingerprint(self.settings.model)
            model, self.tokenizer = load_model(self.settings.model, device=self.settings.device)
            model.eval()
            # The writer's copy comes first: constructing it runs `recover()`, which finishes a forget whose
            # weights reached the disk (erasure, audit) or drops one whose weights did not. Either way the
            # weights just loaded are the state the store now agrees with.
            self._writer = self._new_writer(copy.deepcopy(model))
            self._snapshot = self._new_snapshot(model, model_hash(model), version=0)
            self._weights = weights
            self.degraded = None  # a restart settles what a failed commit left undecided
            if not on_audit_record(self.store, self._snapshot.model_hash):
                # Every forget would be refused (the library's audit-head check): say so once, keep the queue.
                head = audit_head(self.store) or "-"
                self.degraded = (f"the weights served ({self._snapshot.model_hash[:16]}) are not where the store's "
                                 f"audit log ends ({head[:16]}): forgets wait until the server is stopped and "
                                 "either the weights are adopted (`gradstore audit --model DIR --adopt`) or the "
                                 "recorded ones are put back, and started again")
                log.error("%s", self.degraded)
        except BaseException:
            self._model_lock.release()
            raise
        log.info("serving %s (%d examples) with the model in %s (hash %s)", self.store.uri, len(self.store),
                 self.settings.model, self._snapshot.model_hash[:16])

    def stop(self) -> None:
        if self._model_lock is not None:
            self._model_lock.release()

    def _check_writable(self) -> None:
        """Raise `NotWritable` unless a forget may start or commit now.

        The weights on disk must still be the ones this server loaded or last saved: a forget starts from the
        published weights, and committing over weights another process saved would undo that process's forget
        (the model lock keeps `gradstore forget` out while the server runs; this catches any other writer)."""
        if self.degraded:
            raise NotWritable(self.degraded)
        if not self.started:
            raise NotWritable("the server is stopping: the job runs again after the restart")
        if weights_fingerprint(self.settings.model) != self._weights:
            self.degraded = ("the weights in the model directory changed since the server loaded or last "
                             "saved them (another process wrote them); restart the server to serve them")
            log.error("%s", self.degraded)
            raise NotWritable(self.degraded)

    def _new_writer(self, model: torch.nn.Module) -> _PublishingUnlearner:
        return _PublishingUnlearner(model, self.store, tokenizer=self.tokenizer, config=self.forget_config,
                                    model_dir=self.settings.model, commit_hook=self._commit_and_publish)

    def _new_snapshot(self, model: torch.nn.Module, digest: str, version: int) -> Snapshot:
        # model_dir is given so that the library never treats a journal entry as "no model on disk"; readers
        # never commit (they only run lookups and dry runs), so it is never written through this object.
        unlearner = Unlearner(model, self.store, tokenizer=self.tokenizer, config=self.forget_config,
                              model_dir=self.settings.model)
        return Snapshot(model, unlearner, digest, version)

    # --------------------------------------------------------------------------------------------- reading
    @contextmanager
    def reading(self) -> Iterator[Snapshot]:
        """The published snapshot, held stable (no commit can land) until the block ends."""
        with self._rw.read():
            assert self._snapshot is not None, "engine not started"
            yield self._snapshot

    def stats(self) -> dict[str, Any]:
        with self.reading() as snap:
            store = self.store.stats().to_dict()
            model = {"hash": snap.model_hash, "version": snap.version, "device": self.settings.device,
                     "vocab_size": int(snap.model.get_input_embeddings().weight.shape[0]),
                     "max_positions": context_length(snap.model), "tokenizer": self.tokenizer is not None}
        return {"store": json_safe(store), "model": model}

    def resolve_path_id(self, raw: str, id_type: str = "auto") -> Any:
        """The stored ID a URL path segment names (see `routers/examples.py` for the rule)."""
        candidates: list[Any] = []
        if id_type in ("auto", "str") and _valid_str_id(raw):
            candidates.append(raw)
        if id_type in ("auto", "int"):
            number = canonical_int_id(raw)
            if number is not None:
                candidates.append(number)
        for c in candidates:
            if c in self.store:
                return c
        for c in candidates:
            if self.store.is_erased(c):
                raise ErasedError(c)
        shown = raw if len(raw) <= 300 else raw[:300] + "..."
        raise UnknownIdError(raw, f"unknown ID {shown!r}: not in the store"
                             + (f" (as id_type={id_type})" if id_type != "auto" else ""))

    def example(self, raw: str, id_type: str, with_rows: bool) -> dict[str, Any]:
        with self.reading():
            example_id = self.resolve_path_id(raw, id_type)
            example = self.store.get(example_id)
        out: dict[str, Any] = {
            "id": example.id, "id_type": "int" if isinstance(example.id, int) else "str",
            "n_tokens": len(example.token_ids), "token_ids": example.token_ids.tolist(),
            "dtype": self.store.dtype, "dim": self.store.dim, "meta": json_safe(example.meta), "rows": None,
        }
        if with_rows:
            out["rows"] = json_safe(example.dequantized().tolist())
        return out

    def influence_by_id(self, example_id: Any, k: int) -> list[tuple[Any, float]]:
        with self.reading() as snap:
            # query_type="id": an unknown or erased ID raises (404 / 409) instead of being scored as a text.
            return snap.unlearner.influence(normalize_id(example_id), k, query_type="id")

    def influence_by_text(self, text: str, k: int) -> tuple[int, list[tuple[Any, float]]]:
        """(tokens in the query, the k most influential stored examples) for a text on the current model."""
        with self.reading() as snap:
            tokens = self.encode(text, snap.model)
            if len(tokens) < 2:
                raise ApiError(422, "invalid_input", "the text is a single token: it has no next-token loss "
                               "to take a gradient of")
            with self._autograd:
                query = sparse_rows(snap.model, tokens, pad_token_id=snap.unlearner.pad_token_id)
            top = topk_influence(query, self._example_batches(), k, vocab_size=self.store.vocab_size)
        return len(tokens), [(i, float(v)) for i, v in zip(top.ids, top.scores.tolist(), strict=True)]

    def _example_batches(self) -> Iterator[Any]:
        """The store's batches without later-epoch records (capture policy `all`), as the library's influence
        streams them: examples are ranked by their first-epoch record, not once per epoch."""
        batches = self.store.iter_batches(INFLUENCE_BATCH)
        if self.store.config.capture.get("policy") != "all":
            yield from batches
            return
        for batch in batches:
            kept = batch.select([i for i, key in enumerate(batch.ids) if not is_later_epoch_record(key)])
            if len(kept):
                yield kept

    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise ApiError(422, "no_tokenizer", "the served model has no tokenizer, so texts cannot be used; "
                           "use IDs instead")

    def encode(self, text: str, model: torch.nn.Module) -> list[int]:
        """A query text's tokens, checked to fit the model (positions, vocabulary)."""
        self._need_tokenizer()
        tokens = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        limit = context_length(model)
        if limit is not None and len(tokens) > limit:
            raise ApiError(422, "text_too_long", f"the text is {len(tokens)} tokens; the model takes at most {limit}")
        vocab = int(model.get_input_embeddings().weight.shape[0])
        if tokens and max(tokens) >= vocab:
            raise ApiError(422, "invalid_input", "the text encodes to a token the model has no embedding for")
        return tokens

    def audit(self, offset: int, limit: int) -> tuple[int, list[dict[str, Any]]]:
        with self.reading():
            records = self.store.audit_log()
        return len(records), [json_safe(r) for r in records[offset : offset + limit]]

    def audit_chain(self) -> dict[str, Any]:
        """The audit log's model hashes followed to the published weights (`verify_audit_chain`).

        Refused (503 `degraded`) while a failed commit is unsettled: the weights served are then the ones from
        before it, while the disk and the audit log may already hold its after-state, so neither "whole" nor
        "broken" would be true; the restart settles it."""
        with self.reading() as snap:
            if self.degraded:
                raise ApiError(503, "degraded", f"{self.degraded}; the audit chain is checked after the restart")
            return verify_audit_chain(self.store, weights_hash=snap.model_hash).to_dict()

    def drift(self) -> dict[str, Any] | None:
        """The store's drift budget read on the published weights (None without one)."""
        # Under the autograd lock: a gradient taken beside it (influence by text) hooks the shared model's embedding,
        # and a forward without grad through that hook fails.
        with self.reading() as snap, self._autograd:
            try:
                reading = snap.unlearner.drift()
            except ForgetError as err:  # no panel member left: the budget cannot be read until it is set again
                raise ApiError(409, "drift_unmeasurable", str(err)) from None
        return None if reading is None else json_safe(reading.to_dict())

    def id_hash(self, example_id: Any) -> str:
        return self.store.id_hash(example_id)

    # -------------------------------------------------------------------------------------------- forgets
    def plan_ids(self, ids: Sequence[Any]) -> tuple[list[Any], list[Any]]:
        """(every ID of a forget request, once each and in request order; those already erased). Unknown IDs
        raise `UnknownIdError` naming them all (404)."""
        with self.reading() as snap:
            _, already = snap.unlearner.resolve(ids)
        return list(dict.fromkeys(normalize_id(i) for i in ids)), already

    def plan_text(self, text: str, threshold: float, metric: str) -> list[Any]:
        """The fuzzy matches (library `Match`es) of a text among the live examples."""
        # Matching uses only the tokenizer and the shingle index, so the text may be longer than the model's
        # context (a whole document naming a person, say).
        self._need_tokenizer()
        with self.reading() as snap:
            return snap.unlearner.find(text, threshold, metric=metric, limit=None)

    def check_request_id(self, request_id: str, ids: Sequence[Any], mode: str | None = None) -> bool:
        """Whether the library completed `request_id` (say from the command line) for these IDs; 409 if it
        completed it for other examples.

        The server's own jobs claim their request ids in the job journal; a request the library completed
        outside the server has no claim there, only the library's record, which the library would refuse to
        reuse for other IDs (and replays for the same ones). Asked before a job is queued, and when it runs."""
        with self.reading() as snap:
            try:
                return snap.unlearner.completed_request(request_id, ids, mode) is not None
            except ForgetError as err:
                raise ApiError(409, "request_id_conflict", str(err)) from None

    def dry_run(self, ids: Sequence[Any], mode: str, request_id: str) -> ForgetReport:
        """Preview a forget on the published weights. A degraded server still answers it while the weights it
        serves are where the audit log ends (the weights on disk were replaced under it, say); where they are not
        (served off the record, or a failed commit's audit record already written), the library would refuse the
        request as such, and the preview gets the same 503 `degraded` a real request gets, not a 422 that
        blames the request."""
        with self.reading() as snap:
            if self.degraded and not on_audit_record(self.store, snap.model_hash):
                raise ApiError(503, "degraded", self.degraded)
            return snap.unlearner.forget(list(ids), mode=mode, request_id=request_id, dry_run=True)

    def forget(self, ids: Sequence[Any], mode: str, request_id: str) -> ForgetReport:
        """Run one forget on the writer's private model copy (the caller is the job runner's thread).

        Raises `NotWritable` if it may not start (nothing changed) and `CommitFailed` if its commit failed."""
        with self._writer_serial:
            self._check_writable()
            with self._rw.read():
                published = self._snapshot.model
                # Start from exactly the published weights: a request that stopped short of its target
                # leaves the writer's copy at its best admissible point, which was never published.
                with torch.no_grad():
                    self._writer.model.load_state_dict(published.state_dict())
            # Checked at submission too; again here, because the command line may have completed the
            # request id in the meantime (the library would refuse too, but as a plain invalid input).
            self.check_request_id(request_id, ids, mode)
            return self._writer.forget(list(ids), mode=mode, request_id=request_id)

    def _commit_and_publish(self, commit: Callable[[], None], report: ForgetReport, writer: Unlearner) -> None:
        """Save + erase + audit (the library's commit) and publish the new weights, as one write section.

        `writer`: the committing one (not `self._writer`: after a restart in one process, a runner left busy by
        the previous stop commits with its own). Its commit lock is taken before the write section, so that
        waiting for another process's commit or recovery never holds the readers."""
        candidate = copy.deepcopy(writer.model)  # outside the write section: readers keep going
        candidate.eval()
        # Built before the commit, so that nothing that can fail stands between the weights on disk changing
        # and readers being served them (only the writer's thread replaces snapshots: the version is stable).
        snapshot = self._new_snapshot(candidate, report.model_hash_after or model_hash(candidate),
                                      self._snapshot.version + 1)
        with writer.commit_lock(), self._rw.write():
            self._check_writable()  # the calibration took a while: look at the weights on disk again
            try:
                commit()
                self._snapshot = snapshot
                self._weights = weights_fingerprint(self.settings.model)
            except BaseException as err:
                # The weights may or may not have reached the disk; only a restart (whose recovery compares
                # the weights on disk with the journal) can tell which state the store must agree with.
                self.degraded = (f"forget request {report.request_id} failed while committing "
                                 f"({type(err).__name__}); restart the server to settle it")
                log.error("%s", self.degraded, exc_info=isinstance(err, Exception))
                if isinstance(err, Exception):
                    raise CommitFailed(self.degraded) from err
                raise
        log.info("request %s committed: model version %d (hash %s)", report.request_id, snapshot.version,
                 snapshot.model_hash[:16])


def _valid_str_id(raw: str) -> bool:
    try:
        normalize_id(raw)
    except (InvalidInputError, UnicodeError):
        return False
    return True


