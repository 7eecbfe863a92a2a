"""How much forgetting each percent of the retain guard buys, on the demo.

    python benchmarks/guard_tolerance.py          # ~10 minutes on 2 cores

Trains the demo's model with capture (size tiny, exactly as `gradstore demo`), then replays the demo's two requests
(4 records by ID, 1 by a paraphrase of its text; iterative) from that same trained model and store, once per guard
tolerance (`ForgetConfig(retain_tolerance=...)`, the per-request limit on the retain loss and perplexity), and at 2%
five more ways: without the conflict projection (`projection="none"`); with the output layer untied from the input
embedding before the requests (the update then acts on the input side only; see benchmarks/embedding_sides.py); with
the ascent preconditioned by the retained examples' diagonal Fisher (`precondition="fisher"`); with ownership weights
to the 4th power instead of the square (`ownership_power=4`: shared rows move less); and with a 2% drift budget set
on the store before the two requests (`Unlearner.set_drift_budget(0.02)`: both requests together may move the
retained examples' perplexity by 2%, the demo's own check). After each replay it evaluates exactly as the demo does
and records the demo's four checks, both requests' outcomes, and the perplexity of the trained docstrings and of
general text.

Writes benchmarks/results/guard_tolerance_cpu.json (or `--out`).
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
from gradstore_unlearn.demo import DEMO_SIZES, _checks, forget_demo_records, prepare_data, train_demo_model
from gradstore_unlearn.evaluate import ks_test, perplexity
from gradstore_unlearn.unlearn import ForgetConfig, Unlearner, adopt_model


def parse_args(argv=None) -> argparse.Namespace:
    p = demo_benchmark_parser(__doc__, "guard_tolerance_cpu.json")
    p.add_argument("--tolerances", type=float, nargs="+", default=[0.01, 0.015, 0.02])
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help="run only the variants named so")
    return p.parse_args(argv)


def untie_output_layer(model: torch.nn.Module) -> None:
    """Give the output layer its own copy of the tied matrix: later changes to the input embedding leave it."""
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    model.config.tie_word_embeddings = False


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    spec = DEMO_SIZES["tiny"]
    demo = prepare_data(spec, args.seed)
    work = Path(tempfile.mkdtemp(prefix="guard-tolerance-"))
    variants = [(f"{100 * t:g}% guard", {"retain_tolerance": t}, False) for t in args.tolerances] + [
        ("2% guard, no projection", {"projection": "none"}, False),
        ("2% guard, untied output layer", {}, True),
        ("2% guard, Fisher-preconditioned ascent", {"precondition": "fisher"}, False),
        ("2% guard, ownership power 4", {"ownership_power": 4.0}, False),
        ("2% guard, 2% drift budget", {"drift_budget": 0.02}, False)]
    if args.only:
        variants = [v for v in variants if v[0] in args.only]
    runs = {}
    try:
        print("training the demo's model with capture ...", flush=True)
        trained = train_demo_model(spec, demo, work / "store", seed=args.seed, device="cpu", progress=False).model
        before = demo.evaluate(trained)
        docstrings_before = perplexity(trained, demo.trained_docstrings())
        for name, settings, untied in variants:
            budget = settings.get("drift_budget")
            config = ForgetConfig(**{k: v for k, v in settings.items() if k != "drift_budget"})
            model = copy.deepcopy(trained)
            shutil.copytree(work / "store", work / "trial")
            trial = GradStore.open(work / "trial")
            if untied:
                untie_output_layer(model)
                adopt_model(trial, model)  # a change off the record, adopted (as `gradstore audit --adopt` does)
            unlearner = Unlearner(model, trial, tokenizer=demo.tokenizer, config=config)
            if budget is not None:
                unlearner.set_drift_budget(budget)
            by_id, _, by_text = forget_demo_records(unlearner, demo)
            shutil.rmtree(work / "trial")
            after = demo.evaluate(model)
            checks = _checks(before, after, ks_test(after.forget_losses, after.holdout_losses)[1])
            runs[name] = {
                "retain_tolerance": config.retain_tolerance, "untied_output_layer": untied, "config": settings,
                "requests": [{"request_id": r.request_id, "status": r.status, "forget_loss_after": r.forget_loss_after,
                              "target_loss": r.target_loss, "guard_change_pct": round(100 * (r.retain_change or 0), 2),
                              "examples_below_target": len(r.below_target()), "drift": r.drift}
                             for r in (by_id, by_text) if r is not None],
                "checks": checks, "checks_passed": sum(c["passed"] for c in checks),
                "docstrings_ppl_change_pct": round(100 * (perplexity(model, demo.trained_docstrings())
                                                          / docstrings_before - 1), 2),
                "general_ppl_change_pct": round(100 * (after.general_ppl / before.general_ppl - 1), 2),
            }
            summary = ", ".join(f"{r['request_id']} {r['status']} {r['forget_loss_after']:.2f}/{r['target_loss']:.2f}"
                                for r in runs[name]["requests"])
            print(f"{name}: {summary}; checks passed {runs[name]['checks_passed']}/4 "
                  f"({'; '.join(str(c['value']) for c in checks)}); docstrings "
                  f"{runs[name]['docstrings_ppl_change_pct']:+.2f}%, general {runs[name]['general_ppl_change_pct']:+.2f}%",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save_cpu_result(args.out, "guard_tolerance", f"the demo (size tiny, seed {args.seed}): its two iterative requests "
                    "replayed from one trained model and store per variant", started, runs=runs)


if __name__ == "__main__":
    main()
