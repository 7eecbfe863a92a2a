"""What the iterative mode's repair step does, on the demo's by-ID request.

    python benchmarks/repair_effect.py          # ~4 minutes on 2 cores

Trains the demo's model with capture (size tiny, exactly as `gradstore demo`), then runs the demo's by-ID forget
request (iterative mode, 2% guard) twice from the same trained model and store: with `repair=False` (the
default) and with `repair=True`. For each it reports the forgotten records' mean loss reached against the target,
and the mean loss change of every group of retained training examples -- the retain-split records, the other
forget candidates, the docstrings -- split by what the engine saw of them: the pool (which the repair step descends
on, and whose gradient every step is projected against: the default projection draws it with or without repair),
the guard sample (which judges every step), or neither. The "neither" column is the damage a user
gets on data the engine never looked at.

Writes benchmarks/results/repair_effect_cpu.json (or `--out`).
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
from gradstore_unlearn.evaluate import sequence_losses
from gradstore_unlearn.unlearn import ForgetConfig, Unlearner


def parse_args(argv=None) -> argparse.Namespace:
    p = demo_benchmark_parser(__doc__, "repair_effect_cpu.json")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    spec = DEMO_SIZES["tiny"]
    demo = prepare_data(spec, args.seed)
    tokenizer, encode = demo.tokenizer, demo.encode
    by_id = demo.forget_docs[:-1]  # the demo forgets these by ID (the last one by text)
    gone = {d.id for d in by_id}
    groups = {
        "retain-split records": [d for d in demo.train_docs if d.kind == "record" and d.split == "retain"],
        "other forget candidates": [d for d in demo.train_docs
                                    if d.kind == "record" and d.split == "forget" and d.id not in gone],
        "docstrings": [d for d in demo.train_docs if d.kind == "doc"],
    }
    encoded = {name: encode(docs) for name, docs in groups.items()}

    work = Path(tempfile.mkdtemp(prefix="repair-effect-"))
    try:
        print("training the demo's model with capture ...", flush=True)
        model = train_demo_model(spec, demo, work / "store", seed=args.seed, device="cpu", progress=False).model
        before = {name: sequence_losses(model, seqs).double() for name, seqs in encoded.items()}

        variants = {}
        for repair in (False, True):
            name = f"repair={repair}"
            shutil.copytree(work / "store", work / name)
            trial = copy.deepcopy(model)
            config = ForgetConfig(repair=repair)
            unlearner = Unlearner(trial, GradStore.open(work / name), tokenizer=tokenizer, config=config)
            # The same draw the engine makes inside forget (seeded, from the store sorted by ID).
            pool, guard = unlearner._retain_samples(gone, unlearner._ownership(encode(by_id)),
                                                    config.draws_pool("iterative"))
            repaired, guarded = {tuple(s) for s in pool}, {tuple(s) for s in guard.sequences}
            report = unlearner.forget([d.id for d in by_id], mode="iterative",
                                      request_id=f"repair-{str(repair).lower()}")
            change = {}
            for group, seqs in encoded.items():
                after = sequence_losses(trial, seqs).double()
                seen = [("pool", [tuple(s) in repaired for s in seqs]),
                        ("guard", [tuple(s) in guarded for s in seqs]),
                        ("neither", [tuple(s) not in repaired and tuple(s) not in guarded for s in seqs]),
                        ("all", [True] * len(seqs))]
                change[group] = {}
                for where, members in seen:
                    mask = torch.tensor(members)
                    if mask.any():
                        pct = 100 * (float(after[mask].mean()) / float(before[group][mask].mean()) - 1)
                        change[group][where] = {"examples": int(mask.sum()), "loss_change_pct": round(pct, 2)}
            variants[name] = {
                "status": report.status, "forget_loss_before": report.forget_loss_before,
                "forget_loss_after": report.forget_loss_after, "target_loss": report.target_loss,
                "guard_change_pct": 100 * (report.retain_change or 0), "iterations": report.iterations,
                "seconds": round(report.seconds, 1), "mean_loss_change_by_group": change,
            }
            print(f"{name}: {report.status}, forget loss {report.forget_loss_before:.2f} -> "
                  f"{report.forget_loss_after:.2f} (target {report.target_loss:.2f}), guard "
                  f"{variants[name]['guard_change_pct']:+.2f}%", flush=True)
            for group, cells in change.items():
                row = "  ".join(f"{where} {c['loss_change_pct']:+.2f}% (n={c['examples']})" for where, c in cells.items())
                print(f"    {group:24s} {row}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    save_cpu_result(args.out, "repair_effect", f"the demo (size tiny, seed {args.seed}): its by-ID request, iterative, "
                    "2% guard", started, forgotten_ids=sorted(gone), variants=variants)


if __name__ == "__main__":
    main()
