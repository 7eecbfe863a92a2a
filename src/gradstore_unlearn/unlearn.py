"""The unlearning engine: calibrated gradient ascent with stored first-epoch embedding gradients.

`Unlearner.forget(ids)`:

1. one batched read of the examples' stored rows, token sequences and learning rates;
2. gradient ascent on the input-embedding matrix through the fused kernel, W += s * lr_i * g_i, whose
   dot-product scores against the current retain-loss gradient measure each example's first-order
   interference with what must be kept;
3. calibration of s by bracketing and bisection until the forgotten examples' mean loss reaches the target —
   the mean loss of holdout examples the model never saw — while a retain guard holds (the mean loss of every
   retained example, estimated from a sample stratified by how much the example shares with the forgotten ones,
   may rise by at most `retain_tolerance`, 2%). It stops *at* the target: over-unlearning
   leaks membership as surely as under-unlearning. If the guard forbids the target, the model is left at the
   best admissible point and the report says so;
4. in `iterative` mode, further calibrated steps with fresh gradients of the forgotten examples on the current
   model, each example pulled toward its own target (ranks matched to the holdout loss distribution, so that
   forgotten and never-seen examples become indistinguishable, not merely equal on average), each step
   spending at most `step_room` (15%) of the guard's room left (see "Paced steps" below);
5. on success: the model is saved atomically, the examples are erased from the store, and an audit record is
   appended — through a journal, so that a crash at any point leaves the model on disk in the before- or
   the after-state and `recover()` finishes or rolls back the request.

Which rows move. An embedding row is shared by every example that contains its token. Moving the rows of
template tokens (the "Name:", the digits) by the forgotten examples' gradient raises every record's loss as
much as the forgotten ones' (measured: retain +119% at the target). So by default each row is weighted by the
share of the token's stored examples that are being forgotten, squared (`row_weighting="ownership"`):
rows that belong to the forgotten examples move, shared rows barely do. `row_weighting="none"` is the
paper's plain method, kept for the ablation. In iterative mode an optional repair step (`repair=True`) descends
the retain loss of a pool of retained examples on the rows the forgotten examples do *not* own. It is off by
default: it fits the examples it sees and not the others. Measured before steps were paced, on another CPU, on the
demo's by-ID request at the same 2% guard (benchmarks/repair_effect.py): with repair the forgotten records' loss
stopped at 1.92 nats, without it at 4.66 (target 5.52), while the retained examples neither the repair step nor the
guard saw did not gain (docstrings +6.8% vs +3.8%, records +0.7% vs +0.1%); the repaired docstrings themselves fell
6.9%. The test world agrees (with repair 1 of 5 sampling seeds reached the target, without 5 of 5).

What moves a shared row still costs the examples that share it. So by default each step is also projected
(`projection="rows"`): every row of the step that would raise the mean loss of a pool of retained examples
(disjoint from the guard) to first order keeps only its part orthogonal to that row of their gradient. The
gradient is of the whole tied matrix, so the output side counts too; it is read again on the current model
before each fresh step. A row has D directions and the pool's gradient takes one: most of the step survives.
Measured before steps were paced, on another CPU (benchmarks/projection_effect.py): on the demo's two requests, at
three sampling seeds, both requests together moved the retain records' perplexity less (+1.10%, +1.15%, +1.10%
against +2.36%, +1.76%, +1.89% without), while the by-ID request got further at every seed (4.66, 4.70, 4.77 nats
against 3.99, 3.28, 3.28; target 5.52). On eight random sets of four records, 3 reached their target (1 without), 5
of 8 got further, mean loss 4.56 against 3.43 nats, retain records +1.34% against +1.08%, docstrings +1.26% against
+1.42%. (On the CPU it was first measured on, whose trained model differs slightly, the random sets were about even:
mean loss 4.30 against 4.22.) Only the embedding's step is projected: the other parameters of the layers ablation
take their plain step. `projection="none"` is the plain step, kept for the ablation.

`precondition="fisher"` divides each element of the ascent by the diagonal Fisher of a pool of retained examples
(disjoint from the guard), plus a damping: the elements the retained examples are most sensitive to move least.
The Fisher is of the whole tied matrix, so the output side counts, which the lookup gradients do not see. Off by
default: on the demo it cut the damage to the docstrings and general text, and raised the damage to the
retained records, which share the forgotten records' rows (benchmarks/guard_tolerance.py).

Paced steps. A step's damage grows faster than its size (the projection removes only its first-order part), and
each fresh step is aimed and projected on the model the last one left. So in iterative mode no step may spend more
than `step_room` of the guard's room left: the room shrinks geometrically, the steps with it, and the request
takes many small, freshly aimed steps instead of a few that spend the room at once. Measured on the demo's setting
(benchmarks/projection_effect.py --compare step_room): the by-ID request reached its target at 2 of 3 sampling
seeds (5.60, 5.50, 5.14 nats; target 5.60) where unpaced steps reached it at none (3.09, 4.83, 4.01); on eight
random sets of four records 5 reached it against 2, mean loss 5.34 against 4.69, docstrings +0.43% against +1.24%.

A request that stops short leaves its change in the model (in memory); the next request starts from there, and
its commit saves that change too, so the commit names it (`ForgetReport.carries`, kept in the audit record): the
model hashes chain from the trained model to the weights on disk.

Each request's guard is measured from the model it starts on, so requests in a row add up; a drift budget kept in
the store (`set_drift_budget`, drift.py) bounds the sum: each request's guard gets at most the rise it has left, and
a change the budget's own panel reads over it is taken back along itself until it is within.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import numbers
import os
import random
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradstore import FormatError, GradStore, InvalidInputError, StoreLockedError, UnknownIdError
from gradstore._encoding import normalize_id
from gradstore_kernels import ascent_score, topk_influence

from .capture import is_later_epoch_record
from .drift import (
    DRIFT_BUDGET_KEY,
    DriftReading,
    allowed_rise,
    check_budget,
    drop_from_panel,
    load_drift_budget,
    new_drift_budget,
    panel_mean,
    signed_percent,
    write_drift_budget,
)
from .evaluate import context_length, sequence_losses
from .fuzzy import Match, ShingleIndex
from .gradients import embedding_gradient, inverse_hvp, matrix_gradient, retain_fisher, sparse_rows
from .tables import format_pairs
from .train import quiet_transformers

log = logging.getLogger("gradstore_unlearn")

MODES = ("first_epoch", "iterative")
QUERY_TYPES = ("auto", "id", "text")
LAYERS = ("embedding", "last2", "all")
REQUESTS = "requests"  # requests/<request id>.json: the report of each completed request (idempotency)
FORGET_JOURNAL = "forget-journal"  # forget-journal/<request id>.json: a request between model save and erase
REFERENCE_KEY = "reference/holdout.json"
# What a commit records of each uncommitted change it carries, besides its request id, status and model hashes:
# the damage those changes did is not in the commit's own before/after metrics, which start from them.
CARRIED_METRICS = ("forget_loss_before", "forget_loss_after", "retain_loss_before", "retain_loss_after")
COMMIT_LOCK = "forget-commit"  # the store lock a forget's commit and a recovery hold (locks/forget-commit.json)
COMMIT_LOCK_TIMEOUT_S = 600.0  # a commit erases from the store: minutes on a large one
# Request ids become object names (requests/<id>.json): no separators, no dot-dot, bounded length.
REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


@dataclass
class _GuardSample:
    """Retained examples that judge a request's damage, and their stratum weights.

    sequences: token id lists [n]; weights: float64 [n], summing to 1. Each example stands for its stratum
    (at risk, or the rest) in proportion to the stratum's share of all retained examples, so the weighted
    mean loss estimates the mean over *every* retained example: an at-risk sample read as a plain mean would
    overstate the damage, a random sample alone would miss where it concentrates.
    """

    sequences: list[list[int]]
    weights: torch.Tensor

    def __bool__(self) -> bool:
        return bool(self.sequences)


class ForgetError(InvalidInputError):
    """A forget request that cannot be carried out as asked (nothing changed)."""


@dataclass
class ForgetConfig:
    """How `forget` calibrates. Defaults are the engine's recommended method; see the module docstring."""

    retain_tolerance: float = 0.02  # the retain loss (guard="loss") or perplexity may rise by at most this
    guard: str = "perplexity"  # "perplexity": the loss and exp(loss) both within the tolerance; "loss": the loss
    target_tolerance: float = 0.02  # success when the forget mean is within this fraction of the target
    row_weighting: str = "ownership"  # "ownership" | "none" (the paper's plain ascent)
    ownership_power: float = 2.0
    match: str = "quantiles"  # iterative targets: "quantiles" of the holdout losses, or the holdout "mean"
    layers: str = "embedding"  # "embedding" | "last2" | "all" (fresh gradients where nothing is stored)
    stored_epochs: str = "first"  # "first" | "all" (sum the records of every epoch: the paper's comparison)
    initial_scale: float = 1.0
    calibrate: bool = True  # False: apply `initial_scale` as is (the "fixed step" ablation)
    bisect_steps: int = 14
    max_iterations: int = 40
    iterative_step: float = 0.01  # first fresh step, as a fraction of ||W|| (x1.5 after a good step, /2 after a bad)
    # In iterative mode each step (the stored one included, which never spends more than a quarter) may spend at
    # most this fraction of the guard's room left: many small steps, each projected against the pool's gradient
    # on the model as it then is, forget more within the guard than a few large ones
    # (benchmarks/results/step_room_cpu.json). 1: the fresh steps unpaced, as before pacing.
    step_room: float = 0.15
    confidence_power: float = 0.0  # > 0: fresh ascent weighs each token by p^γ (see gradients.own_mean_losses)
    retain_sample: int = 64
    repair: bool = False  # True: after each fresh step, descend retained examples' loss on rows not owned
    precondition: str = "none"  # "fisher": divide each ascent element by the retained examples' Fisher (+ damping)
    fisher_damping: float = 1.0  # the damping, as a multiple of the Fisher's mean: larger is closer to plain ascent
    projection: str = "rows"  # "rows": drop, row by row, the part of a step that raises a retained pool's loss
    seed: int = 0
    batch_size: int = 32

    def draws_pool(self, mode: str) -> bool:
        """Whether a request in `mode` splits a pool of retained examples off its guard sample: the pool the
        repair step descends on, the Fisher is taken over and the steps are projected against."""
        return (mode == "iterative" and self.repair) or self.precondition == "fisher" or self.projection != "none"

    def validate(self) -> None:
        if self.row_weighting not in ("ownership", "none"):
            raise InvalidInputError(f"row_weighting must be 'ownership' or 'none', got {self.row_weighting!r}")
        if self.match not in ("quantiles", "mean"):
            raise InvalidInputError(f"match must be 'quantiles' or 'mean', got {self.match!r}")
        if self.layers not in LAYERS:
            raise InvalidInputError(f"layers must be one of {LAYERS}, got {self.layers!r}")
        if self.stored_epochs not in ("first", "all"):
            raise InvalidInputError(f"stored_epochs must be 'first' or 'all', got {self.stored_epochs!r}")
        if self.precondition not in ("none", "fisher"):
            raise InvalidInputError(f"precondition must be 'none' or 'fisher', got {self.precondition!r}")
        if self.projection not in ("none", "rows"):
            raise InvalidInputError(f"projection must be 'none' or 'rows', got {self.projection!r}")
        if self.guard not in ("perplexity", "loss"):
            raise InvalidInputError(f"guard must be 'perplexity' or 'loss', got {self.guard!r}")
        for name in ("calibrate", "repair"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"{name} must be true or false, got {getattr(self, name)!r}")
        # Every number is checked here, when the configuration is made, not half-way through a request.
        ranges = {"retain_tolerance": (0, 10), "target_tolerance": (0, 1), "ownership_power": (None, None),
                  "initial_scale": (0, None), "iterative_step": (0, None), "confidence_power": (None, None),
                  "fisher_damping": (0, None), "step_room": (0, None)}
        for name, (above, below) in ranges.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidInputError(f"{name} must be a finite number, got {value!r}")
            if (above is not None and value <= above) or (below is not None and value >= below):
                bounds = " and ".join(([f"> {above}"] if above is not None else [])
                                      + ([f"< {below}"] if below is not None else []))
                raise InvalidInputError(f"{name} must be {bounds}, got {value!r}")
        if self.ownership_power < 0 or self.confidence_power < 0:
            raise InvalidInputError("ownership_power and confidence_power must be >= 0")
        for name, least in (("bisect_steps", 0), ("max_iterations", 0), ("retain_sample", 1), ("batch_size", 1),
                            ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InvalidInputError(f"{name} must be an integer >= {least}, got {value!r}")


# What the report's count of `ids` means, by status: only a "forgotten" request forgot (and erased) them.
_EXAMPLES_LABEL = {"forgotten": "examples forgotten", "dry_run": "examples it would forget",
                   "target_not_met": "examples not forgotten (target not met)"}


@dataclass
class ForgetReport:
    """The outcome of one forget request. `ids` are the caller's; persisted copies keep only salted hashes."""

    request_id: str
    status: str  # "forgotten" | "target_not_met" | "dry_run" | "nothing_to_do"
    mode: str
    ids: list[Any] = field(default_factory=list)
    already_forgotten: list[Any] = field(default_factory=list)
    target_loss: float | None = None
    forget_loss_before: float | None = None
    forget_loss_after: float | None = None
    retain_loss_before: float | None = None
    retain_loss_after: float | None = None
    scale: float | None = None
    iterations: int = 0
    evaluations: int = 0
    interference: list[float] = field(default_factory=list)  # kernel scores: <lr_i g_i, d retain loss / dW>
    # One entry per example of `ids` (the live IDs acted on), in that order -- no IDs, so persisted copies carry
    # it as is: loss_before, loss_after, target (its own quantile target when fresh iterative steps ran with
    # match="quantiles", else the mean target), tokens (distinct) and owned_tokens (those at least half of whose
    # stored examples this request forgets: the rows ownership weighting lets move freely).
    examples: list[dict[str, Any]] = field(default_factory=list)
    target_tolerance: float = 0.02  # the band: "below its target" means more than this fraction under it
    model_hash_before: str | None = None
    model_hash_after: str | None = None
    # Earlier requests of this engine that stopped short (target_not_met) and left their changes in the model this
    # request started from: a commit saves those changes too, so its audit record names them, oldest first, each
    # {"request_id", "status", "id_hashes" (the salted hashes of the IDs it acted on), "model_hash_before",
    # "model_hash_after", and the forget and retain losses before and after}: the chain of model hashes stays whole,
    # and the damage they did is on record.
    carries: list[dict[str, Any]] = field(default_factory=list)
    # The store's drift budget (drift.py), if it has one: {"before": DriftReading.to_dict() on the model the request
    # started from, "after": on the model it left}, both without the request's own examples. None without a budget.
    drift: dict[str, Any] | None = None
    erasure_receipt: str | None = None
    seconds: float = 0.0
    message: str = ""

    @property
    def retain_change(self) -> float | None:
        if self.retain_loss_before is None or self.retain_loss_after is None:
            return None
        return self.retain_loss_after / self.retain_loss_before - 1.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["retain_change"] = self.retain_change
        return out

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ForgetReport:
        doc = {k: v for k, v in doc.items() if k in cls.__dataclass_fields__}
        return cls(**doc)

    def to_table(self) -> str:
        change = self.retain_change
        return format_pairs([
            ("request", self.request_id), ("status", self.status), ("mode", self.mode),
            (_EXAMPLES_LABEL.get(self.status, "examples acted on"), len(self.ids)),
            ("already forgotten", len(self.already_forgotten)),
            ("target (holdout) loss", self.target_loss), ("forget loss before", self.forget_loss_before),
            ("forget loss after", self.forget_loss_after), ("retain loss before", self.retain_loss_before),
            ("retain loss after", self.retain_loss_after),
            ("retain change", None if change is None else f"{100 * change:+.2f}%"),
            ("examples below their target", self._below_target_summary()),
            ("scale", self.scale), ("iterations", self.iterations), ("loss evaluations", self.evaluations),
            ("model hash after", (self.model_hash_after or "-")[:16]
             + (" (in memory only: nothing saved or erased)" if self.status == "target_not_met"
                and self.model_hash_after and self.model_hash_after != self.model_hash_before else "")),
            ("carries changes of", ", ".join(c["request_id"] for c in self.carries) or "-"),
            ("drift budget", self._drift_summary()),
            ("erasure receipt", self.erasure_receipt),
            ("seconds", round(self.seconds, 2)), ("note", self.message or "-"),
        ])

    def _drift_summary(self) -> str:
        if not self.drift:
            return "-"
        before, after = self.drift["before"], self.drift["after"]
        return (f"{signed_percent(before['change'])} -> {signed_percent(after['change'])} of "
                f"+{100 * after['budget']:.2f}% ({after['kind']}, since model {after['baseline_model_hash'][:12]})")

    def below_target(self) -> list[int]:
        """Positions in `ids` of the examples whose loss ended below their own target band, furthest first."""
        short = [(e["target"] - e["loss_after"], i) for i, e in enumerate(self.examples)
                 if e["loss_after"] < e["target"] * (1 - self.target_tolerance)]
        return [i for _, i in sorted(short, reverse=True)]

    def _below_target_summary(self) -> str | None:
        if not self.examples:
            return None
        below = self.below_target()
        return f"{len(below)} of {len(self.examples)}"


def check_request_id(request_id: Any) -> str:
    """`request_id` if it can name a request (it becomes an object name in the store), else `ForgetError`."""
    if not isinstance(request_id, str) or not REQUEST_ID.fullmatch(request_id):
        raise ForgetError(f"invalid request id {request_id!r}: 1 to 128 characters from letters, digits and "
                          "'._:-', starting with a letter or digit")
    return request_id


def model_hash(model: torch.nn.Module) -> str:
    """sha256 over the parameters' names, dtypes, shapes and bytes (tied parameters counted once)."""
    digest = hashlib.sha256()
    seen: set[int] = set()
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


STAGING_PREFIX = ".saving-"  # <model dir>/.saving-<hex>/: new weights, written before they are renamed into place


def save_weights_atomically(model: Any, model_dir: str | os.PathLike[str],
                            on_staged: Callable[[dict[str, str], str], None] | None = None) -> None:
    """Replace the weights in `model_dir`, each file in one rename: a crash leaves the old or the new weights.

    The files are written and fsynced into a staging folder beside their final names first; `on_staged` then
    receives their sha256 digests ({file name: hex}) and the folder's name before any is renamed into place,
    so that a journal can say which weights a request saved and finish the renames after a crash between two
    of them (sharded weights; see `install_staged_weights`). Weight files the new set does not name (an old
    `pytorch_model.bin`, shards of another count) are deleted after it: they hold the weights from before.
    """
    directory = Path(model_dir)
    staging = directory / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        with quiet_transformers():
            model.save_pretrained(staging, safe_serialization=True)
        names = sorted(n for n in os.listdir(staging) if n.endswith((".safetensors", ".safetensors.index.json")))
        digests = {}
        for name in names:
            with open(staging / name, "rb") as f:
                os.fsync(f.fileno())
            digests[name] = _file_sha256(staging / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing was renamed: the old weights are whole
        raise
    if on_staged is not None:
        try:
            on_staged(digests, staging.name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    install_staged_weights(directory, staging.name, digests)


def install_staged_weights(model_dir: str | os.PathLike[str], staging_name: str, digests: dict[str, str]) -> bool:
    """Rename the staged files whose final copy is not yet in place (shards before the index naming them),
    delete weight files the new set does not name, drop the staging folder. Safe to repeat after a crash.

    Returns False, changing nothing, if a file is neither in place nor staged with its digest.
    """
    directory = Path(model_dir)
    staging = directory / staging_name
    pending = []
    for name, digest in digests.items():
        if _sha256_or_none(directory / name) == digest:
            continue
        if _sha256_or_none(staging / name) != digest:
            return False
        pending.append(name)
    for name in sorted(pending, key=lambda n: n.endswith(".json")):
        os.replace(staging / name, directory / name)
    for name in os.listdir(directory):
        if name.endswith(WEIGHT_SUFFIXES) and name not in digests and (directory / name).is_file():
            (directory / name).unlink()
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    shutil.rmtree(staging, ignore_errors=True)
    return True


def _sha256_or_none(path: Path) -> str | None:
    try:
        return _file_sha256(path)
    except FileNotFoundError:
        return None


WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")


def weights_fingerprint(model_dir: str | os.PathLike[str]) -> tuple[Any, ...]:
    """(name, size, mtime, inode) of each weight file: cheap, and changed by any save (an atomic save renames
    a new file into place: a new inode), where hashing gigabytes of weights at each forget would not be."""
    out = []
    try:
        with os.scandir(model_dir) as entries:
            for entry in entries:
                if entry.name.endswith(WEIGHT_SUFFIXES) and entry.is_file():
                    st = entry.stat()
                    out.append((entry.name, st.st_size, st.st_mtime_ns, st.st_ino))
    except FileNotFoundError:
        return ()
    return tuple(sorted(out))


def weights_on_disk(model_dir: str | os.PathLike[str], digests: dict[str, str]) -> bool:
    """Whether `model_dir` holds exactly the weight files `save_weights_atomically` staged with these digests."""
    try:
        return all(_file_sha256(Path(model_dir) / name) == digest for name, digest in digests.items())
    except FileNotFoundError:
        return False


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class AuditChain:
    """A store's forget audit trail followed by model hash, from each record (and the uncommitted changes it
    carried) to the next, and optionally to the weights of a model: `whole` if nothing changed off the record."""

    commits: int  # since the newest `trained` record, if any
    carried: int
    first_hash: str | None  # the model the chain starts from: the newest trained model's, if training recorded it
    # The newest `trained` record's model hash (record_trained_model): None if training recorded none, and the
    # chain then starts wherever the first forget started.
    trained_hash: str | None
    last_hash: str | None  # the model the last commit saved
    model_hash: str | None  # of the model given, if any
    problems: list[str] = field(default_factory=list)
    # Commits in progress or interrupted after their weights were saved (journaled, audit record not yet
    # written): links whose after-state is the model given; the next engine on the store finishes them.
    pending: list[str] = field(default_factory=list)
    # Models adopted since the newest training (`adopt_model`): each {"model_hash", "previous_head"}, oldest first.
    # The chain goes on from the newest; each is a change made off the record, named here so that none is hidden.
    adopted: list[dict[str, Any]] = field(default_factory=list)

    @property
    def whole(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"whole": self.whole}

    def summary(self) -> str:
        """One line, then one per pending request and per problem: what `gradstore audit --model` prints."""
        start = (f"the trained model {self.trained_hash[:16]}" if self.trained_hash else
                 f"model {(self.first_hash or '-')[:16]} (no training record: compare it with the trained model's hash)")
        lines = [f"hash chain: {'whole' if self.whole else 'BROKEN'}: {self.commits} commit(s), {self.carried} "
                 f"carried change(s), from {start} to {(self.last_hash or '-')[:16]}"
                 + (f"; model given: {self.model_hash[:16]}" if self.model_hash else "")]
        if self.pending:
            lines.append(f"  pending (weights saved, audit record not yet written): {', '.join(self.pending)}")
        lines += [f"  adopted model {a['model_hash'][:16]}, changed off the record from "
                  f"{(a.get('previous_head') or '-')[:16]}" for a in self.adopted]
        return "\n".join(lines + [f"  {p}" for p in self.problems])


def verify_audit_chain(store: GradStore, model: torch.nn.Module | None = None, *,
                       weights_hash: str | None = None) -> AuditChain:
    """Follow the model hashes of `store`'s forget audit records, oldest first (commits are serialised by the
    store's commit lock and named in that order), from the trained model where training recorded it
    (`record_trained_model`): each change must start from the model the one before it left (the first, from the
    trained model),
    and, given `model` (or its `model_hash`, `weights_hash`), its weights must be the last commit's. A break
    means weights changed off the record."""
    problems: list[str] = []
    first = previous = trained = last = None  # last: the model the newest commit saved (none since training)
    source = "the trained model"  # where `previous` comes from, for the messages
    commits = carried = 0
    adopted: list[dict[str, Any]] = []
    for record in store.audit_log():
        if record.get("kind") == "trained":
            # Training (again) with capture: the chain starts again from the model it ended with (the commits
            # before it are counted no more; a break found before it stays a problem).
            trained = previous = first = record.get("model_hash")
            last, commits, carried, adopted, source = None, 0, 0, [], "the trained model"
            continue
        if record.get("kind") == "adopted":
            # A model changed off the record, adopted deliberately: the chain goes on from it, and says so.
            previous = last = record.get("model_hash")
            first = first if first is not None else previous
            adopted.append({"model_hash": previous, "previous_head": record.get("previous_head")})
            source = "the adopted model"
            continue
        if record.get("kind") != "forget":
            continue
        commits += 1
        carried += len(record.get("carries") or [])
        for link in _links(record):
            before, after = link.get("model_hash_before"), link.get("model_hash_after")
            if first is None:
                first = before
            elif before != previous:
                problems.append(f"request {link.get('request_id')} started from model {str(before)[:16]}, not "
                                f"{str(previous)[:16]} ({source}): a change between them is not on record")
            previous = last = after
            source = "the one the change before it left"
    given = model_hash(model) if model is not None else weights_hash
    pending: list[str] = []
    if given is not None and given != previous:
        # A commit between its weights and its audit record (running now, or crashed there) is on record in the
        # forget journal: its links continue the chain to the weights given.
        links = _pending_links(store, previous, given)
        if links is not None:
            first = first if first is not None else links[0].get("model_hash_before")
            pending.append(str(links[-1].get("request_id")))
            previous = last = given
    if given is not None and previous is not None and given != previous:
        weights = {"the trained model": "the trained model's", "the adopted model": "the adopted model's"}.get(
            source, "the ones the last commit saved")
        problems.append(f"the model's weights ({given[:16]}) are not {weights} ({previous[:16]})")
    return AuditChain(commits, carried, first, trained, last, given, problems, pending, adopted)


def _links(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The changes a commit saved, oldest first: the uncommitted ones it carried, then its own (an audit record, or
    a forget journal entry, whose report holds the carried ones)."""
    carried = record.get("carries") if "carries" in record else record.get("report", {}).get("carries")
    return [*(carried or []), record]


def _pending_links(store: GradStore, head: str | None, weights: str) -> list[dict[str, Any]] | None:
    """The links of a commit in the forget journal (weights saved, audit record not yet written: running, or
    crashed there) that lead from `head` (None: from anywhere) to `weights`; None if there is none."""
    objects = store.objects
    for name in sorted(objects.list_dir(FORGET_JOURNAL)):
        try:
            entry = json.loads(objects.read(f"{FORGET_JOURNAL}/{name}"))
        except (FileNotFoundError, ValueError):
            continue
        links = _links(entry)
        if links[-1].get("model_hash_after") == weights and (
                head is None or links[0].get("model_hash_before") == head):
            return links
    return None


def audit_head(store: GradStore) -> str | None:
    """The model hash the store's audit log ends at: the weights its newest forget commit saved, or the model its
    newest training ended with or that was adopted last (None when none is on record). Reads the log from its
    newest end."""
    for record in store.audit_log_newest_first():
        if record.get("kind") == "forget":
            return record.get("model_hash_after")
        if record.get("kind") in ("trained", "adopted"):
            return record.get("model_hash")
    return None


def on_audit_record(store: GradStore, weights: str) -> bool:
    """Whether a model with hash `weights` is where the store's audit log ends: its head, or the after-state of a
    commit pending in the forget journal from there (its audit record is written when it is finished), or any
    model when nothing is on record."""
    head = audit_head(store)
    return head is None or head == weights or _pending_links(store, head, weights) is not None


def check_model_fits_store(model: torch.nn.Module, store: GradStore) -> None:
    """Raise InvalidInputError unless `model`'s input embedding [V, D] could be what `store` captured: D equal to
    the store's dim and V within its vocabulary (a store may be made wider than the model's vocabulary)."""
    weight = _unwrapped(model).get_input_embeddings().weight
    shape = tuple(getattr(weight, "ds_shape", None) or weight.shape)  # DeepSpeed ZeRO-3 keeps a [0] shard locally
    if len(shape) != 2 or shape[1] != store.dim or shape[0] > store.vocab_size:
        raise InvalidInputError(f"the store (dim {store.dim}, vocab {store.vocab_size}) was not captured from this "
                                f"model (embedding {shape})")


def adopt_model(store: GradStore, model: torch.nn.Module) -> str:
    """Append an `adopted` record: the audit chain goes on from `model`, changed off the record from where the log
    ended (fine-tuned after training, say). Returns its hash.

    Refused for a state on the record that a committed forget came after (the model before that commit, or an
    earlier adopted or trained one): it still knows what that commit erased, and those examples could never be
    forgotten from it. Refused too while a commit is pending in the forget journal (the next forget, or a
    server's restart, finishes it). Holds the commit lock, so that no commit lands in between."""
    check_model_fits_store(model, store)
    digest = model_hash(_unwrapped(model))
    with store.lock(COMMIT_LOCK, timeout_s=COMMIT_LOCK_TIMEOUT_S):
        if store.objects.list_dir(FORGET_JOURNAL):
            raise ForgetError("a forget commit is pending in the store's forget journal (running, or crashed after "
                              "saving its weights): finish it first (any forget request does, as does a server's "
                              "start), then adopt")
        head = audit_head(store)
        if digest == head:
            return digest  # already where the log ends
        # Where each model state last appears in the log, and where the last commit is: a state that last
        # appears before a commit predates what that commit erased.
        seen: dict[str, tuple[float, str]] = {}
        last_commit = -1.0
        for position, record in enumerate(store.audit_log()):
            if record.get("kind") == "forget":
                for link in _links(record):
                    seen[str(link.get("model_hash_before"))] = (position - 0.5, f"request {link.get('request_id')}")
                seen[str(record.get("model_hash_after"))] = (float(position), f"request {record.get('request_id')}")
                last_commit = float(position)
            elif record.get("kind") in ("trained", "adopted"):
                seen[str(record.get("model_hash"))] = (float(position), f"the {record['kind']} model")
        where = seen.get(digest)
        if where is not None and where[0] < last_commit:
            raise ForgetError(f"model {digest[:16]} is an earlier state on the store's audit record ({where[1]}), "
                              "and forgets were committed after it: it still knows what they erased, which could "
                              "then never be forgotten from it. Adopt only a model that descends from the one the "
                              f"log ends at ({(head or '-')[:16]})")
        store.append_audit({"kind": "adopted", "time": time.time(), "model_hash": digest, "previous_head": head})
    return digest


def record_trained_model(store: GradStore, model: torch.nn.Module) -> str:
    """Append a `trained` record (the model's hash) to the store's audit log: where the forget audit chain starts.

    Called when training with capture ends (`train_model`, `GradStoreCallback`; a loop of your own calls it after
    its last step, with the model it saves). Without it the chain starts wherever the first forget started, which no
    record vouches for. Training again into the store appends another: the chain goes on from the newest. A wrapper
    (DDP's `.module`, torch.compile's `._orig_mod`) is looked through, so that the hash is the saved model's; under
    torch.distributed only rank 0 writes. (A PEFT model: record the merged model that is saved.) Returns the hash.
    """
    check_model_fits_store(model, store)  # the chain would start at a model no forget on this store can use
    digest = model_hash(_unwrapped(model))
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        store.append_audit({"kind": "trained", "time": time.time(), "model_hash": digest})
    return digest


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP's `.module` and torch.compile's `._orig_mod` wrappers (whose parameter names carry the
    wrapper's prefix, and so another hash than the saved model's)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def save_reference_set(store: GradStore, sequences: Sequence[Sequence[int]]) -> None:
    """Keep token sequences of never-trained holdout examples in the store (the default calibration target)."""
    store.objects.write(REFERENCE_KEY, json.dumps([list(map(int, s)) for s in sequences]).encode())


def load_reference_set(store: GradStore) -> list[list[int]] | None:
    try:
        return json.loads(store.objects.read(REFERENCE_KEY))
    except FileNotFoundError:
        return None


class Unlearner:
    """Forget stored training examples from a model, calibrated, with erasure and an audit trail.

    model: the trained causal LM (modified in place). store: the `GradStore` its training captured into.
    holdout: token sequences the model never saw (default: the store's reference set). retain: token
    sequences of kept examples for the guard and pool (default: a sample of the store's other examples); any equal
    to the token sequence of an example being forgotten is left out of each request's sample.
    model_dir: where the model lives on disk (a saved model: config.json and weights); with it, every successful
    request saves the weights atomically. Construct the engine right after loading the model from there: the
    weights found there at construction are taken for the model's own, and a commit over weights another
    process saved since then is refused (it would undo that process's forget).
    """

    def __init__(self, model: torch.nn.Module, store: GradStore, *, tokenizer: Any = None,
                 holdout: Sequence[Sequence[int]] | None = None, retain: Sequence[Sequence[int]] | None = None,
                 config: ForgetConfig | None = None, model_dir: str | os.PathLike[str] | None = None,
                 pad_token_id: int | None = None):
        self.model = model
        self.store = store
        self.tokenizer = tokenizer
        self.config = config or ForgetConfig()
        self.config.validate()
        self.model_dir = Path(model_dir) if model_dir is not None else None
        if self.model_dir is not None and not (self.model_dir / "config.json").is_file():
            # Only the weights are replaced at each commit: a directory without the model's config would
            # become one that nothing can load (and weights saved there later would look like another
            # process's commit).
            raise InvalidInputError(f"model_dir {self.model_dir} holds no saved model (no config.json): save the "
                                    "model there first (save_pretrained), then construct the Unlearner")
        check_model_fits_store(model, store)
        embedding = model.get_input_embeddings()
        self.holdout = [list(s) for s in holdout] if holdout is not None else load_reference_set(store)
        self._holdout_unchecked = holdout is not None  # a caller's holdout may hold trained texts: checked once
        self._retain = [list(s) for s in retain] if retain is not None else None
        vocab = embedding.weight.shape[0]
        for name, sequences in (("holdout", self.holdout), ("retain", self._retain)):
            for i, sequence in enumerate(sequences or []):
                bad = [t for t in sequence if isinstance(t, bool) or not isinstance(t, numbers.Integral)
                       or not 0 <= t < vocab]
                if bad or len(sequence) < 2:
                    problem = f"token {bad[0]!r} is not in [0, {vocab})" if bad else "it has fewer than 2 tokens"
                    raise InvalidInputError(f"{name} sequence {i}: {problem} (token id lists of this model's "
                                            "vocabulary, each at least 2 tokens long)")
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None) or getattr(model.config, "pad_token_id", 0) or 0
        self.pad_token_id = int(pad_token_id)
        self._doc_freq: torch.Tensor | None = None
        # Of every stored token sequence, filled with `_doc_freq` while a caller's holdout is still to be checked.
        self._stored_digests: set[bytes] = set()
        self._index: ShingleIndex | None = None
        self._id_hashes: dict[Any, str] = {}  # store.id_hash of IDs met (the salt is the store's, fixed)
        self._installed: str | None = None  # the last request whose after-state this process saved (or holds)
        # Requests that stopped short and left their changes in the model, since the last commit (ForgetReport.carries)
        self._uncommitted: list[dict[str, Any]] = []
        self._inadmissible: str | None = None  # one of them left the model beyond its guard: no request builds on it
        # The thread inside `commit_lock()` (a commit there does not take the lock again; another thread waits)
        self._commit_lock_thread: int | None = None
        # The weights on disk as this engine found them (or last saved them): a commit over weights another
        # process has saved since would undo that process's forget.
        self._weights_seen = weights_fingerprint(self.model_dir) if self.model_dir is not None else None
        self.recover(wait=False)  # a journal under a held lock is a commit running now, not a crashed one

    # ------------------------------------------------------------------------------------------- helpers
    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def _losses(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        return sequence_losses(self.model, sequences, batch_size=self.config.batch_size).to(torch.float64)

    def _retain_samples(self, exclude: set[Any], ownership: torch.Tensor, pooling: bool
                        ) -> tuple[list[list[int]], _GuardSample]:
        """(pool, guard sample) of retained examples: the pool repairs, preconditions and projects; the guard judges.

        Damage from forgetting concentrates on the retained examples that share tokens with the forgotten ones
        (a shared surname, street, employer). The examples most at risk (whose tokens the forgotten examples
        own most) form one stratum, the others a second; each is split between the repair pool and the guard,
        at-risk examples alternately by rank, the others at random. The guard must see the at-risk stratum
        (measured: a guard of random examples only passed requests that raised the loss of the other retained
        examples by 12% under a 2% tolerance), and it must be disjoint from the repair pool, so that repair is
        judged on examples it never saw (measured: an overlapping guard passed requests that raised the loss of
        unseen retained examples by 17%). The pool also serves the Fisher preconditioner and the projection (its
        gradient is what the step is projected against); with none of the three the whole at-risk stratum
        goes to the guard.
        From the caller's retain sequences if given, else from the store's other examples.
        """
        size = self.config.retain_sample
        rng = random.Random(self.config.seed)
        # The examples of stopped-short changes this engine carries are being forgotten too (a commit will save
        # those changes): neither the pool nor the guard may hold their loss down.
        carried = {h for c in self._uncommitted for h in c["id_hashes"]}
        if self._retain is not None:
            # The caller's sequences carry no IDs: a copy of a forgotten example's sequence among them (a caller
            # who passes the whole training set, say) is found by its tokens.
            forgotten = [i for i in self.store.ids() if i in exclude or (carried and self._id_hash(i) in carried)]
            gone = {tuple(s) for s in self.store.get_sequences(forgotten)} if forgotten else set()
            pool = [s for s in self._retain if tuple(s) not in gone]
            if len(pool) < len(self._retain):
                log.warning("%d of the %d retain sequences given are the token sequences of examples being "
                            "forgotten: left out of the guard and the pool", len(self._retain) - len(pool),
                            len(self._retain))
            pool = [s for s in pool if len(s) >= 2]
        else:
            ids = self._retained_ids(exclude)
            ids = [i for i in ids if self._id_hash(i) not in carried] if carried else ids
            # The drift budget's panel is not kept out: it is a random sample of the retained examples, pooled ones
            # among them in their share, so it estimates their mean loss without bias. Kept out, it would sample the
            # unprotected examples only and read high (benchmarks/results/sequential_requests_cpu_panel-kept-out-
            # of-pool.json).
            pool = [s for s in (self.store.get_sequences(ids) if ids else []) if len(s) >= 2]
        if len(pool) < 2:  # all of it judges: a pool that also repaired or preconditioned would not be unseen
            return [], _GuardSample(pool, torch.full((len(pool),), 1.0 / max(len(pool), 1), dtype=torch.float64))
        own = ownership.cpu().numpy()
        risk = [float(own[np.unique(np.asarray(s, dtype=np.int64))].sum()) for s in pool]
        order = sorted(range(len(pool)), key=lambda j: -risk[j])
        at_risk = [j for j in order[: min(size, len(pool) // 3)] if risk[j] > 0]
        chosen = set(at_risk)
        rest = [j for j in range(len(pool)) if j not in chosen]
        rng.shuffle(rest)
        if pooling:
            half = max(1, min(size, len(rest) // 2))
            repair = at_risk[0::2] + rest[:half]
            guard_risk, guard_rest = at_risk[1::2], rest[half : 2 * half] or rest[:half]
        else:
            repair, guard_risk, guard_rest = [], at_risk, rest[:size]
        # Each sampled example stands for its stratum's share of the pool, divided among the stratum's sample
        # (shares renormalised over the strata the guard holds).
        strata = [(sample, size) for sample, size in ((guard_risk, len(at_risk)), (guard_rest, len(rest))) if sample]
        total = sum(size for _, size in strata)
        weights = [size / total / len(sample) for sample, size in strata for _ in sample]
        guard = _GuardSample([pool[j] for j in guard_risk + guard_rest], torch.tensor(weights, dtype=torch.float64))
        return [pool[j] for j in repair], guard

    def _retained_ids(self, exclude: set[Any]) -> list[Any]:
        """The store's examples less `exclude` and later-epoch copies, sorted: the store's commit order depends on
        which capture thread wrote which batch, and samples drawn from this must not (the same request on the same
        model and data must decide the same way)."""
        return sorted((i for i in self.store.ids() if i not in exclude and not self._is_epoch_copy(i)),
                      key=lambda i: (isinstance(i, str), i))

    # ---------------------------------------------------------------------------------------- drift budget
    def set_drift_budget(self, budget: float | None, *, kind: str = "perplexity", panel: int = 128,
                         keep_baseline: bool = False) -> DriftReading | None:
        """Bound the retained examples' drift over every later request together (drift.py); None removes it.

        The baseline is the model as it is now: `panel` retained examples drawn at random (config.seed), each
        one's loss read on it; it replaces any budget the store had. `keep_baseline=True` changes only the
        fraction and the kind of the store's budget, keeping its panel and baseline (and the drift since): to raise
        a spent budget without forgetting what was spent. Returns the budget read on this model.
        """
        if budget is None:
            with self.commit_lock():
                write_drift_budget(self.store, None)
            return None
        if isinstance(panel, bool) or not isinstance(panel, int) or panel < 1:
            raise InvalidInputError(f"panel must be an integer >= 1, got {panel!r}")
        check_budget(budget, kind)  # the arguments are checked before any work
        # Under the commit lock: a commit in progress would otherwise prune the panel this replaces, or the baseline
        # would be read on weights about to change.
        with self.commit_lock():
            if keep_baseline:
                current = load_drift_budget(self.store)
                if current is None:
                    raise InvalidInputError("the store has no drift budget whose baseline could be kept: set one")
                current.budget, current.kind = float(budget), kind
                write_drift_budget(self.store, current)
                return self.drift()
            if self._uncommitted or self._inadmissible is not None:
                # The baseline must be weights the audit trail knows: these changes are on no disk and in no record.
                pending = ", ".join(c["request_id"] for c in self._uncommitted) or self._inadmissible
                raise ForgetError(f"the model holds uncommitted changes ({pending}): a baseline read on it would be "
                                  "weights no record names; load the weights again (or commit a request) first")
            if self.model_dir is not None and weights_fingerprint(self.model_dir) != self._weights_seen:
                raise ForgetError(f"the weights in {self.model_dir} were replaced since this engine read them "
                                  "(another process committed a forget?): load the model again, then set the budget")
            ids = self._retained_ids(set())
            chosen = random.Random(self.config.seed).sample(ids, min(panel, len(ids)))
            sequences = self.store.get_sequences(chosen) if chosen else []
            kept = [(i, s) for i, s in zip(chosen, sequences, strict=True) if len(s) >= 2]
            if not kept:
                raise ForgetError("the store holds no retained example with a token sequence to draw a drift panel "
                                  "from")
            if len(kept) < panel:  # the reading's member count says so too
                log.warning("the drift panel has %d members, not the %d asked for: the store holds %d retained "
                            "examples, and one without a token sequence cannot be read", len(kept), panel, len(ids))
            losses = self._losses([s for _, s in kept]).tolist()
            drift = new_drift_budget(budget, kind, model_hash(self.model),
                                     {self._id_hash(i): loss for (i, _), loss in zip(kept, losses, strict=True)})
            write_drift_budget(self.store, drift)
        # Read from the losses just written: nothing that can fail comes after the write.
        mean = panel_mean(losses)
        return DriftReading(drift.budget, drift.kind, drift.model_hash, len(losses), mean, mean)

    def drift(self, exclude: Iterable[Any] = ()) -> DriftReading | None:
        """The store's drift budget read on the model as it is (None without a budget): the panel members still
        stored, less `exclude` (a request's own examples) and the examples of requests whose uncommitted changes
        the model holds: their loss is meant to rise."""
        budget = load_drift_budget(self.store)
        if budget is None:
            return None
        excluded = {self._id_hash(i) for i in exclude} | {h for c in self._uncommitted for h in c["id_hashes"]}
        members = [(i, h) for i in self.store.ids() if (h := self._id_hash(i)) in budget.panel and h not in excluded]
        if not members:
            raise ForgetError("the store's drift budget has no panel member left to measure it (every one is "
                              "forgotten, or being forgotten): set the budget again to draw a new panel "
                              "(gradstore drift --set)")
        sequences = self.store.get_sequences([i for i, _ in members])
        now = panel_mean(self._losses(sequences).tolist())
        baseline = panel_mean(budget.panel[h] for _, h in members)
        return DriftReading(budget.budget, budget.kind, budget.model_hash, len(members), baseline, now)

    def _id_hash(self, example_id: Any) -> str:
        """`store.id_hash`, remembered: a drift reading hashes every stored ID (an HMAC each, ~3 us)."""
        found = self._id_hashes.get(example_id)
        if found is None:
            found = self._id_hashes[example_id] = self.store.id_hash(example_id)
        return found

    def _guard_loss(self, guard: _GuardSample) -> float:
        """The guard's estimate of the mean loss over every retained example (0.0 without a guard)."""
        return float((self._losses(guard.sequences) * guard.weights).sum()) if guard else 0.0

    def _is_epoch_copy(self, key: Any) -> bool:
        """A later-epoch record of an example (capture policy `all`): not an example in its own right. Such
        copies would count an example once per epoch in the ownership weights, and put copies of the examples
        being forgotten into the retain sample."""
        return self.store.config.capture.get("policy") == "all" and is_later_epoch_record(key)

    def document_frequency(self) -> torch.Tensor:
        """float32 [V]: how many stored examples contain each token (cached; updated on erasure)."""
        if self._doc_freq is None:
            counts = np.zeros(self.store.vocab_size, dtype=np.float64)
            digests = set()
            for ids, sequences in self.store.iter_sequences():
                for example_id, tokens in zip(ids, sequences, strict=True):
                    if not self._is_epoch_copy(example_id):  # an example counts once, however many epochs
                        counts[np.unique(tokens)] += 1
                        if self._holdout_unchecked:  # only a caller's holdout is checked against them, once
                            digests.add(_sequence_digest(tokens))
            self._doc_freq, self._stored_digests = torch.from_numpy(counts).float(), digests
        return self._doc_freq

    def _token_shares(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """float64 [store vocab] in [0, 1]: the share of each token's stored examples that are among `sequences`."""
        mine = np.zeros(self.store.vocab_size, dtype=np.float64)
        for tokens in sequences:
            mine[np.unique(np.asarray(tokens, dtype=np.int64))] += 1
        df = self.document_frequency().numpy()
        share = np.where(df > 0, mine / np.maximum(df, 1), 1.0)  # tokens no stored example has: all ours
        return np.clip(share, 0, 1)

    def _ownership(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """float32 [V] in [0, 1]: weight of each embedding row (see the module docstring)."""
        vocab = self.model.get_input_embeddings().weight.shape[0]
        if self.config.row_weighting == "none":
            return torch.ones(vocab)
        return torch.from_numpy(self._token_shares(sequences) ** self.config.ownership_power).float()[:vocab]

    def _targets(self, forget_losses: torch.Tensor, holdout_losses: torch.Tensor) -> torch.Tensor:
        """Per-example targets: the holdout loss quantiles, assigned in the order of the current losses."""
        if self.config.match == "mean" or len(holdout_losses) < 2:
            return torch.full_like(forget_losses, float(holdout_losses.mean()))
        n = len(forget_losses)
        quantiles = torch.quantile(holdout_losses, (torch.arange(n, dtype=torch.float64) + 0.5) / n)
        targets = torch.empty_like(forget_losses)
        targets[torch.argsort(forget_losses)] = quantiles
        return targets

    # ------------------------------------------------------------------------------------------ requests
    def resolve(self, ids: Sequence[Any]) -> tuple[list[Any], list[Any]]:
        """(present IDs, already-forgotten IDs); unknown IDs raise `UnknownIdError` naming them."""
        if not ids:
            raise ForgetError("no IDs given: name at least one example to forget")
        keys = list(dict.fromkeys(normalize_id(i) for i in ids))
        present = [k for k in keys if k in self.store]
        missing = [k for k in keys if k not in self.store]
        already = [k for k in missing if self.store.is_erased(k)]
        unknown = [k for k in missing if k not in already]
        if unknown:
            raise UnknownIdError.naming(unknown, "forget")
        return present, already

    def completed_request(self, request_id: str, ids: Sequence[Any], mode: str | None = None) -> ForgetReport | None:
        """The report of `request_id` if it was completed (its persisted copy: IDs as salted hashes), else None.

        A request id names one request: asking for it again with other examples than it forgot, or (`mode`
        given) in another mode, raises `ForgetError` (its report keeps the hashes of the IDs it named).
        """
        done = self._completed(check_request_id(request_id))
        if done is None:
            return None
        asked = {self.store.id_hash(normalize_id(i)) for i in ids}
        if asked != set(done.ids) | set(done.already_forgotten):
            raise ForgetError(f"request id {done.request_id!r} was already used for a different set of examples; "
                              "a repeated request must name the same IDs (or use a new request id)")
        if mode is not None and mode != done.mode:
            raise ForgetError(f"request id {done.request_id!r} was already used in mode {done.mode!r}; a repeated "
                              f"request must ask for the same mode (or use a new request id)")
        return done

    def _completed(self, request_id: str) -> ForgetReport | None:
        try:
            doc = json.loads(self.store.objects.read(f"{REQUESTS}/{request_id}.json"))
        except FileNotFoundError:
            return None
        return ForgetReport.from_dict(doc)

    def forget(self, ids: Sequence[Any], mode: str = "first_epoch", request_id: str | None = None, *,
               dry_run: bool = False) -> ForgetReport:
        """Forget the examples with these IDs (see the module docstring). Idempotent per `request_id`."""
        if mode not in MODES:
            raise ForgetError(f"unknown mode {mode!r}; choose one of {MODES}")
        if request_id is not None:
            check_request_id(request_id)
        if isinstance(ids, (str, bytes)):
            raise ForgetError(f"ids must be a list of IDs, not one {type(ids).__name__} ({ids!r}): "
                              f"write [{ids!r}]")
        # A commit that failed after its weights were saved (an erasure that raised) is finished first, so
        # that repeating the request returns its report instead of moving the model a second time. A dry run
        # changes nothing and does not wait for the commit lock (a server runs it beside its own commits).
        self.recover(wait=not dry_run)
        present, already = self.resolve(ids)
        if request_id is not None:
            # Asked of a dry run too, so that it is refused where the request would be (an id used for other
            # IDs); a dry run never stands for the completed request, though.
            done = self.completed_request(request_id, present + already, mode)
            if done is not None and not dry_run:
                return done
        request_id = request_id or uuid.uuid4().hex
        if not present:
            return ForgetReport(request_id, "dry_run" if dry_run else "nothing_to_do", mode, ids=present,
                                already_forgotten=already, message="every ID was already forgotten")
        self._check_holdout()
        start = time.perf_counter()
        report = ForgetReport(request_id, "target_not_met", mode, ids=present, already_forgotten=already,
                              target_tolerance=self.config.target_tolerance,
                              model_hash_before=model_hash(self.model))
        if self._uncommitted and self._uncommitted[-1]["model_hash_after"] != report.model_hash_before:
            # The model was replaced since (weights loaded again, as a server does from its published ones): the
            # changes after the state it is now in are not in it, and a commit must not claim to carry them.
            # (The refused state, if any, was the newest change: it is among those dropped.)
            after = [c["model_hash_after"] for c in self._uncommitted]
            keep = len(after) - after[::-1].index(report.model_hash_before) if report.model_hash_before in after else 0
            self._uncommitted, self._inadmissible = self._uncommitted[:keep], None
        self._check_audit_head(self._uncommitted[0]["model_hash_before"] if self._uncommitted
                               else report.model_hash_before)
        if self._inadmissible is not None:
            raise ForgetError(f"the model holds the change that request {self._inadmissible} left beyond the retain guard "
                              "or past the target (a fixed step, calibrate=False): a request would build on it and "
                              "its commit would save it; load the weights again first (nothing changed)")
        if dry_run:  # refused above wherever the request would be; a preview changes nothing
            return ForgetReport(request_id, "dry_run", mode, ids=present, already_forgotten=already,
                                model_hash_before=report.model_hash_before)
        original = {n: p.detach().clone() for n, p in self._parameters()}
        try:
            admissible = self._calibrate(present, mode, report)
        except BaseException:
            with torch.no_grad():  # nothing half-done survives an error: back to the state before the request
                for name, param in self._parameters():
                    param.copy_(original[name])
            raise
        report.seconds = time.perf_counter() - start
        report.model_hash_after = model_hash(self.model)
        if report.status != "forgotten":
            log.warning("request %s: %s", request_id, report.message)
            if report.model_hash_after != report.model_hash_before:
                # Left at its best admissible point (in memory only): the next commit saves this change too.
                self._uncommitted.append({"request_id": request_id, "status": report.status,
                                          "id_hashes": [self._id_hash(i) for i in present],
                                          "model_hash_before": report.model_hash_before,
                                          "model_hash_after": report.model_hash_after,
                                          **{name: getattr(report, name) for name in CARRIED_METRICS}})
                if not admissible:
                    self._inadmissible = request_id
            return report
        report.carries = [dict(c) for c in self._uncommitted]
        try:
            self._commit(present, report)
        except BaseException:
            if self._installed != request_id:
                # Failed before the new weights were in place: the disk holds the before-state, and the model
                # in memory goes back to the state this request found it in, or the next request would start
                # from (and audit) weights that no request's record describes.
                with torch.no_grad():
                    for name, param in self._parameters():
                        param.copy_(original[name])
            else:
                self._uncommitted = []  # on disk with this request's weights (its journal entry names them)
            raise
        self._uncommitted = []  # saved with this commit (its audit record names them)
        report.seconds = time.perf_counter() - start
        return report

    def _check_holdout(self) -> None:
        """The calibration target needs examples the model never saw: refuse a holdout that is missing, or that
        holds a stored (trained) example's token sequence (its loss would make a target the forgotten examples
        already meet, and the request would erase them without forgetting anything)."""
        if not self.holdout:
            raise ForgetError("no holdout examples to calibrate against: pass holdout= (token sequences the model "
                              "never saw; `gradstore forget --holdout FILE.jsonl`) or keep a reference set in the "
                              "store (save_reference_set)")
        if self._holdout_unchecked:
            self.document_frequency()  # fills the stored sequences' digests
            trained = [i for i, seq in enumerate(self.holdout) if _sequence_digest(seq) in self._stored_digests]
            if trained:
                raise ForgetError(f"holdout sequence {trained[0]} (of {len(self.holdout)}; {len(trained)} in all) is "
                                  "the token sequence of a stored example: the model was trained on it, so its loss "
                                  "is no target for forgetting. The holdout must be texts the model never saw")
            self._holdout_unchecked = False

    def _check_audit_head(self, base_hash: str) -> None:
        """Refuse a request on a model other than the one the store's audit log ends at (`base_hash`: the model
        before this engine's uncommitted changes). An older copy, say: its commit would erase the examples' rows
        while the model that is served keeps what they taught it, and could then never forget them."""
        if not on_audit_record(self.store, base_hash):
            head = audit_head(self.store) or "-"
            raise ForgetError(
                f"the model (hash {base_hash[:16]}) is not the one the store's audit log ends at ({head[:16]}: the "
                "weights the last forget saved, or the model training recorded): forgetting on it would erase the "
                "rows while that model keeps what they taught it. Load that model (`gradstore audit --model DIR` "
                "checks a directory); if this one descends from it by a change made off the record (fine-tuning, "
                "say), adopt it first: `gradstore audit --model DIR --adopt` (adopt_model), with no server running on it")

    def _parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The parameters a request may change: the embedding, plus the chosen blocks for the ablation."""
        embedding = self.model.get_input_embeddings().weight
        chosen = [("embedding", embedding)]
        if self.config.layers == "embedding":
            return chosen
        named = [(n, p) for n, p in self.model.named_parameters() if p is not embedding]
        if self.config.layers == "all":
            return chosen + named
        blocks = sorted({n.split(".h.")[1].split(".")[0] for n, _ in named if ".h." in n}, key=int)
        last = set(blocks[-2:])
        return chosen + [(n, p) for n, p in named if ".h." in n and n.split(".h.")[1].split(".")[0] in last]

    # ------------------------------------------------------------------------------------- calibration
    def _calibrate(self, ids: list[Any], mode: str, report: ForgetReport) -> bool:
        """Calibrate and apply the request's step(s), filling `report`. Returns whether the state left is
        admissible: within the guard and, for a fixed step, not past the target band."""
        cfg = self.config
        batch = self.store.get_many(self._stored_keys(ids), with_meta=True)  # ONE batched read
        sequences = _sequences_by_id(batch, ids)
        if any(len(s) < 2 for s in sequences):
            raise ForgetError("a stored example has no token sequence to evaluate; capture stores it with the rows")
        ownership = self._ownership(sequences).to(self.device)
        repair, retain = self._retain_samples(set(ids), ownership, cfg.draws_pool(mode))
        precondition = self._preconditioner(repair)
        forget_before = self._losses(sequences)
        holdout = self._losses(self.holdout)
        retain_before = self._guard_loss(retain) if retain else float("nan")
        evaluations = 3
        target = float(holdout.mean())
        report.target_loss, report.forget_loss_before, report.retain_loss_before = (
            target, float(forget_before.mean()), retain_before)
        # The guard bounds both the retain loss (by the fraction) and the retain perplexity (by the same
        # fraction): whichever is stricter. For losses above 1 nat that is the perplexity.
        limit = retain_before + allowed_rise(cfg.guard, cfg.retain_tolerance, retain_before)
        # The store's drift budget, if any, gives the guard no more than the rise it has left over all requests.
        drift = self.drift(ids)
        spent = drift is not None and drift.remaining <= 0
        budget_binds = drift is not None and bool(retain) and drift.remaining < limit - retain_before
        if budget_binds:
            limit = retain_before + max(drift.remaining, 0.0)
        evaluations += drift is not None
        # In iterative mode the stored step is paced like the fresh steps that follow (`step_room`), and never
        # spends more than a quarter of the room: they need room to work in (measured: a stored step that spends
        # it all leaves them stuck).
        stored_limit = (limit if mode == "first_epoch"
                        else paced_limit(retain_before, limit, min(cfg.step_room, 0.25)))
        params = self._parameters()
        base = {n: p.detach().clone() for n, p in params}
        weight = params[0][1]

        def admissible(r: float) -> bool:
            return not retain or r <= stored_limit

        # --- the stored first-epoch step, through the fused kernel --------------------------------------
        offsets, tokens, rows, lrs = _stored_update(batch, ids, weight.device)
        rows = rows * ownership[tokens.long()][:, None]
        if precondition is not None:
            rows = rows * precondition[tokens.long()]
        stepping = not (self._reached(float(forget_before.mean()), target) or spent)
        project = cfg.projection == "rows" and bool(repair)
        if project and stepping:
            rows = _project_stored_rows(rows, offsets, tokens, lrs, self._pool_gradient(repair))
        retain_grad = (embedding_gradient(self.model, retain.sequences, retain.weights.tolist(),
                                          pad_token_id=self.pad_token_id)[0] if retain else None)
        fresh_rows, forget_extra = (embedding_gradient(self.model, sequences, pad_token_id=self.pad_token_id,
                                                       params=[p for _, p in params[1:]])
                                    if len(params) > 1 else (None, []))
        # One unit of scale moves the embedding by as much as one plain SGD step on the summed losses.
        probe = torch.zeros_like(weight, dtype=torch.float32)
        scores = ascent_score(probe, offsets, tokens, rows, lrs, Q=retain_grad if retain_grad is not None
                              else torch.zeros_like(probe))
        report.interference = [float(x) for x in scores.cpu()]
        norm = float(probe.norm()) or 1.0
        unit = float(weight.detach().float().norm()) * 1e-3 / norm  # scale 1 = a 0.1% move of ||W||
        # The other parameters (the layers ablation) take plain gradient ascent on their fresh gradients, at the
        # rate that maps the embedding's fresh gradient (rows weighted alike) onto its stored step: one joint
        # gradient step. (Moving each tensor by the embedding's whole norm instead made the blocks, some thirty
        # tensors, swamp the embedding: the guard then stopped the step before the forget loss moved.)
        extra_rate = (norm / max(float((fresh_rows * ownership[:, None]).norm()), 1e-12)
                      if fresh_rows is not None else 0.0)

        def apply(scale: float) -> tuple[float, float]:
            nonlocal evaluations
            scaled = lrs * (scale * unit)
            if not bool(torch.isfinite(scaled).all()):
                return math.nan, math.nan  # learning rates beyond float32's range: too far, whatever they did
            with torch.no_grad():
                weight.copy_(base["embedding"])
                ascent_score(weight, offsets, tokens, rows, scaled)
                for (name, param), g in zip(params[1:], forget_extra, strict=True):
                    param.copy_(base[name] + (scale * unit * extra_rate) * g)
            evaluations += 2
            return float(self._losses(sequences).mean()), self._guard_loss(retain)

        if not stepping:
            # Already as unknown as never-seen examples (a record the model never learned): no step at all;
            # forgetting is then the erasure alone. Or no drift left to spend: no step either.
            scale, (f, r) = 0.0, (float(forget_before.mean()), retain_before)
        else:
            scale, (f, r) = self._search(apply, target, admissible, cfg.initial_scale)
        report.scale = scale * unit
        report.iterations = 1
        targets = torch.full_like(forget_before, target)
        # --- iterative: fresh gradients on the current model, each example toward its own target ---------
        if mode == "iterative" and not self._reached(f, target) and not spent:
            f, r, iterations, more, targets = self._iterate(sequences, repair, retain, holdout, limit, ownership,
                                                            params, precondition, project)
            report.iterations += iterations
            evaluations += more
        pulled_back = 1.0
        if drift is not None and cfg.calibrate and not spent:
            # The guard's sample held the request to the rise the budget had left; the budget itself is read on
            # its panel, which may disagree. The panel has the last word.
            pulled_back, after, more = self._hold_to_budget(ids, params, base)
            evaluations += more
            if pulled_back < 1.0:
                r = self._guard_loss(retain) if retain else r
                evaluations += 1
        # The forgotten examples' losses, measured once more on the model as it is left: the status and the
        # report rest on this (a kept repair-only step changes them without a new forget measurement), and per
        # example it is the first thing to look at when a request stops short.
        forget_after = self._losses(sequences)
        f = float(forget_after.mean())
        evaluations += 1
        report.forget_loss_after, report.retain_loss_after = f, r
        if drift is not None:
            if spent or not cfg.calibrate:
                after = self.drift(ids)
                evaluations += 1
            report.drift = {"before": drift.to_dict(), "after": after.to_dict()}
        report.evaluations = evaluations
        shares = self._token_shares(sequences)
        for s, before, after, goal in zip(sequences, forget_before, forget_after, targets, strict=True):
            distinct = np.unique(np.asarray(s, dtype=np.int64))
            report.examples.append({"loss_before": float(before), "loss_after": float(after), "target": float(goal),
                                    "tokens": len(distinct), "owned_tokens": int((shares[distinct] >= 0.5).sum())})
        # A fixed step (calibrate=False) may also land past the target band: over-unlearning, not success.
        within = cfg.calibrate or f <= target * (1 + cfg.target_tolerance)
        guarded = not retain or r <= limit
        if self._reached(f, target) and guarded and within:
            report.status = "forgotten"
        elif not cfg.calibrate:  # a fixed step is applied as is: say where it landed, guard included
            side = "below" if f < target else "past"
            report.message = (f"fixed step (calibrate=False, scale {cfg.initial_scale:g}): forget loss {f:.4f} is "
                              f"{side} the target {target:.4f}, retain loss {r:.4f} "
                              f"{'within' if guarded else 'beyond'} the guard (limit {limit:.4f}); not committed: the "
                              "step stays in the model in memory only" + ("" if guarded and within else
                              ", and this engine refuses further requests until the weights are loaded again"))
        elif spent:
            held = (f" ({len(self._uncommitted)} uncommitted change(s) of this engine spent part of it: loading the "
                    "weights again drops them)" if self._uncommitted else "")
            report.message = (f"the store's drift budget is spent ({drift.describe()}){held}: no step taken; raise "
                              "it and keep its baseline (gradstore drift --set F --keep-baseline), set a new one on "
                              "this model (gradstore drift --set F), or retrain the model" + _shortfall(report))
        else:
            bound = (f"the store's drift budget ({drift.describe()} before this request)" if budget_binds
                     else f"the retain guard (+{100 * cfg.retain_tolerance:.1f}%)")
            if pulled_back < 1.0:
                bound = (f"the store's drift budget ({drift.describe()} before this request; the change was taken "
                         f"back to {pulled_back:.3f} of itself to stay within it)")
            report.message = (f"target loss {target:.4f} not reached within {bound}: stopped at forget loss {f:.4f}, "
                              f"the best admissible point" + ("; try mode='iterative' (under a new request id)" if mode == "first_epoch" else "")
                              + _shortfall(report))
        # A calibrated search only keeps admissible states (a guard measured again may differ by rounding).
        return cfg.calibrate or (guarded and within)

    def _hold_to_budget(self, ids: list[Any], params: list[tuple[str, torch.nn.Parameter]],
                        base: dict[str, torch.Tensor]) -> tuple[float, DriftReading, int]:
        """Keep the request's change within the store's drift budget as its panel reads it.

        If the panel reads over the budget, the change is taken back along itself, W = W0 + a (W - W0), with a
        bisected to the largest value that the panel allows (a = 0, the model the request found, is within it:
        otherwise the budget was spent and no step was taken). Returns (a, the reading there, panel reads).
        """
        reading = self.drift(ids)
        if reading.remaining >= 0:
            return 1.0, reading, 1
        moved = {name: param.detach().clone() for name, param in params}

        def at(fraction: float) -> DriftReading:
            with torch.no_grad():
                for name, param in params:
                    param.copy_(base[name] + fraction * (moved[name] - base[name]))
            return self.drift(ids)

        low, high, low_reading, mid = 0.0, 1.0, None, None
        for _ in range(self.config.bisect_steps):
            mid = (low + high) / 2
            candidate = at(mid)
            if candidate.remaining >= 0:
                low, low_reading = mid, candidate
            else:
                high = mid
        reading = low_reading if low == mid else at(low)  # the model is left at the last candidate tried
        return low, reading, 2 + self.config.bisect_steps

    def _reached(self, forget_loss: float, target: float) -> bool:
        return forget_loss >= target * (1 - self.config.target_tolerance)

    def _search(self, apply: Any, target: float, admissible: Any, initial: float) -> tuple[float, tuple[float, float]]:
        """Bracket, then bisect, the scale whose forget loss reaches `target` without breaking the guard.

        Returns the chosen scale and its (forget, retain) losses; the model is left at that scale. Past the
        target (or past the guard, or a loss that is not finite) counts as too far: the answer is the smallest
        scale that reaches the target, or, if the guard breaks first, the largest admissible scale.
        """
        cfg = self.config
        if not cfg.calibrate:
            return initial, apply(initial)
        low_band, high_band = target * (1 - cfg.target_tolerance), target * (1 + cfg.target_tolerance)

        def too_far(result: tuple[float, float]) -> bool:
            forget, retain = result
            return not math.isfinite(forget) or not admissible(retain) or forget > high_band

        def reached(result: tuple[float, float]) -> bool:
            return not too_far(result) and result[0] >= low_band

        low, low_result = 0.0, None
        high, high_result = initial, apply(initial)
        if too_far(high_result):
            # An initial scale far too large: shrink it geometrically to an admissible lower end first, or the
            # bisection below (a fixed number of halvings) would end near zero, far short of the target.
            for _ in range(40):
                candidate = high / 16
                result = apply(candidate)
                if reached(result):
                    return candidate, result
                if not too_far(result):
                    low, low_result = candidate, result
                    break
                high, high_result = candidate, result
        else:
            # grow until the target is reached or the guard breaks (that is the bracket's upper end)
            grown = 0
            while not reached(high_result) and not too_far(high_result) and grown < 40:
                low, low_result = high, high_result
                high *= 2.0
                high_result = apply(high)
                grown += 1
            if not reached(high_result) and not too_far(high_result):
                return high, high_result  # even a huge step does not reach the target (nothing to bisect)
        for _ in range(cfg.bisect_steps):
            mid = (low + high) / 2
            result = apply(mid)
            if too_far(result):
                high, high_result = mid, result
            elif reached(result):
                return mid, result  # within the target band and admissible
            else:
                low, low_result = mid, result
        if reached(high_result):
            return high, apply(high)
        if low_result is None:
            return 0.0, apply(0.0)
        return low, apply(low)

    def _iterate(self, sequences: list[list[int]], repair: list[list[int]], retain: _GuardSample,
                 holdout: torch.Tensor, limit: float, ownership: torch.Tensor,
                 params: list[tuple[str, torch.nn.Parameter]], precondition: torch.Tensor | None = None,
                 project: bool = False) -> tuple[float, float, int, int, torch.Tensor]:
        """Fresh-gradient steps until the forgotten examples' losses match the holdout's.

        Returns (forget mean loss, guard loss, fresh steps kept, loss evaluations, per-example targets
        float64 [n]).

        Each step: the gradient through the embedding lookup, on the current model, of sum_i w_i L_i with
        w_i = t_i - L_i (every example pulled toward its own target t_i: up if below, down if above), rows
        weighted by ownership; a normalised step of `iterative_step` x ||W||; then, with `repair=True`, a repair
        step that descends the loss of a batch from the repair pool on the rows the forgotten examples do not own.
        The guard sample is checked after every step; a step that spends more than `step_room` of the guard's room
        left (or overshoots the target band) is undone and the step size halved, a step that passes lets the next
        one grow by half. So the room shrinks geometrically and the steps with it, each aimed anew.
        """
        cfg = self.config
        weight = params[0][1]
        w_norm = float(weight.detach().float().norm())
        step = cfg.iterative_step
        rng = random.Random(cfg.seed)
        losses = self._losses(sequences)
        targets = self._targets(losses, holdout)
        target = float(holdout.mean())
        band = (target * (1 - cfg.target_tolerance), target * (1 + cfg.target_tolerance))
        r = self._guard_loss(retain)
        evaluations, taken = 2, 0  # taken: fresh steps kept (what the report calls iterations)
        shared = (1 - ownership)[:, None]
        for _ in range(cfg.max_iterations):
            if float(losses.mean()) >= band[0]:
                break
            pull = (targets - losses).float()
            grad, extra = embedding_gradient(self.model, sequences, (pull / pull.abs().sum()).tolist(),
                                             pad_token_id=self.pad_token_id, params=[p for _, p in params[1:]],
                                             confidence_power=cfg.confidence_power)
            direction = grad * ownership[:, None]
            if precondition is not None:
                direction = direction * precondition
            if project:
                direction = _without_conflict(direction, self._pool_gradient(repair))
            norm = float(direction.norm())
            if norm == 0:
                break
            batch = rng.sample(repair, min(cfg.retain_sample, len(repair))) if cfg.repair and repair else []
            before = [p.detach().clone() for _, p in params]
            admissible_r = r
            while step >= cfg.iterative_step / 256:
                with torch.no_grad():
                    weight.add_(direction, alpha=step * w_norm / norm)
                    for (_, param), g in zip(params[1:], extra, strict=True):
                        param.add_(g, alpha=step * w_norm / norm)  # one joint gradient step (see _calibrate)
                if batch:
                    self._repair(batch, shared, step * w_norm)
                new_losses = self._losses(sequences)
                r = self._guard_loss(retain)
                evaluations += 2
                log.debug("step %d (size %.3g): forget loss %.4f (target %.4f), retain loss %.4f (limit %.4f)",
                          taken + 1, step, float(new_losses.mean()), target, r, limit)
                if r <= paced_limit(admissible_r, limit, cfg.step_room) and float(new_losses.mean()) <= band[1]:
                    losses = new_losses
                    taken += 1
                    step *= 1.5
                    break
                with torch.no_grad():
                    for (_, param), saved in zip(params, before, strict=True):
                        param.copy_(saved)
                if batch and r > limit:
                    # Out of guard budget: a repair step alone may win some back (it descends the retained
                    # examples' loss on rows the forgotten ones do not own); keep it if it does.
                    self._repair(batch, shared, step * w_norm)
                    repaired = self._guard_loss(retain)
                    evaluations += 1
                    if repaired < admissible_r:
                        r = admissible_r = repaired
                        before = [p.detach().clone() for _, p in params]
                        continue
                    with torch.no_grad():
                        for (_, param), saved in zip(params, before, strict=True):
                            param.copy_(saved)
                    r = admissible_r
                step /= 2
            else:
                r = self._guard_loss(retain)
                break  # no admissible step left: this is the best admissible point
        return float(losses.mean()), r, taken, evaluations, targets

    def _pool_gradient(self, pool: list[list[int]]) -> torch.Tensor:
        """float32 [V, D]: the pool's mean-loss gradient w.r.t. the whole embedding matrix, on the current model."""
        return matrix_gradient(self.model, pool, pad_token_id=self.pad_token_id, batch_size=self.config.batch_size)

    def _preconditioner(self, pool: list[list[int]]) -> torch.Tensor | None:
        """float32 [V, D] or None: 1 / (F + damping), scaled to mean 1, F the retained pool's diagonal Fisher."""
        if self.config.precondition != "fisher" or not pool:
            return None
        # float64: squared gradients near float32's top would overflow the mean and the division.
        fisher = retain_fisher(self.model, pool, pad_token_id=self.pad_token_id).double() / len(pool)
        inverse = 1.0 / (fisher + self.config.fisher_damping * float(fisher.mean()) + 1e-300)
        inverse = inverse / inverse.mean()
        if not bool(torch.isfinite(inverse).all()):
            raise ForgetError("the retained examples' Fisher is not finite (the model's loss on them overflows): "
                              "precondition='fisher' cannot weigh the step; use precondition='none'")
        return inverse.float()

    def _repair(self, batch: list[list[int]], shared: torch.Tensor, size: float) -> None:
        """Descend the batch's loss on the rows the forgotten examples do not own, by half the ascent's size.

        A fixed fraction rather than a line search: the guard judges the combined step anyway, and each point
        of a line search costs a pass over the batch (the largest cost of a request on a CPU).
        """
        weight = self.model.get_input_embeddings().weight
        direction = embedding_gradient(self.model, batch, pad_token_id=self.pad_token_id)[0] * shared
        norm = float(direction.norm())
        if norm > 0:
            with torch.no_grad():
                weight.sub_(direction, alpha=0.5 * size / norm)

    def _stored_keys(self, ids: list[Any]) -> list[Any]:
        if self.config.stored_epochs == "first":
            return ids
        later = self._later_epoch_records(ids)
        return [k for i in ids for k in (i, *later[i])]

    def _later_epoch_records(self, ids: list[Any]) -> dict[Any, list[str]]:
        """Each ID's later-epoch records (capture policy `all`), by epoch: every `<ID>@epoch<e>` the store holds.

        Found by one scan of the IDs rather than by counting epochs up to the first missing one: an epoch
        whose rows were not finite (an fp16 overflow step) is missing, and the records after it must not be.
        """
        found: dict[Any, list[str]] = {i: [] for i in ids}
        if self.store.config.capture.get("policy") != "all":
            return found
        prefixes = {f"{i}@epoch": i for i in ids}
        for key in self.store.ids():
            if is_later_epoch_record(key):
                owner = prefixes.get(key[: key.rindex("@epoch") + len("@epoch")])
                if owner is not None:
                    found[owner].append(key)
        for keys in found.values():
            keys.sort(key=lambda k: int(k[k.rindex("@epoch") + len("@epoch"):]))
        return found

    # --------------------------------------------------------------------------------------- commitment
    def _commit(self, ids: list[Any], report: ForgetReport) -> None:
        """Save the model, erase the examples, record the audit — in an order that survives a crash anywhere.

        Under the store's `forget-commit` lock (so that another process's recovery cannot mistake this commit,
        half done, for a crashed one). The journal entry (hashes only) is written first; once the new weights
        are staged beside the old ones, their digests are added to it, and only then are they renamed into
        place. So the weights on disk say whether the request took effect: recovery finishes the entry if they
        are its staged weights (erasure, audit, record), and drops it otherwise (nothing happened; the request
        can be repeated). Each step of the finish can be repeated: the audit record's name and the erasure
        receipt are kept in the entry.
        """
        objects = self.store.objects
        later = self._later_epoch_records(ids)
        keys = [k for i in ids for k in (i, *later[i])]
        entry = {"format": 2, "request_id": report.request_id, "keys": [self.store.id_hash(k) for k in keys],
                 "report": self._persisted(report), "model_hash_before": report.model_hash_before,
                 "model_hash_after": report.model_hash_after,
                 # Which weights the entry is about: an engine on another directory (or none) leaves it alone.
                 "model_dir": str(self.model_dir.resolve()) if self.model_dir is not None else None}
        journal_key = f"{FORGET_JOURNAL}/{report.request_id}.json"
        with self.commit_lock():
            if self.model_dir is not None and weights_fingerprint(self.model_dir) != self._weights_seen:
                raise ForgetError(f"the weights in {self.model_dir} were replaced since this engine read them "
                                  "(another process committed a forget?): committing would undo that; load the "
                                  "model again and repeat the request")
            # A budget that cannot be read now would fail the finish after the weights are saved: refuse first.
            load_drift_budget(self.store)
            # Named under the lock: audit records then sort in commit order, which the hash chain follows.
            entry["audit_name"] = self.store.audit_name()
            objects.write(journal_key, json.dumps(entry).encode())
            if self.model_dir is not None:
                def journal_weights(digests: dict[str, str], staging: str) -> None:
                    entry["weights"], entry["staging"] = digests, staging
                    objects.write(journal_key, json.dumps(entry).encode())

                try:
                    save_weights_atomically(self.model, self.model_dir, on_staged=journal_weights)
                except Exception:
                    # A failure after some renames (an fsync, a later shard): if the new weights are (or can be
                    # made) whole on disk, they are the state the request left, in memory as on disk. (An
                    # interrupt is left to recovery, as a crash is.)
                    if "weights" in entry and self._weights_whole_after_failure(entry):
                        self._installed = report.request_id
                        self._weights_seen = weights_fingerprint(self.model_dir)
                    raise
                self._weights_seen = weights_fingerprint(self.model_dir)
            self._installed = report.request_id  # from here on the after-state is what a recovery finishes
            self._finish(entry, keys)
        report.erasure_receipt = entry["report"].get("erasure_receipt")

    @contextlib.contextmanager
    def commit_lock(self) -> Iterator[None]:
        """Hold the store's `forget-commit` lock for the block; a commit inside it (same thread) does not take it
        again, another thread's waits for it.

        For callers that wait for the lock before a section of their own: a server that stops its readers while
        a commit publishes takes this first, so that its readers are not held while it waits for another
        process's commit. Raises `StoreLockedError` after `COMMIT_LOCK_TIMEOUT_S`.
        """
        if self._commit_lock_thread == threading.get_ident():
            yield
            return
        with self.store.lock(COMMIT_LOCK, timeout_s=COMMIT_LOCK_TIMEOUT_S):
            self._commit_lock_thread = threading.get_ident()
            try:
                yield
            finally:
                self._commit_lock_thread = None

    def _persisted(self, report: ForgetReport) -> dict[str, Any]:
        doc = report.to_dict()
        doc["ids"] = [self.store.id_hash(i) for i in report.ids]
        doc["already_forgotten"] = [self.store.id_hash(i) for i in report.already_forgotten]
        doc["id_hashes"] = True
        return doc

    def _finish(self, entry: dict[str, Any], keys: list[Any] | None) -> None:
        """Erase, audit, record the request, drop the journal entry: each step safe to repeat after a crash."""
        objects = self.store.objects
        journal_key = f"{FORGET_JOURNAL}/{entry['request_id']}.json"
        if keys is None:  # recovery: only hashes are known; find the live keys that hash to them
            wanted = set(entry["keys"])
            keys = [i for i in self.store.ids() if self.store.id_hash(i) in wanted]
        if keys:
            receipt = self.store.erase(keys)
            entry["report"]["erasure_receipt"] = receipt.receipt_id
            self._forget_frequencies(keys)
            # Kept in the entry at once: a replay after a crash from here on finds nothing left to erase, and
            # the receipt must still reach the audit record and the request's report.
            objects.write(journal_key, json.dumps(entry).encode())
        elif not entry["report"].get("erasure_receipt") and entry["keys"]:
            # Erased before a crash that came before the receipt was journaled: the tombstones keep it.
            tombstone = self.store.tombstone(entry["keys"][0])
            entry["report"]["erasure_receipt"] = tombstone.get("receipt") if tombstone else None
        # The drift budget's panel drops them, and the examples of the uncommitted changes this commit saved (their
        # loss was meant to rise: counted as drift from now on, they would spend the budget on forgetting);
        # after the erasure, so that a replay after a crash anywhere here repeats it.
        carried = {h for c in entry["report"].get("carries") or [] for h in c.get("id_hashes", [])}
        try:
            drop_from_panel(self.store, set(entry["keys"]) | carried,
                            live_hashes=lambda: {self._id_hash(i) for i in self.store.ids()})
        except FormatError as err:
            # Checked before the commit, so damaged since: the budget cannot be honoured and may name the examples
            # just erased, while the commit must finish (its weights are on disk).
            log.error("request %s: %s; the drift budget is removed (set it again)", entry["request_id"], err)
            self.store.objects.delete(DRIFT_BUDGET_KEY)
        audit = {"kind": "forget", "request_id": entry["request_id"], "time": time.time(),
                 "id_hashes": entry["report"]["ids"], "model_hash_before": entry["model_hash_before"],
                 "model_hash_after": entry["model_hash_after"], "carries": entry["report"].get("carries") or [],
                 "scale": entry["report"].get("scale"),
                 "iterations": entry["report"].get("iterations"), "mode": entry["report"].get("mode"),
                 "metrics_before": {"forget_loss": entry["report"].get("forget_loss_before"),
                                    "retain_loss": entry["report"].get("retain_loss_before")},
                 "metrics_after": {"forget_loss": entry["report"].get("forget_loss_after"),
                                   "retain_loss": entry["report"].get("retain_loss_after")},
                 "target_loss": entry["report"].get("target_loss"), "drift": entry["report"].get("drift"),
                 "erasure_receipt": entry["report"].get("erasure_receipt")}
        # Named in the entry (older entries have no name: at worst a repeat there writes a second record).
        self.store.append_audit(audit, name=entry.get("audit_name"))
        objects.write_new(f"{REQUESTS}/{entry['request_id']}.json", json.dumps(entry["report"]).encode())
        objects.delete(journal_key)

    def _forget_frequencies(self, keys: list[Any]) -> None:
        self._doc_freq = None  # recomputed lazily from what the store still holds
        self._index = None

    def recover(self, *, wait: bool = True) -> list[str]:
        """Finish or drop requests a crash (or a failed commit) interrupted. Returns the request ids it finished.

        A request took effect if its weights are the ones on disk (`model_dir`; without one, if the model in
        memory is its after-state): its erasure and audit are finished. Otherwise nothing of it happened, and
        its entry is dropped. Runs under the commit lock; `wait=False` skips recovery if another process holds
        it (that process is committing now, and its entries are not crashed ones).
        """
        objects = self.store.objects
        if self.store.read_only or not objects.list_dir(FORGET_JOURNAL):
            return []
        if self._commit_lock_thread == threading.get_ident():
            return self._recover_locked()  # inside this thread's `commit_lock()`: the lock is ours already
        try:
            with self.store.lock(COMMIT_LOCK, timeout_s=COMMIT_LOCK_TIMEOUT_S if wait else 0):
                return self._recover_locked()
        except StoreLockedError:
            if wait:
                raise
            return []

    def _recover_locked(self) -> list[str]:
        objects = self.store.objects
        finished = []
        for name in objects.list_dir(FORGET_JOURNAL):
            try:
                entry = json.loads(objects.read(f"{FORGET_JOURNAL}/{name}"))
            except FileNotFoundError:
                continue
            took_effect = self._took_effect(entry)
            if took_effect is None:
                log.warning("request %s was interrupted while committing to %s; an engine on that model "
                            "directory finishes it", entry["request_id"], entry.get("model_dir"))
            elif took_effect:
                self._finish(entry, None)
                finished.append(entry["request_id"])
            else:
                objects.delete(f"{FORGET_JOURNAL}/{name}")  # the weights never changed: nothing happened
        return finished

    def _took_effect(self, entry: dict[str, Any]) -> bool | None:
        """Whether the entry's request took effect; None if this engine cannot tell (the entry is about the
        weights in another model directory, or in one this engine has none of): it is then left for one that can.
        """
        journaled_dir = entry.get("model_dir")
        if journaled_dir is not None and (self.model_dir is None or str(self.model_dir.resolve()) != journaled_dir):
            return None
        if self.model_dir is not None and entry.get("format", 1) >= 2:
            # No digests: the crash came before the new weights were staged, so none was renamed into place.
            return "weights" in entry and self._install_journaled_weights(entry)
        current = model_hash(self.model)
        if current == entry["model_hash_after"]:
            return True
        if current == entry["model_hash_before"] or self.model_dir is None:
            return False
        # An entry from before the weights' digests were journaled, on a model in neither state: refuse to guess.
        raise ForgetError(f"request {entry['request_id']} was interrupted and the model matches neither its "
                          "before- nor its after-state; restore the model before continuing")

    def _weights_whole_after_failure(self, entry: dict[str, Any]) -> bool:
        try:
            return self._install_journaled_weights(entry)
        except Exception:  # the failure may well repeat here: judge by what is on disk
            return weights_on_disk(self.model_dir, entry["weights"])

    def _install_journaled_weights(self, entry: dict[str, Any]) -> bool:
        """Whether the entry's weights are in place, after finishing their renames if a crash came between two.

        None renamed yet: the old weights are whole, so the request did not take effect (False). Some renamed:
        the rest are renamed from the staging folder (True), or, if that is gone, `ForgetError`: the directory
        holds a mix of both states, which nothing here can undo.
        """
        assert self.model_dir is not None
        digests = entry["weights"]
        on_disk = {name: _sha256_or_none(self.model_dir / name) == digest for name, digest in digests.items()}
        staging = entry.get("staging")
        if not any(on_disk.values()):
            if staging:
                shutil.rmtree(self.model_dir / staging, ignore_errors=True)
            return False
        if all(on_disk.values()) and not staging:
            return True
        if install_staged_weights(self.model_dir, staging or "", digests):
            return True
        raise ForgetError(f"request {entry['request_id']}: the weights in {self.model_dir} are partly its new "
                          "ones and partly the old ones, and the staged rest is gone; restore the model directory "
                          "from a copy before continuing")

    # ------------------------------------------------------------------------------ fuzzy matching
    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ForgetError("matching a text needs the model's tokenizer (pass tokenizer=)")
        if not isinstance(text, str):
            raise ForgetError(f"the text to match must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ForgetError("the text to match is empty")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def fuzzy_index(self) -> ShingleIndex:
        """The shingle index of the store's token sequences (built on first use, rebuilt after erasures)."""
        if self._index is None:
            self._index = ShingleIndex().add_store(self.store, skip=self._is_epoch_copy)
        return self._index

    def find(self, text: str, threshold: float = 0.5, *, metric: str = "jaccard", limit: int | None = 100
             ) -> list[Match]:
        """Stored examples whose token sequences match `text` (shingle Jaccard or containment >= threshold)."""
        if not 0 <= threshold <= 1:
            raise ForgetError(f"threshold must lie in [0, 1], got {threshold}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ForgetError(f"limit must be a positive integer or None, got {limit!r}")
        tokens = self._encode(text)
        index = self.fuzzy_index()
        if len(tokens) < index.n:
            # Shingles are n-grams: a shorter text is one whole-sequence shingle, which no longer record holds.
            raise ForgetError(f"the text is {len(tokens)} token(s); matching compares {index.n}-token shingles, "
                              f"so it needs at least {index.n} tokens")
        return index.query(tokens, threshold, metric=metric, limit=limit)

    def forget_text(self, text: str, threshold: float = 0.5, *, metric: str = "jaccard", mode: str = "iterative",
                    request_id: str | None = None, dry_run: bool = False) -> tuple[list[Match], ForgetReport]:
        """Forget every stored example that matches `text`. Returns the matches and the request's report."""
        matches = self.find(text, threshold, metric=metric, limit=None)
        if not matches:
            raise ForgetError(f"no stored example matches the text at {metric} >= {threshold}")
        return matches, self.forget([m.id for m in matches], mode=mode, request_id=request_id, dry_run=dry_run)

    # ------------------------------------------------------------------------------------- influence
    def _query_is_id(self, query: Any, query_type: str) -> bool:
        if query_type not in QUERY_TYPES:
            raise ForgetError(f"query_type must be one of {QUERY_TYPES}, got {query_type!r}")
        if query_type == "auto":
            return not isinstance(query, str) or query in self.store
        if query_type == "text" and not isinstance(query, str):
            raise ForgetError(f"a text query must be a string, got {type(query).__name__}")
        return query_type == "id"

    def query_rows(self, query: str | Any, query_type: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """A query's sparse embedding rows (token ids int64 [k], rows float32 [k, D]): a stored example's
        first-epoch rows, or a text's gradient rows on the current model.

        query_type: "id" (unknown or erased IDs raise), "text", or "auto" (a stored ID if there is one by that
        name, else text -- ambiguous where a text could also be an ID; the command line and the server say which).
        """
        if not self._query_is_id(query, query_type):
            sequence = self._encode(query)
            if len(sequence) < 2:
                raise ForgetError("the query text is a single token: it has no next-token loss to take a gradient of")
            limit = context_length(self.model)
            if limit is not None and len(sequence) > limit:
                raise ForgetError(f"the query text is {len(sequence)} tokens; the model reads at most {limit}")
            return sparse_rows(self.model, sequence, pad_token_id=self.pad_token_id)
        example = self.store.get(query)
        return example.token_ids, example.dequantized()

    def influence(self, query: str | Any, k: int = 10, *, exclude_self: bool = True, query_type: str = "auto"
                  ) -> list[tuple[Any, float]]:
        """The k stored examples whose embedding-row gradients have the largest dot product with the query's.

        A positive score means a step on that example would also have lowered the query's loss (they pull the
        model the same way). Streams the store through `topk_influence`; nothing larger than a batch is held.
        `query_type` as in `query_rows`.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ForgetError(f"k must be a positive integer, got {k!r}")
        tokens, rows = self.query_rows(query, query_type)
        own = query if self._query_is_id(query, query_type) else None
        batches: Iterable[Any] = self.store.iter_batches(256)
        if self.store.config.capture.get("policy") == "all":
            # Rank examples, not per-epoch records: each example by its first-epoch record, as forget applies it.
            batches = (kept for batch in batches
                       if len(kept := batch.select([i for i, key in enumerate(batch.ids)
                                                    if not is_later_epoch_record(key)])))
        top = topk_influence((tokens, rows), batches, k + (1 if own is not None else 0),
                             vocab_size=self.store.vocab_size)
        pairs = [(i, float(v)) for i, v in zip(top.ids, top.scores.tolist(), strict=True)]
        if exclude_self and own is not None:
            pairs = [(i, v) for i, v in pairs if i != normalize_id(own)]
        return pairs[:k]

    def self_influence(self, example_id: Any) -> float:
        """<g, g> of an example's stored first-epoch rows: how strongly training on it moved the embeddings."""
        rows = self.store.get(example_id).dequantized().double()
        return float((rows * rows).sum())

    # ------------------------------------------------------------------------------- influence (HVP)
    def hvp_influence(self, sequence: Sequence[int], train_sequences: Sequence[Sequence[int]], *,
                      damping: float = 0.01, method: str = "cg", iterations: int = 30,
                      lissa_scale: float = 10.0) -> float:
        """Influence of an example on its own loss, g^T (H + damping I)^-1 g, over the embedding matrix.

        H is the Hessian of the mean loss of `train_sequences` (a sample of the training set) w.r.t. the
        embedding matrix; g the example's gradient there (the full gradient, output side included, since H is).
        Larger = the model's fit of this example depends more on it; forgetting should shrink it toward the
        value of a never-seen example. A damping too small for the model's negative curvature raises
        `InverseHvpError` (see `gradients.inverse_hvp`).
        """
        weight = self.model.get_input_embeddings().weight
        from .gradients import _batches, _training_mode, own_mean_losses

        if len(sequence) < 2 or not train_sequences:
            raise ForgetError("hvp_influence needs a sequence of at least 2 tokens and a non-empty training sample")
        # Eval mode, as the Hessian-vector products below: with dropout on, g would be a random draw.
        with _training_mode(self.model, False), torch.enable_grad():
            (_, input_ids, mask), = list(_batches([sequence], 1, self.pad_token_id, weight.device))
            (g,) = torch.autograd.grad(own_mean_losses(self.model, input_ids, mask).sum(), [weight])
        solved = inverse_hvp(self.model, train_sequences, g.float(), damping=damping, method=method,
                             iterations=iterations, lissa_scale=lissa_scale, pad_token_id=self.pad_token_id)
        return float((g.float() * solved).sum())


def paced_limit(current: float, limit: float, room: float) -> float:
    """The guard loss one step may reach: `room` of what is left below `limit` (all of it from room >= 1).
    Why steps are paced: the module docstring, "Paced steps"."""
    return current + min(room, 1.0) * max(limit - current, 0.0)


def _stored_update(batch: Any, ids: list[Any], device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR tensors for the kernel: rows as float32 (int8 dequantised), one lr per stored record."""
    lrs = []
    for meta in batch.meta:
        lr = meta.get("lr")
        lrs.append(1.0 if lr is None or not math.isfinite(lr) else float(lr))
    rows = batch.dequantized() if batch.scales is not None else batch.rows.to(torch.float32)
    return (batch.offsets.to(device), batch.token_ids.to(device), rows.to(device),
            torch.tensor(lrs, dtype=torch.float32, device=device))


def _without_conflict(direction: torch.Tensor, against: torch.Tensor) -> torch.Tensor:
    """Row by row, `direction` less its component along `against` where the two point the same way.

    direction, against: float32 [n, D], `against` the gradient of some loss. A row of the step that would raise
    that loss (a positive dot product with its gradient row) keeps only its part orthogonal to the gradient row:
    to first order it no longer raises the loss. Rows that would lower it are left as they are.
    """
    dots = (direction * against).sum(dim=-1, keepdim=True)
    norms = against.square().sum(dim=-1, keepdim=True)
    coefficient = torch.where((dots > 0) & (norms > 0), dots / norms.clamp_min(1e-30), torch.zeros_like(dots))
    return direction - coefficient * against


def _project_stored_rows(rows: torch.Tensor, offsets: torch.Tensor, tokens: torch.Tensor, lrs: torch.Tensor,
                         gradient: torch.Tensor) -> torch.Tensor:
    """The stored rows float32 [n, D] such that the step they make, sum over examples of lr_e * row per token, is
    that step projected row by row off `gradient` float32 [V, D] (`_without_conflict`).

    The kernel adds every example's row of a token to the same row of W, so it is their lr-weighted sum that
    must not raise the pool's loss: projecting each example's row alone would also drop the parts that cancel
    between examples. Every entry of a token takes the same correction, the sum's divided by the sum of their
    learning rates, so that the kernel's sum of lr_e * correction is exactly the sum's correction.
    offsets int [k + 1], tokens int [n], lrs float32 [k].
    """
    rate = torch.repeat_interleave(lrs, (offsets[1:] - offsets[:-1]).long())  # [n]: each row's example's lr
    index = tokens.long()
    step = torch.zeros_like(gradient).index_add_(0, index, rows * rate[:, None])
    correction = step - _without_conflict(step, gradient)  # [V, D], zero where the sum lowers the pool's loss
    total = torch.zeros(gradient.shape[0], dtype=rate.dtype, device=rate.device).index_add_(0, index, rate)
    share = torch.where(total > 0, 1.0 / total.clamp_min(1e-30), torch.zeros_like(total))  # lr 0: nothing to move
    return rows - correction[index] * share[index][:, None]


def _sequence_digest(tokens: Any) -> bytes:
    """A short digest of a token sequence (equal sequences, whatever their container, digest alike)."""
    return hashlib.blake2b(np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


def _sequences_by_id(batch: Any, ids: list[Any]) -> list[list[int]]:
    """The first-epoch token sequence of each requested ID (records of later epochs repeat it)."""
    by_id = {}
    for key, meta in zip(batch.ids, batch.meta, strict=True):
        by_id.setdefault(key, meta.get("tokens", []))
    return [list(by_id[i]) for i in ids]


def _shortfall(report: ForgetReport) -> str:
    """The examples that stayed below their targets, with the rows they own, by 1-based position in `report.ids`
    (the live IDs the request acted on): not by ID, since the message is persisted with the report, whose copies
    keep only salted ID hashes.
    """
    below = report.below_target()
    if not below:
        return ""
    shown = below[:3]
    which = ", ".join(f"#{i + 1} (loss {report.examples[i]['loss_after']:.2f} of {report.examples[i]['target']:.2f}; "
                      f"owns {report.examples[i]['owned_tokens']} of its {report.examples[i]['tokens']} distinct tokens)"
                      for i in shown)
    more = f" and {len(below) - len(shown)} more" if len(below) > len(shown) else ""
    return (f"; {len(below)} of {len(report.examples)} examples stay below their own target: {which}{more} (an "
            "example owns a token when at least half of the token's stored examples are being forgotten; under "
            "ownership weighting the rows of the tokens it shares move little)")
