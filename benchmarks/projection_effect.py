"""What the conflict projection (`ForgetConfig(projection="rows")`, the default) does, against the plain step.

    python benchmarks/projection_effect.py          # ~12 minutes on 2 cores

Trains the demo's model with capture (size tiny, exactly as `gradstore demo`), then, from that same trained model and
store each time:

- replays the demo's two requests (4 records by ID, 1 by a paraphrase of its text; iterative, 2% guard) with and
  without the projection, at three sampling seeds (`ForgetConfig(seed=...)`: which retained examples the guard and the
  pool hold), and evaluates each result as the demo does (its four checks, the trained docstrings' perplexity);
- runs one by-ID request (iterative, 2% guard) on each of several random sets of four forget-candidate records (none
  of the demo's), with and without the projection, and reads the retain-split records' and the trained docstrings'
  perplexity after it.

Writes benchmarks/results/projection_effect_cpu.json (or `--out`).
"""

from __future__ import annotations

import copy
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from bench_device import demo_benchmark_parser, save_cpu_result

from gradstore import GradStore
from gradstore_unlearn.demo import DEMO_SIZES, _checks, forget_demo_records, prepare_data, train_demo_model
from gradstore_unlearn.evaluate import ks_test, perplexity
from gradstore_unlearn.unlearn import ForgetConfig, Unlearner

PROJECTIONS = ("rows", "none")


def parse_args(argv=None):
    p = demo_benchmark_parser(__doc__, "projection_effect_cpu.json")
    p.add_argument("--sampling-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--random-sets", type=int, default=8, help="random forget sets of four records")
    return p.parse_args(argv)


def percent_change(after: float, before: float) -> float:
    return round(100 * (after / before - 1), 2)


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    spec = DEMO_SIZES["tiny"]
    demo = prepare_data(spec, args.seed)
    work = Path(tempfile.mkdtemp(prefix="projection-effect-"))
    retain, docstrings = demo.encode(demo.corpus.split("retain")), demo.trained_docstrings()

    def fresh_copy(trained: torch.nn.Module) -> tuple[torch.nn.Module, GradStore]:
        shutil.rmtree(work / "trial", ignore_errors=True)
        shutil.copytree(work / "store", work / "trial")
        return copy.deepcopy(trained), GradStore.open(work / "trial")

    demo_runs, set_runs = [], []
    try:
        print("training the demo's model with capture ...", flush=True)
        trained = train_demo_model(spec, demo, work / "store", seed=args.seed, device="cpu", progress=False).model
        before = demo.evaluate(trained)
        retain_before, docstrings_before = perplexity(trained, retain), perplexity(trained, docstrings)

        # --- the demo's two requests, per sampling seed -------------------------------------------------------
        for seed in args.sampling_seeds:
            for projection in PROJECTIONS:
                model, store = fresh_copy(trained)
                unlearner = Unlearner(model, store, tokenizer=demo.tokenizer,
                                      config=ForgetConfig(projection=projection, seed=seed))
                by_id, _, by_text = forget_demo_records(unlearner, demo)
                after = demo.evaluate(model)
                checks = _checks(before, after, ks_test(after.forget_losses, after.holdout_losses)[1])
                run = {"projection": projection, "sampling_seed": seed,
                       "requests": [{"request_id": r.request_id, "status": r.status,
                                     "forget_loss_after": round(r.forget_loss_after, 3),
                                     "target_loss": round(r.target_loss, 3),
                                     "guard_change_pct": round(100 * (r.retain_change or 0), 2)}
                                    for r in (by_id, by_text) if r is not None],
                       "checks": checks, "checks_passed": sum(c["passed"] for c in checks),
                       "docstrings_ppl_change_pct": percent_change(perplexity(model, docstrings), docstrings_before)}
                demo_runs.append(run)
                print(f"demo, seed {seed}, projection {projection}: "
                      + ", ".join(f"{r['request_id']} {r['status']} {r['forget_loss_after']:.2f}/{r['target_loss']:.2f}"
                                  for r in run["requests"])
                      + f"; checks {run['checks_passed']}/4 ({'; '.join(str(c['value']) for c in checks)}); "
                      f"docstrings {run['docstrings_ppl_change_pct']:+.2f}%", flush=True)

        # --- random forget sets of four records, one by-ID request each ---------------------------------------
        demo_ids = {d.id for d in demo.forget_docs}
        candidates = [d.id for d in demo.train_docs
                      if d.kind == "record" and d.split == "forget" and d.id not in demo_ids]
        sets = []
        for shuffle in range(args.seed + 1, args.seed + 1 + args.random_sets):  # as many shuffles as sets needed
            order = list(candidates)
            random.Random(shuffle).shuffle(order)
            sets += [order[i : i + 4] for i in range(0, len(order) - 3, 4)]
        sets = sets[: args.random_sets]
        for number, ids in enumerate(sets, 1):
            for projection in PROJECTIONS:
                model, store = fresh_copy(trained)
                report = Unlearner(model, store, tokenizer=demo.tokenizer,
                                   config=ForgetConfig(projection=projection)).forget(ids, mode="iterative")
                run = {"set": number, "ids": ids, "projection": projection, "status": report.status,
                       "forget_loss_before": round(report.forget_loss_before, 3),
                       "forget_loss_after": round(report.forget_loss_after, 3),
                       "target_loss": round(report.target_loss, 3),
                       "guard_change_pct": round(100 * (report.retain_change or 0), 2),
                       "retain_ppl_change_pct": percent_change(perplexity(model, retain), retain_before),
                       "docstrings_ppl_change_pct": percent_change(perplexity(model, docstrings), docstrings_before)}
                set_runs.append(run)
                print(f"set {number}, projection {projection}: {run['status']} {run['forget_loss_after']:.2f}/"
                      f"{run['target_loss']:.2f}, retain records {run['retain_ppl_change_pct']:+.2f}%, docstrings "
                      f"{run['docstrings_ppl_change_pct']:+.2f}%", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = {}
    for projection in PROJECTIONS:
        mine = [r for r in set_runs if r["projection"] == projection]
        summary[projection] = {
            "sets_forgotten": sum(r["status"] == "forgotten" for r in mine), "sets": len(mine),
            **{f"mean_{key}": round(sum(r[key] for r in mine) / max(len(mine), 1), 3)
               for key in ("forget_loss_after", "retain_ppl_change_pct", "docstrings_ppl_change_pct")}}
        print(f"random sets, projection {projection}: {summary[projection]}")
    save_cpu_result(args.out, "projection_effect", f"the demo (size tiny, seed {args.seed}): its two requests per "
                    "sampling seed, and one by-ID request per random set of four records, from one trained model and "
                    "store, with projection='rows' and 'none'", started,
                    demo_runs=demo_runs, random_sets=set_runs, random_sets_summary=summary)


if __name__ == "__main__":
    main()
