"""Five erasure requests in a row, one person each, on the demo's model: does each pass, and what adds up?

    python benchmarks/sequential_requests.py          # ~6 minutes on 2 cores

Erasure requests arrive one data subject at a time. This trains the demo's model with capture (size tiny, exactly as
`gradstore demo`), then forgets the demo's five forget records one request each, by ID, iterative mode, default
configuration (2% guard per request), every request acting on the model the previous one left. After each request
it reports the request's outcome and the state of the model against the trained one: the retain-split records' and
the trained docstrings' perplexity change (cumulative), and the forgotten-so-far records' losses against never-seen
ones (KS p-value, membership-inference AUC); and, to check the guard's and the drift budget panel's estimates, the
change of the mean loss over every retained training example (the request's own, and since training). Then the same
five requests again from the trained model, with a
drift budget set on the store first (`--drift-budget`, 5%: all requests together may move the retained examples'
perplexity that much; `Unlearner.set_drift_budget`; `--panel`, 128: how many retained examples read it).

Writes benchmarks/results/sequential_requests_cpu.json (or `--out`).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
import time
from pathlib import Path

import torch
from bench_device import demo_benchmark_parser, save_cpu_result

from gradstore import GradStore
from gradstore_unlearn.demo import DEMO_SIZES, prepare_data, train_demo_model
from gradstore_unlearn.evaluate import ks_test, mia_auc, perplexity, sequence_losses
from gradstore_unlearn.unlearn import ForgetConfig, Unlearner


def parse_args(argv=None) -> argparse.Namespace:
    p = demo_benchmark_parser(__doc__, "sequential_requests_cpu.json")
    p.add_argument("--drift-budget", type=float, default=0.05,
                   help="the store's drift budget for the second run (a fraction; 0.05 is 5%%)")
    p.add_argument("--panel", type=int, default=128,
                   help="the budget's panel: how many retained examples read it (set_drift_budget's panel)")
    return p.parse_args(argv)


def run_requests(demo, trained, store_path: Path, budget: float | None, panel: int = 128) -> list[dict]:
    """The five requests on a copy of the trained model and its store; one row per request."""
    encode = demo.encode
    retain = encode([d for d in demo.train_docs if d.kind == "record" and d.split == "retain"])
    docstrings = demo.trained_docstrings()
    never_seen = encode(demo.judge_docs)
    model = copy.deepcopy(trained)
    retain_ppl, docstrings_ppl = perplexity(model, retain), perplexity(model, docstrings)
    # Every retained training example, to check the guard's and the panel's estimates against: the mean over
    # examples of each one's mean token loss, the quantity both estimate (from a stratified and a random sample).
    training = demo.train_docs
    trained_losses = sequence_losses(model, encode(training)).double()
    unlearner = Unlearner(model, GradStore.open(store_path), tokenizer=demo.tokenizer, config=ForgetConfig())
    if budget is not None:
        unlearner.set_drift_budget(budget, panel=panel)
    forgotten, rows = [], []
    for n, doc in enumerate(demo.forget_docs, start=1):
        asked_ids = {d.id for d in demo.forget_docs[:n]}
        kept = torch.tensor([d.id not in asked_ids for d in training])
        kept_docs = [d for d in training if d.id not in asked_ids]
        start = sequence_losses(model, encode(kept_docs)).double()
        report = unlearner.forget([doc.id], mode="iterative", request_id=f"request-{n}")
        end = sequence_losses(model, encode(kept_docs)).double()
        if report.status == "forgotten":
            forgotten.append(doc)
        # Every record asked for so far, committed or not: the model is left at its best admissible point
        # either way, and an erasure request that was not met is still a record that must not stand out.
        asked = encode(demo.forget_docs[:n])
        losses, holdout = sequence_losses(model, asked).double(), sequence_losses(model, never_seen).double()
        row = {
            "request": n, "status": report.status, "forget_loss_before": report.forget_loss_before,
            "forget_loss_after": report.forget_loss_after, "target_loss": report.target_loss,
            "guard_change_pct": round(100 * (report.retain_change or 0), 2),
            "seconds": round(report.seconds, 1),
            # Requests that stopped short before this one and whose changes its commit saved too.
            "carries": [c["request_id"] for c in report.carries],
            # The store's drift budget as the request read it (its panel), before and after: the budget's own
            # measure of what the check below measures on the retain split.
            "drift_pct": None if report.drift is None else [round(100 * report.drift[k]["change"], 2)
                                                            for k in ("before", "after")],
            # The truth the guard and the panel estimate, over all retained examples: this request's change of
            # their mean loss (the guard's measure) and the change since training (the panel's, with a budget).
            "retained_request_change_pct": round(100 * float(end.mean() / start.mean() - 1), 2),
            "retained_total_change_pct": round(100 * float(end.mean() / trained_losses[kept].mean() - 1), 2),
            "retain_ppl_change_pct": round(100 * (perplexity(model, retain) / retain_ppl - 1), 2),
            "docstrings_ppl_change_pct": round(100 * (perplexity(model, docstrings) / docstrings_ppl - 1), 2),
            "asked_so_far": n, "committed_so_far": len(forgotten),
            "ks_pvalue_asked_vs_never_seen": ks_test(losses, holdout)[1],
            "mia_auc_asked_vs_never_seen": mia_auc(-losses, -holdout),
        }
        rows.append(row)
        print(f"request {n}: {report.status}, loss {report.forget_loss_before:.2f} -> "
              f"{report.forget_loss_after:.2f} (target {report.target_loss:.2f}), guard "
              f"{row['guard_change_pct']:+.2f}% (all retained {row['retained_request_change_pct']:+.2f}%)"
              + ("" if row["drift_pct"] is None else f", drift budget {row['drift_pct'][1]:+.2f}% (all retained "
                                                       f"{row['retained_total_change_pct']:+.2f}%)")
              + f"; since training: retain {row['retain_ppl_change_pct']:+.2f}%, "
              f"docstrings {row['docstrings_ppl_change_pct']:+.2f}%, KS p {row['ks_pvalue_asked_vs_never_seen']:.3f}, "
              f"MIA AUC {row['mia_auc_asked_vs_never_seen']:.2f}", flush=True)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    spec = DEMO_SIZES["tiny"]
    demo = prepare_data(spec, args.seed)
    work = Path(tempfile.mkdtemp(prefix="sequential-requests-"))
    try:
        print("training the demo's model with capture ...", flush=True)
        trained = train_demo_model(spec, demo, work / "store", seed=args.seed, device="cpu", progress=False).model
        runs = {}
        for name, budget in (("requests", None), ("requests_with_drift_budget", args.drift_budget)):
            print(f"{name}" + ("" if budget is None else f" ({100 * budget:g}% drift budget)"), flush=True)
            shutil.copytree(work / "store", work / "trial")
            runs[name] = run_requests(demo, trained, work / "trial", budget, args.panel)
            shutil.rmtree(work / "trial")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    save_cpu_result(args.out, "sequential_requests", f"the demo (size tiny, seed {args.seed}): its five forget "
                    "records, one iterative request each, by ID, default configuration (2% guard per request), in "
                    "sequence on the same model; then the same with a drift budget of "
                    f"{100 * args.drift_budget:g}% set on the store first (a panel of {args.panel})", started,
                    drift_budget=args.drift_budget, panel=args.panel, **runs)


if __name__ == "__main__":
    main()
