"""Where forgetting acts, and where it does damage, through a tied embedding.

    python benchmarks/embedding_sides.py          # ~3 minutes on 2 cores

GPT-2 ties its input embedding to its output layer: moving a token's row changes both what the model reads when the
token appears (the input side) and the token's logit in every context (the output side). The engine moves the rows
with gradients taken through the lookup, i.e. for the input side only. This benchmark measures what each side does.

It trains the demo's model with capture (size tiny, exactly as `gradstore demo`), then runs a forget request (iterative
mode, the default configuration and 2% guard) from that same trained model for several forget sets: the demo's by-ID
set and a few random sets of as many other forget-candidate records (none of the demo's). After each request it evaluates every group — the
forgotten records, the retain-split records, the trained docstrings — three times: with the new matrix on both sides
(the model as it is), on the input side only (the output layer kept at the old matrix), and on the output side only.

Writes benchmarks/results/embedding_sides_cpu.json (or `--out`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_device import demo_benchmark_parser, save_cpu_result

from gradstore import GradStore
from gradstore_unlearn.demo import DEMO_SIZES, prepare_data, train_demo_model
from gradstore_unlearn.evaluate import sequence_losses
from gradstore_unlearn.unlearn import ForgetConfig, Unlearner


def parse_args(argv=None) -> argparse.Namespace:
    p = demo_benchmark_parser(__doc__, "embedding_sides_cpu.json")
    p.add_argument("--random-sets", type=int, default=3, help="random forget sets besides the demo's")
    return p.parse_args(argv)


@contextlib.contextmanager
def sides(model: torch.nn.Module, input_matrix: torch.Tensor, output_matrix: torch.Tensor) -> Iterator[None]:
    """Run `model` reading tokens through `input_matrix` and scoring them with `output_matrix` [V, D].

    The tied parameter takes the input matrix; a hook on the output layer recomputes its logits with the output one.
    """
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is not embedding.weight:
        raise ValueError("the model's input and output embeddings are not tied: there is only one side")
    saved = embedding.weight.detach().clone()

    def score_with_output_matrix(module, inputs, output):
        return F.linear(inputs[0], output_matrix.to(inputs[0].dtype), getattr(module, "bias", None))

    handle = head.register_forward_hook(score_with_output_matrix)
    try:
        with torch.no_grad():
            embedding.weight.copy_(input_matrix)
        yield
    finally:
        handle.remove()
        with torch.no_grad():
            embedding.weight.copy_(saved)


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    spec = DEMO_SIZES["tiny"]
    demo = prepare_data(spec, args.seed)
    encode = demo.encode
    demo_set = demo.forget_docs[:-1]  # the demo forgets these by ID (the last one by text)
    demo_ids = {d.id for d in demo.forget_docs}
    candidates = [d for d in demo.train_docs if d.kind == "record" and d.split == "forget" and d.id not in demo_ids]
    random.Random(args.seed + 1).shuffle(candidates)
    size = len(demo_set)
    forget_sets = {"demo by-ID set": demo_set}
    forget_sets |= {f"random set {i + 1}": candidates[i * size : (i + 1) * size] for i in range(args.random_sets)}

    work = Path(tempfile.mkdtemp(prefix="embedding-sides-"))
    try:
        print("training the demo's model with capture ...", flush=True)
        model = train_demo_model(spec, demo, work / "store", seed=args.seed, device="cpu", progress=False).model
        before_matrix = model.get_input_embeddings().weight.detach().clone()
        requests = {}
        for name, docs in forget_sets.items():
            gone = {d.id for d in docs}
            groups = {
                "forgotten records": encode(docs),
                "retain-split records": encode([d for d in demo.train_docs
                                                if d.kind == "record" and d.split == "retain"]),
                "docstrings": demo.trained_docstrings(),
            }
            before = {group: float(sequence_losses(model, seqs).double().mean()) for group, seqs in groups.items()}
            shutil.copytree(work / "store", work / "trial")
            trial = copy.deepcopy(model)
            report = Unlearner(trial, GradStore.open(work / "trial"), config=ForgetConfig()).forget(
                sorted(gone), mode="iterative", request_id="sides")
            shutil.rmtree(work / "trial")
            after_matrix = trial.get_input_embeddings().weight.detach().clone()
            change = {}
            for group, seqs in groups.items():
                change[group] = {}
                for label, matrices in (("both sides", (after_matrix, after_matrix)),
                                        ("input side only", (after_matrix, before_matrix)),
                                        ("output side only", (before_matrix, after_matrix))):
                    with sides(trial, *matrices):
                        loss = float(sequence_losses(trial, seqs).double().mean())
                    change[group][label] = round(100 * (loss / before[group] - 1), 2)
            requests[name] = {
                "ids": sorted(gone), "status": report.status, "forget_loss_before": report.forget_loss_before,
                "forget_loss_after": report.forget_loss_after, "target_loss": report.target_loss,
                "reach": report.forget_loss_after / report.target_loss,
                "guard_change_pct": round(100 * (report.retain_change or 0), 2),
                "examples_below_target": len(report.below_target()), "mean_loss_change_pct": change,
            }
            print(f"{name}: {report.status}, forget loss {report.forget_loss_before:.2f} -> "
                  f"{report.forget_loss_after:.2f} (target {report.target_loss:.2f}), guard "
                  f"{requests[name]['guard_change_pct']:+.2f}%", flush=True)
            for group, cells in change.items():
                print(f"    {group:22s} " + "  ".join(f"{label} {pct:+.2f}%" for label, pct in cells.items()),
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    save_cpu_result(args.out, "embedding_sides", f"the demo (size tiny, seed {args.seed}); iterative forget requests "
                    f"of {size} records each, default configuration (2% guard), each from the same trained model",
                    started, requests=requests)


if __name__ == "__main__":
    main()
