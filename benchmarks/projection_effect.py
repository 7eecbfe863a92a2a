"""What one part of the default method does, against the method without it: the conflict projection
(`ForgetConfig(projection="rows")`, against the plain step) or the paced steps of iterative mode
(`ForgetConfig(step_room=0.15)`, against steps that may spend the guard's whole room at once, as before pacing).

    python benchmarks/projection_effect.py                      # ~15 minutes on 2 cores
    python benchmarks/projection_effect.py --compare step_room  # the same runs, paced against unpaced

Trains the demo's model with capture (size tiny, exactly as `gradstore demo`), then, from that same trained model and
store each time, for the default method and the variant:

- replays the demo's two requests (4 records by ID, 1 by a paraphrase of its text; iterative, 2% guard) at three
  sampling seeds (`ForgetConfig(seed=...)`: which retained examples the guard and the pool hold), and evaluates each
  result as the demo does (its four checks, the trained docstrings' perplexity);
- runs one by-ID request (iterative, 2% guard) on each of several random sets of four forget-candidate records (none
  of the demo's), and reads the retain-split records' and the trained docstrings' perplexity after it.

The retain records and the docstrings are retained training examples, so a request's pool (the examples its steps are
projected against, drawn from the store) may hold some of them: their loss is held down by construction, and they
would flatter the evaluation. Each run therefore also reports both groups' perplexity change split into the examples
some request of the run pooled and those none did.

Writes benchmarks/results/projection_effect_cpu.json or step_room_cpu.json (or `--out`).
"""

from __future__ import annotations

import copy
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from bench_device import RESULTS, demo_benchmark_parser, save_cpu_result

from gradstore import GradStore
from gradstore_unlearn.demo import DEMO_SIZES, _checks, forget_demo_records, prepare_data, train_demo_model
from gradstore_unlearn.evaluate import ks_test, perplexity
from gradstore_unlearn.unlearn import ForgetConfig, Unlearner

# Per comparison: the benchmark's name (its result file is results/<name>_cpu.json), then the default method and the
# variant, each (label, ForgetConfig settings).
COMPARISONS = {
    "projection": ("projection_effect", (("rows", {}), ("none", {"projection": "none"}))),
    # Unpaced, as before pacing was the default: the stored step spends up to a quarter of the room, each fresh step
    # all of the room left, and the first fresh step is 2% of ||W||.
    "step_room": ("step_room", (("paced", {}), ("unpaced", {"step_room": 1.0, "iterative_step": 0.02}))),
}


def parse_args(argv=None):
    p = demo_benchmark_parser(__doc__, "")
    p.set_defaults(out=None)  # the comparison's own result file
    p.add_argument("--compare", choices=sorted(COMPARISONS), default="projection")
    p.add_argument("--sampling-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--random-sets", type=int, default=8, help="random forget sets of four records")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = RESULTS / f"{COMPARISONS[args.compare][0]}_cpu.json"
    return args


def percent_change(after: float, before: float) -> float:
    return round(100 * (after / before - 1), 2)


class PoolRecorder:
    """While active, records the token sequences of every pool the engine draws (`Unlearner._retain_samples`)."""

    def __init__(self) -> None:
        self.pooled: set[tuple[int, ...]] = set()
        self._original = Unlearner._retain_samples

    def __enter__(self) -> PoolRecorder:
        original = self._original

        def recording(engine, *args, **kwargs):
            pool, guard = original(engine, *args, **kwargs)
            self.pooled.update(tuple(s) for s in pool)
            return pool, guard

        Unlearner._retain_samples = recording
        return self

    def __exit__(self, *exc) -> None:
        Unlearner._retain_samples = self._original


def split_by_pool(model, trained, sequences, pooled) -> dict:
    """Perplexity change of `sequences` from `trained` to `model`, for those in `pooled` and those not."""
    out = {}
    for label, inside in (("pooled", True), ("never_pooled", False)):
        subset = [s for s in sequences if (tuple(s) in pooled) == inside]
        out[label] = {"n": len(subset), "ppl_change_pct": percent_change(perplexity(model, subset),
                                                                         perplexity(trained, subset)) if subset else None}
    return out


def mean_change(runs: list[dict], group: str, label: str) -> float | None:
    values = [r["by_pool"][group][label]["ppl_change_pct"] for r in runs if r["by_pool"][group][label]["n"]]
    return round(sum(values) / len(values), 3) if values else None


def pool_split_text(split: dict) -> str:
    return ", ".join(f"{label} {v['n']}: {v['ppl_change_pct']:+.2f}%" for label, v in split.items() if v["n"])


def main(argv=None) -> None:
    args = parse_args(argv)
    benchmark, variants = COMPARISONS[args.compare]
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
            for variant, settings in variants:
                model, store = fresh_copy(trained)
                unlearner = Unlearner(model, store, tokenizer=demo.tokenizer,
                                      config=ForgetConfig(**settings, seed=seed))
                with PoolRecorder() as recorder:
                    by_id, _, by_text = forget_demo_records(unlearner, demo)
                after = demo.evaluate(model)
                checks = _checks(before, after, ks_test(after.forget_losses, after.holdout_losses)[1])
                run = {"variant": variant, "sampling_seed": seed,
                       "requests": [{"request_id": r.request_id, "status": r.status,
                                     "forget_loss_after": round(r.forget_loss_after, 3),
                                     "target_loss": round(r.target_loss, 3),
                                     "guard_change_pct": round(100 * (r.retain_change or 0), 2)}
                                    for r in (by_id, by_text) if r is not None],
                       "checks": checks, "checks_passed": sum(c["passed"] for c in checks),
                       "docstrings_ppl_change_pct": percent_change(perplexity(model, docstrings), docstrings_before),
                       "by_pool": {"retain": split_by_pool(model, trained, retain, recorder.pooled),
                                   "docstrings": split_by_pool(model, trained, docstrings, recorder.pooled)}}
                demo_runs.append(run)
                print(f"demo, seed {seed}, {variant}: "
                      + ", ".join(f"{r['request_id']} {r['status']} {r['forget_loss_after']:.2f}/{r['target_loss']:.2f}"
                                  for r in run["requests"])
                      + f"; checks {run['checks_passed']}/4 ({'; '.join(str(c['value']) for c in checks)}); "
                      f"docstrings {run['docstrings_ppl_change_pct']:+.2f}%", flush=True)
                if recorder.pooled:
                    print(f"  retain records {pool_split_text(run['by_pool']['retain'])}; docstrings "
                          f"{pool_split_text(run['by_pool']['docstrings'])}", flush=True)

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
            for variant, settings in variants:
                model, store = fresh_copy(trained)
                with PoolRecorder() as recorder:
                    report = Unlearner(model, store, tokenizer=demo.tokenizer,
                                       config=ForgetConfig(**settings)).forget(ids, mode="iterative")
                run = {"set": number, "ids": ids, "variant": variant, "status": report.status,
                       "forget_loss_before": round(report.forget_loss_before, 3),
                       "forget_loss_after": round(report.forget_loss_after, 3),
                       "target_loss": round(report.target_loss, 3),
                       "guard_change_pct": round(100 * (report.retain_change or 0), 2),
                       "retain_ppl_change_pct": percent_change(perplexity(model, retain), retain_before),
                       "docstrings_ppl_change_pct": percent_change(perplexity(model, docstrings), docstrings_before),
                       "by_pool": {"retain": split_by_pool(model, trained, retain, recorder.pooled),
                                   "docstrings": split_by_pool(model, trained, docstrings, recorder.pooled)}}
                set_runs.append(run)
                print(f"set {number}, {variant}: {run['status']} {run['forget_loss_after']:.2f}/"
                      f"{run['target_loss']:.2f}, retain records {run['retain_ppl_change_pct']:+.2f}%, docstrings "
                      f"{run['docstrings_ppl_change_pct']:+.2f}%", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = {}
    for variant, _ in variants:
        mine = [r for r in set_runs if r["variant"] == variant]
        summary[variant] = {
            "sets_forgotten": sum(r["status"] == "forgotten" for r in mine), "sets": len(mine),
            **{f"mean_{key}": round(sum(r[key] for r in mine) / max(len(mine), 1), 3)
               for key in ("forget_loss_after", "retain_ppl_change_pct", "docstrings_ppl_change_pct")}}
        print(f"random sets, {variant}: {summary[variant]}")
    # Does the pool flatter the evaluation? The default method's mean change of pooled vs never-pooled examples.
    by_pool = {}
    for name, runs in (("demo", demo_runs), ("random_sets", set_runs)):
        default_runs = [r for r in runs if r["variant"] == variants[0][0]]
        by_pool[name] = {group: {label: mean_change(default_runs, group, label) for label in ("pooled", "never_pooled")}
                         for group in ("retain", "docstrings")}
        print(f"{name}, {variants[0][0]}, mean perplexity change by pool membership: {by_pool[name]}")
    save_cpu_result(args.out, benchmark,
                    f"the demo (size tiny, seed {args.seed}): its two requests per sampling seed, and one by-ID request "
                    "per random set of four records, from one trained model and store, with the default method and "
                    f"with {variants[1][1]}", started, variants=dict(variants),
                    demo_runs=demo_runs, random_sets=set_runs, random_sets_summary=summary,
                    default_by_pool=by_pool)


if __name__ == "__main__":
    main()
