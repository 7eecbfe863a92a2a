"""Where a forgotten record's loss comes from, token by token, against a record the model never saw.

    python benchmarks/token_losses.py          # ~2.5 minutes on 2 cores

Trains the demo's model with capture (size tiny, exactly as `gradstore demo`), runs the demo's by-ID request
(iterative, default configuration), and records the per-token loss (nats) of each of its records before and after
the request, and of each never-seen judging record, with the tokens as the tokenizer spells them. The README reads
from it why the by-ID request stops short of the never-seen records' loss: which tokens carry a never-seen record's
loss, and which of a forgotten record's tokens the request moved.

Writes benchmarks/results/token_losses_cpu.json (or `--out`).
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_device import demo_benchmark_parser, save_cpu_result

from gradstore_unlearn.demo import DEMO_SIZES, prepare_data, train_demo_model
from gradstore_unlearn.unlearn import ForgetConfig, Unlearner


def token_losses(model: torch.nn.Module, sequence: list[int]) -> list[float]:
    """float per predicted token [len(sequence) - 1]: the next-token cross-entropy at each position."""
    ids = torch.tensor([sequence])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    return F.cross_entropy(logits, ids[0, 1:], reduction="none").tolist()


def main(argv=None) -> None:
    args = demo_benchmark_parser(__doc__, "token_losses_cpu.json").parse_args(argv)
    started = time.perf_counter()
    spec = DEMO_SIZES["tiny"]
    demo = prepare_data(spec, args.seed)
    work = Path(tempfile.mkdtemp(prefix="token-losses-"))
    try:
        print("training the demo's model with capture ...", flush=True)
        trained = train_demo_model(spec, demo, work / "store", seed=args.seed, device="cpu", progress=False)
        model = trained.model.eval()
        before = copy.deepcopy(model)
        by_id = demo.forget_docs[:-1]
        report = Unlearner(model, trained.store, tokenizer=demo.tokenizer, config=ForgetConfig()).forget(
            [d.id for d in by_id], mode="iterative", request_id="demo-by-id")
        print(f"demo-by-id: {report.status}, loss {report.forget_loss_before:.2f} -> {report.forget_loss_after:.2f} "
              f"(target {report.target_loss:.2f})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def spelled(doc) -> tuple[list[int], list[str]]:
        sequence = demo.encode([doc])[0]
        return sequence, demo.tokenizer.convert_ids_to_tokens(sequence[1:])

    forgotten = []
    for doc in by_id:
        sequence, tokens = spelled(doc)
        forgotten.append({"id": doc.id, "tokens": tokens, "loss_before": token_losses(before, sequence),
                          "loss_after": token_losses(model, sequence)})
    never_seen = []
    for doc in demo.judge_docs:
        sequence, tokens = spelled(doc)
        never_seen.append({"id": doc.id, "tokens": tokens, "loss": token_losses(before, sequence)})
    # A summary of where the never-seen records' loss sits: digit tokens vs the rest.
    digits = [x for r in never_seen for t, x in zip(r["tokens"], r["loss"], strict=True) if t.strip("Ġ").isdigit()]
    other = [x for r in never_seen for t, x in zip(r["tokens"], r["loss"], strict=True) if not t.strip("Ġ").isdigit()]
    summary = {"never_seen_mean_loss_digit_tokens": sum(digits) / len(digits),
               "never_seen_mean_loss_other_tokens": sum(other) / len(other),
               "never_seen_share_of_loss_on_digit_tokens": sum(digits) / (sum(digits) + sum(other))}
    print(", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    save_cpu_result(args.out, "token_losses", f"the demo (size tiny, seed {args.seed}): per-token losses of its "
                    "by-ID records before and after the by-ID request, and of the never-seen judging records",
                    started, request=report.to_dict(), summary=summary, forgotten=forgotten, never_seen=never_seen)


if __name__ == "__main__":
    main()
