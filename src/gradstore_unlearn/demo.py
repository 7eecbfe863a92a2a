"""`gradstore demo`: the whole story on a local store, with numbers.

1. Build a corpus: real English (the standard library's docstrings) and synthetic personal records, each
   record carrying a canary secret (a 4-digit PIN); records split into forget candidates, retained records
   and holdout records the model never sees.
2. Train a GPT-2-architecture model from scratch with gradient capture into a store.
3. Forget a handful of records by ID, and one more by text (fuzzy matching finds it from a paraphrase).
4. Evaluate before and after: the forgotten records' losses against never-seen records (KS test), canary
   exposure of forgotten vs never-seen canaries, membership-inference AUC, retain and general perplexity, and
   the perplexity of the trained docstrings (retained data outside the retain split).

The holdout records are split in two: one half is the calibration target (the store's reference set), the
other half only judges the result, so the target is never graded on the examples it was calibrated on.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradstore import GradStore

from . import data
from .evaluate import EvaluationReport, compare, evaluate_model, ks_test, perplexity
from .tables import format_table
from .train import (
    TrainConfig,
    TrainResult,
    build_model,
    check_device,
    load_model,
    retrain_without,
    save_model,
    train_model,
)
from .unlearn import ForgetConfig, ForgetReport, Unlearner, save_reference_set, verify_audit_chain


@dataclass(frozen=True)
class DemoSize:
    corpus: data.CorpusSize
    model: str
    epochs: int
    lr: float
    batch_size: int
    forget_by_id: int


DEMO_SIZES = {
    # under 3 minutes on a 2-core CPU: 150 docstrings + 200 records, a 2-layer 128-wide model, 40 epochs (the
    # records are memorised: forgotten canaries start several bits above never-seen ones).
    "tiny": DemoSize(data.CorpusSize(150, 200, 600, 2048, 192), "tiny", 40, 5e-3, 16, 4),
    "small": DemoSize(data.CORPUS_SIZES["small"], "small", 20, 1e-3, 32, 8),
    "gpt2": DemoSize(data.CORPUS_SIZES["gpt2"], "gpt2", 8, 3e-4, 16, 16),
}


@dataclass
class DemoData:
    """The demo's corpus, tokenizer and splits (`benchmarks/ablations.py` works on the very same)."""

    corpus: data.Corpus
    tokenizer: Any
    max_tokens: int
    train_docs: list[data.Document]
    reference_docs: list[data.Document]  # holdout half: the calibration target (the store's reference set)
    judge_docs: list[data.Document]  # holdout half: only judges the result
    forget_docs: list[data.Document]  # forgotten by ID, then the last one by text

    def encode(self, docs: list[data.Document]) -> list[list[int]]:
        # Quietly: the demo's long docstrings are cut to the context by design (every record fits whole: tested).
        return data.encode_documents(self.tokenizer, docs, self.max_tokens, report_cuts=False)

    def evaluate(self, model: torch.nn.Module, reference: torch.nn.Module | None = None) -> EvaluationReport:
        """The demo's evaluation: forgotten records (all of `forget_docs`) against the judging holdout half,
        the retain split, the general (eval) split, and both groups' canaries."""
        return evaluate_model(model, self.tokenizer, forget=self.encode(self.forget_docs),
                              retain=self.encode(self.corpus.split("retain")), holdout=self.encode(self.judge_docs),
                              general=self.encode(self.corpus.split("eval")),
                              forget_canaries=[d.canary for d in self.forget_docs],
                              holdout_canaries=[d.canary for d in self.judge_docs], reference=reference)

    def trained_docstrings(self) -> list[list[int]]:
        """The trained docstrings: retained training data too, outside the retain split the checks read."""
        return self.encode([d for d in self.train_docs if d.kind == "doc"])


def prepare_data(spec: DemoSize, seed: int = 0) -> DemoData:
    """Build the corpus and tokenizer, split the holdout records in two, and pick the records to forget."""
    corpus = data.build_corpus(spec.corpus.n_docs, spec.corpus.n_records, max_chars=spec.corpus.max_chars,
                               seed=seed)
    train_docs = corpus.train_documents()
    tokenizer = data.train_tokenizer(train_docs, vocab_size=spec.corpus.vocab_size)
    holdout = corpus.split("holdout")
    half = len(holdout) // 2
    forget_docs = random.Random(seed).sample(corpus.split("forget"), spec.forget_by_id + 1)
    return DemoData(corpus, tokenizer, spec.corpus.max_tokens, train_docs, holdout[:half], holdout[half:],
                    forget_docs)


@dataclass
class TrainedDemo:
    """A model trained on a demo's data with capture into its store (`train_demo_model`)."""

    model: torch.nn.Module
    store: GradStore
    config: TrainConfig
    result: TrainResult


def train_demo_model(spec: DemoSize, demo_data: DemoData, store_uri: str | Path, *, seed: int = 0,
                     device: str = "cpu", model_id: str | None = None, capture_policy: str = "first",
                     progress: bool = True) -> TrainedDemo:
    """Train the demo's model from scratch on `demo_data`'s training documents, capturing into a new bfloat16 store
    at `store_uri`, and keep the reference holdout records in the store as the calibration target."""
    tokenizer = demo_data.tokenizer
    model = build_model(spec.model, len(tokenizer), spec.corpus.max_tokens, seed=seed,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    store = GradStore.create(store_uri, dim=model.config.n_embd, vocab_size=len(tokenizer), dtype="bfloat16",
                             model_id=model_id or f"demo-{spec.model}", capture_policy=capture_policy)
    config = TrainConfig(epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr, seed=seed, device=device,
                         pad_token_id=tokenizer.pad_token_id,
                         autocast_dtype="bfloat16" if device == "cuda" else None)
    docs = demo_data.train_docs
    result = train_model(model, demo_data.encode(docs), [d.id for d in docs], config, store=store,
                         progress=progress)
    save_reference_set(store, demo_data.encode(demo_data.reference_docs))
    return TrainedDemo(model, store, config, result)


def _paraphrase(text: str) -> str:
    """A near-duplicate of a record, as a person might paste it into an erasure request."""
    return text.replace(".", ";", 1).replace(" is ", " was ", 1)


def run_demo(out: str | Path = "demo-out", size: str = "tiny", *, retrain: bool = False, seed: int = 0,
             device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the demo; returns the report (also written to OUT/report.json, with OUT/report.png)."""
    started = time.perf_counter()
    spec = DEMO_SIZES[size]
    device = check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out)
    if (out / "store").exists():
        raise FileExistsError(f"{out} already holds a demo run; choose another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    log = _Log(progress)

    log("building the corpus and the tokenizer")
    demo_data = prepare_data(spec, seed)
    corpus, tokenizer, encode = demo_data.corpus, demo_data.tokenizer, demo_data.encode
    data.write_corpus(corpus, out / "corpus")
    sequences, ids = encode(demo_data.train_docs), [d.id for d in demo_data.train_docs]

    log(f"training a {spec.model} GPT-2 on {len(sequences)} documents for {spec.epochs} epochs, capturing "
        "first-epoch embedding gradients")
    trained_demo = train_demo_model(spec, demo_data, out / "store", seed=seed, device=device, progress=progress)
    model, store, config, trained = trained_demo.model, trained_demo.store, trained_demo.config, trained_demo.result
    save_model(model, tokenizer, out / "model", extra={"train": config.to_dict(), "result": trained.to_dict()})

    forgotten = demo_data.forget_docs
    # The trained docstrings are retained training data too, outside the retain split the checks read: the
    # forget requests' guard covers them (it samples every retained example), and the report shows them.
    trained_docstrings = demo_data.trained_docstrings()

    log("evaluating before forgetting")
    before = demo_data.evaluate(model)
    docstrings_ppl_before = perplexity(model, trained_docstrings)
    unlearner = Unlearner(model, store, tokenizer=tokenizer, model_dir=out / "model", config=ForgetConfig())
    report_ids, matches, report_text = forget_demo_records(unlearner, demo_data, log)

    reference_model = None
    if retrain:
        log("retraining without the forgotten records (the gold standard) for the KS test")
        reference_model = retrain_without(spec.model, len(tokenizer), spec.corpus.max_tokens, sequences, ids,
                                          {d.id for d in forgotten}, config, progress=progress)
    log("evaluating after forgetting")
    after = demo_data.evaluate(model, reference_model)
    docstrings_ppl_after = perplexity(model, trained_docstrings)
    comparison = compare(before, after)
    ks = ks_test(after.forget_losses, after.holdout_losses)
    checks = _checks(before, after, ks[1])
    # The weights on disk must be the trained model changed only by audited requests.
    chain = verify_audit_chain(store, load_model(out / "model")[0])
    report = {
        "size": size, "device": device, "seconds": round(time.perf_counter() - started, 1),
        "training": trained.to_dict() | {"losses": None},
        "requests": [r.to_dict() for r in (report_ids, report_text) if r is not None],
        "fuzzy_matches": [m.__dict__ for m in matches],
        "forgotten_ids": [d.id for d in forgotten],
        "before": before.to_dict(per_example=True), "after": after.to_dict(per_example=True),
        "comparison": comparison.to_dict(),
        "trained_docstrings_ppl": {"before": docstrings_ppl_before, "after": docstrings_ppl_after,
                                   "change_pct": 100 * (docstrings_ppl_after / docstrings_ppl_before - 1)},
        "ks_forgotten_vs_never_seen": {"statistic": ks[0], "pvalue": ks[1]},
        "checks": checks, "audit_chain": chain.to_dict(), "store": GradStore.open(out / "store").stats().to_dict(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    _plot(before, after, out / "report.png")
    print()
    print(comparison.to_table())
    print(f"perplexity of the trained docstrings (retained; not in the retain split): {docstrings_ppl_before:.3f} -> "
          f"{docstrings_ppl_after:.3f} ({report['trained_docstrings_ppl']['change_pct']:+.2f}%)")
    print()
    print(_requests_table([r for r in (report_ids, report_text) if r is not None]))
    for r in (report_ids, report_text):
        if r is not None and r.carries:
            # A request that stopped short left its change in the model; the next commit saved it too.
            print(f"{r.request_id} also saved the uncommitted change of "
                  f"{', '.join(c['request_id'] for c in r.carries)} (its audit record names it)")
    print(f"audit, from the trained model to the weights on disk: {chain.summary()}")
    print()
    print(format_table(["check", "value", "passed"], [(c["check"], c["value"], "yes" if c["passed"] else "NO")
                                                      for c in checks], title="Does it forget?"))
    print(f"\nreport: {out / 'report.json'}, plot: {out / 'report.png'}, model: {out / 'model'}, "
          f"store: {out / 'store'} ({report['seconds']:.0f} s)")
    return report


def forget_demo_records(unlearner: Unlearner, demo_data: DemoData, log: Any = None
                        ) -> tuple[ForgetReport, list[Any], ForgetReport | None]:
    """The demo's two requests, iterative: all but the last forget record by ID, then the last one by a
    paraphrase of its text (fuzzy matching). Returns (by-ID report, text matches, by-text report or None)."""
    log = log or (lambda message: None)
    by_id, by_text = demo_data.forget_docs[:-1], demo_data.forget_docs[-1]
    log(f"forgetting {len(by_id)} records by ID: {', '.join(str(d.id) for d in by_id)}")
    report_ids = unlearner.forget([d.id for d in by_id], mode="iterative", request_id="demo-by-id")
    log(f"  {report_ids.status}: forget loss {report_ids.forget_loss_before:.3f} -> {report_ids.forget_loss_after:.3f} "
        f"(target {report_ids.target_loss:.3f}), retain {100 * (report_ids.retain_change or 0):+.2f}%, "
        f"{report_ids.seconds:.0f} s")
    query = _paraphrase(by_text.text)
    matches = unlearner.find(query, threshold=0.5)
    log(f"forgetting by text: {len(matches)} stored example(s) match the paraphrase "
        f"({', '.join(f'{m.id} J={m.jaccard:.2f}' for m in matches[:3])})")
    report_text = None
    if matches:
        _, report_text = unlearner.forget_text(query, threshold=0.5, mode="iterative", request_id="demo-by-text")
        log(f"  {report_text.status}: forget loss {report_text.forget_loss_before:.3f} -> "
            f"{report_text.forget_loss_after:.3f} (target {report_text.target_loss:.3f}), {report_text.seconds:.0f} s")
    return report_ids, matches, report_text


def _checks(before: EvaluationReport, after: EvaluationReport, ks_pvalue: float) -> list[dict[str, Any]]:
    """The demo's pass/fail criteria, computed from the evaluations (nothing is asserted that was not measured)."""
    never_seen = after.holdout_exposure_median if after.holdout_exposure_median is not None else 0.0
    spread = _quantile(after, 0.75)
    retain_change = after.retain_ppl / before.retain_ppl - 1
    return [
        {"check": "forgotten records' losses ~ never-seen records' (KS p > 0.05)", "value": round(ks_pvalue, 4),
         "passed": ks_pvalue > 0.05},
        {"check": "forgotten canaries' mean exposure <= never-seen 75th percentile (bits)",
         "value": f"{after.forget_exposure_mean:.2f} vs {spread:.2f} (median {never_seen:.2f})",
         "passed": after.forget_exposure_mean is not None and after.forget_exposure_mean <= spread},
        {"check": "retain perplexity moves <= 2%", "value": f"{100 * retain_change:+.2f}%",
         "passed": abs(retain_change) <= 0.02},
        # Two-sided: forgotten records that look *less* like members than never-seen ones (over-unlearning)
        # give them away as surely as records that still look like members.
        {"check": "membership inference AUC (loss) near 0.5 (0.25 to 0.75)", "value": round(after.mia_auc_loss, 3),
         "passed": abs(after.mia_auc_loss - 0.5) <= 0.25},
    ]


def _quantile(report: EvaluationReport, q: float) -> float:
    values = report.holdout_exposures if getattr(report, "holdout_exposures", None) is not None else None
    if values is None:
        return report.holdout_exposure_mean or 0.0
    return float(torch.quantile(torch.as_tensor(values, dtype=torch.float64), q))


def _requests_table(reports: list[ForgetReport]) -> str:
    rows = [(r.request_id, r.status, len(r.ids), r.forget_loss_before, r.forget_loss_after, r.target_loss,
             len(r.below_target()), f"{100 * (r.retain_change or 0):+.2f}%", r.iterations, round(r.seconds, 1))
            for r in reports]
    return format_table(["request", "status", "ids", "loss before", "loss after", "target", "below own target",
                         "retain", "iters", "s"], rows, title="Forget requests")


def _plot(before: EvaluationReport, after: EvaluationReport, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the report JSON has every number; the picture is a convenience
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, report, title in ((axes[0], before, "before"), (axes[1], after, "after")):
        for name, values, color in (("forgotten", report.forget_losses, "tab:red"),
                                    ("retained", report.retain_losses, "tab:blue"),
                                    ("never seen", report.holdout_losses, "tab:green")):
            if values is not None:
                ax.hist(torch.as_tensor(values).numpy(), bins=20, alpha=0.5, label=name, color=color, density=True)
        ax.set_title(f"per-record loss, {title} forgetting")
        ax.set_xlabel("mean token loss (nats)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _Log:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.start:6.1f}s] {message}", flush=True)
