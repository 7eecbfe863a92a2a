"""A drift budget kept in the store: how far the retained examples' loss may rise over all forget requests together.

Each request's guard bounds what *that* request does, measured from the model it starts on, so requests in a row
add up (benchmarks/sequential_requests.py: five requests, each within its own 2% guard, moved the retained records'
perplexity 4.9%). A drift budget bounds the sum. It lives in the store, so every engine on the store -- library,
command line, server -- honours the same one:

- a *panel* of retained examples drawn at random when the budget is set, with each one's loss on the model as it
  was then (the *baseline*, whose model hash is kept beside it). Members are named by salted ID hash, as tombstones
  and audit records name IDs; a member that is later forgotten is dropped from the panel by that request's commit
  (its loss is meant to rise, and its hash and loss should not stay behind), and so is one whose stopped-short
  change the commit saved (asked for too);
- the budget: the panel's mean loss may rise by at most this fraction over the baseline (kind "loss"), or its
  perplexity and its loss both may (kind "perplexity", as the per-request guard reads it).

A request reads the panel on the model it starts from (one forward pass over the panel) and its guard gets what is
left: its own limit or the budget's remaining rise, whichever is smaller. Both are nats of the mean loss over the
retained examples -- the guard's stratified sample and the panel's random one estimate the same mean -- so the rise
left on one carries over to the other. The two samples may disagree (measured, benchmarks/sequential_requests.py:
after a request that moved the mean over all retained examples +2.48%, its guard read +1.99% and a panel of 128
+4.00%), so the panel has the last word: a change it reads over the budget is taken back along itself,
W0 + a (W - W0) with a bisected, until it is within. When nothing is left, the request takes no step and says so.
A request that would leave no panel member to read (it forgets the last ones) is refused: set the budget again.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from gradstore import FormatError, GradStore, InvalidInputError

DRIFT_BUDGET_KEY = "unlearn/drift-budget.json"
DRIFT_FORMAT = 1
KINDS = ("perplexity", "loss")


def panel_mean(losses: Iterable[float]) -> float:
    """The mean of panel losses, the same to the last bit in any order (an exactly rounded sum): the panel is read in
    the store's order, and its baseline in the order it was drawn."""
    values = [float(v) for v in losses]
    return math.fsum(values) / len(values)


def allowed_rise(kind: str, tolerance: float, loss: float) -> float:
    """How many nats a mean loss of `loss` may rise under `tolerance` (a fraction). "perplexity": the loss and
    exp(loss) both within the fraction, whichever is stricter (for losses above 1 nat, the perplexity)."""
    if kind == "loss":
        return tolerance * loss
    return min(tolerance * loss, math.log1p(tolerance))


@dataclass
class DriftBudget:
    """The store's drift budget. panel: {salted ID hash: baseline loss in nats} of the retained examples that
    measure it; model_hash: the model the baseline losses were read on."""

    budget: float
    kind: str
    model_hash: str
    panel: dict[str, float]
    created: float

    def to_dict(self) -> dict[str, Any]:
        return {"format": DRIFT_FORMAT, "budget": self.budget, "kind": self.kind, "model_hash": self.model_hash,
                "created": self.created, "panel": self.panel}

    @classmethod
    def from_dict(cls, doc: Any) -> DriftBudget:
        """Validated: a budget that does not read back as written is an error, never a budget of another size."""
        try:
            if doc.get("format") != DRIFT_FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {DRIFT_FORMAT}")
            budget, kind, panel = doc["budget"], doc["kind"], doc["panel"]
            check_budget(budget, kind)
            if not isinstance(panel, dict) or not all(
                    isinstance(h, str) and isinstance(v, (int, float)) and math.isfinite(v) for h, v in panel.items()):
                raise ValueError("the panel is not a map of ID hashes to finite losses")
            return cls(float(budget), kind, str(doc["model_hash"]), {h: float(v) for h, v in panel.items()},
                       float(doc["created"]))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{DRIFT_BUDGET_KEY} in the store is not a drift budget: {exc}") from None


@dataclass
class DriftReading:
    """The budget as measured on one model: the panel's mean loss now and at the baseline (over the members still
    stored, less any excluded), in nats."""

    budget: float
    kind: str
    baseline_model_hash: str
    members: int
    baseline_loss: float
    loss: float

    @property
    def rise(self) -> float:
        return self.loss - self.baseline_loss

    @property
    def remaining(self) -> float:
        """Nats of mean loss the budget has left (negative: overspent)."""
        return allowed_rise(self.kind, self.budget, self.baseline_loss) - self.rise

    @property
    def change(self) -> float:
        """The change since the baseline, as a fraction, the way the budget reads it: "loss" the loss's; "perplexity"
        the larger of the perplexity's and the loss's (for a mean loss below 1 nat the loss moves more)."""
        loss_change = self.rise / self.baseline_loss
        return loss_change if self.kind == "loss" else max(math.expm1(self.rise), loss_change)

    def describe(self) -> str:
        return (f"{signed_percent(self.change)} of +{100 * self.budget:.2f}% ({self.kind}, since model "
                f"{self.baseline_model_hash[:12]})")

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "kind": self.kind, "baseline_model_hash": self.baseline_model_hash,
                "members": self.members, "baseline_loss": self.baseline_loss, "loss": self.loss,
                "change": self.change, "remaining_nats": self.remaining}


def signed_percent(fraction: float) -> str:
    """"+1.23%": a change as a signed percentage, with no "-0.00%" for a rounding residue below zero."""
    return f"{round(100 * fraction, 2) + 0.0:+.2f}%"


def check_budget(budget: Any, kind: Any) -> None:
    if kind not in KINDS:
        raise InvalidInputError(f"the drift budget's kind must be one of {KINDS}, got {kind!r}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) \
            or not 0 < budget < 10:
        raise InvalidInputError(f"a drift budget must be a fraction > 0 and < 10 (0.02 is 2%), got {budget!r}")


def load_drift_budget(store: GradStore) -> DriftBudget | None:
    try:
        raw = store.objects.read(DRIFT_BUDGET_KEY)
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise FormatError(f"{DRIFT_BUDGET_KEY} in the store is not JSON: {exc}") from None
    return DriftBudget.from_dict(doc)


def write_drift_budget(store: GradStore, budget: DriftBudget | None) -> None:
    """Replace the store's budget (None removes it). One object write: a reader sees the old budget or the new."""
    if budget is None:
        store.objects.delete(DRIFT_BUDGET_KEY)
    else:
        store.objects.write(DRIFT_BUDGET_KEY, json.dumps(budget.to_dict()).encode())


def new_drift_budget(budget: float, kind: str, model_hash: str, panel: dict[str, float]) -> DriftBudget:
    check_budget(budget, kind)
    if not panel:
        raise InvalidInputError("a drift budget needs retained examples to measure it: the store holds none "
                                "with at least two tokens")
    return DriftBudget(float(budget), kind, model_hash, panel, time.time())


def drop_from_panel(store: GradStore, id_hashes: set[str],
                    live_hashes: Callable[[], set[str]] | None = None) -> None:
    """Forget the panel members among `id_hashes` (a commit's erased examples), and, given `live_hashes` (the
    salted hashes of the store's live examples, asked for only when there is a budget), every member that is no
    longer live: erased outside the engine (`GradStore.erase`), its hash and baseline loss must not outlive it.
    Safe to repeat."""
    budget = load_drift_budget(store)
    if budget is None:
        return
    gone = id_hashes | (budget.panel.keys() - live_hashes() if live_hashes is not None else set())
    if not gone & budget.panel.keys():
        return
    budget.panel = {h: v for h, v in budget.panel.items() if h not in gone}
    write_drift_budget(store, budget)
