"""Ablations of the unlearning engine, set against the paper it follows (Zagardo 2024, "A More Practical
Approach to Machine Unlearning"), on the demo's corpus.

    python benchmarks/ablations.py                                    # this machine: --size tiny, CPU
    python benchmarks/ablations.py --device cuda --size small         # a GPU
    python benchmarks/ablations.py --device cuda --size gpt2 --epochs 2 --work-dir /big/disk

Setup (the demo's, see `gradstore_unlearn.demo`): the built-in corpus (stdlib docstrings and synthetic personal
records with a 4-digit PIN canary each) at the demo's size, the demo's tokenizer and GPT-2-architecture model.
ONE model is trained with capture policy `all`, so the store holds every epoch's per-example embedding rows
(epoch 0 under the plain ID, epoch e under `<id>@epoch<e>`); a second model is retrained from scratch without
the forget set (the gold standard the KS test compares against). The forget set is the demo's: the records it
forgets by ID and by text. The calibration target is the demo's too: half of the never-trained holdout records,
kept in the store as its reference set; the other half judges the result (MIA AUC).

Every variant starts from a fresh copy of the trained weights and a fresh (hard-linked) copy of that store, since
a successful request erases the forgotten examples' rows; it runs with the engine's defaults otherwise, on the
same forget set and target:

    first_epoch      ours as shipped: stored first-epoch rows, calibrated, embedding only, ownership weighting,
                     conflict projection
    multi_epoch      the sum of every epoch's stored rows (stored_epochs="all")          paper finding 1
    layers_last2     embedding + the last two transformer blocks (fresh gradients there)  paper finding 2
    layers_all       embedding + every other parameter
    fixed_<s>        no calibration: one step of scale s (units of 0.1% of ||W||)         paper finding 4
    iterative        the stored step, then fresh-gradient steps toward per-example targets  paper finding 5
    no_projection    first_epoch without the conflict projection (projection="none")
    iterative_no_projection   iterative without it
    plain_ascent     the paper's plain ascent: every row moves, unprojected (row_weighting="none", projection="none")

Engine checks, printed before the table: stored_epochs="first" reads exactly the epoch-0 record of each ID from
the all-policy store (and "all" every epoch's); the retain sample the engine draws for its guard (and its repair
pool, with repair=True) holds no copy of a forgotten example and no example twice; its document frequencies (the ownership weights) count
each example once, not once per epoch. If one fails, the variants' numbers are not those of a first-policy store.

Columns: status (forgotten / target_not_met), the forgotten records' mean loss after, its gap to the holdout
target and to the retrained model (nats/token), retain perplexity change, mean exposure of the forgotten
canaries (bits; a "never-seen canaries" row gives the exposure of holdout canaries on the trained model),
membership-inference AUC (loss attack, forgotten vs never-seen judge records; 0.5 = indistinguishable), the KS
p-value of the forgotten records' losses against the retrained model's, and the request's seconds (evaluation
not included). The "before" and "retrained" rows are the references. The last lines compare the numbers with
the paper's findings; each verdict is computed from the table, with its criterion printed.

Writes benchmarks/results/ablations_<device>.json ("cpu", or the CUDA card's name: "nvidia-h100-80gb-hbm3"),
with every evaluation's per-record numbers. Cost at --size tiny (the demo's 40 epochs): ~5.5 minutes on two idle
cores (training with capture ~2 min, retraining ~2 min, the variants and their evaluations ~1.5 min),
several times that on busy ones. Capture `all` multiplies the store by the epochs: --size small needs several GB,
gpt2 several GB an epoch, hence `--epochs` and `--work-dir` there. One seed: with five forgotten records the
KS p-value takes few distinct values, and the retrained reference itself varies from run to run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from bench_device import card_name, device_slug

from gradstore import GradStore
from gradstore_unlearn import data
from gradstore_unlearn.capture import is_later_epoch_record
from gradstore_unlearn.demo import DEMO_SIZES, prepare_data, train_demo_model
from gradstore_unlearn.evaluate import EvaluationReport, evaluate_model, sequence_losses
from gradstore_unlearn.train import MODEL_SIZES, retrain_without
from gradstore_unlearn.unlearn import ForgetConfig, Unlearner

TOLERANCE = ForgetConfig().target_tolerance  # the engine's target band, +-2% of the target loss


@dataclass
class Variant:
    name: str
    label: str
    mode: str = "first_epoch"
    config: dict[str, Any] = field(default_factory=dict)


def variants(args: argparse.Namespace) -> list[Variant]:
    out = [
        Variant("first_epoch", "first-epoch rows (ours)"),
        Variant("multi_epoch", "all-epoch rows", config={"stored_epochs": "all"}),
        Variant("layers_last2", "layers: emb + last 2", config={"layers": "last2"}),
        Variant("layers_all", "layers: all", config={"layers": "all"}),
    ]
    out += [Variant(f"fixed_{scale:g}", f"fixed step {scale:g} (no calib.)",
                    config={"calibrate": False, "initial_scale": scale}) for scale in args.fixed_scales]
    out += [
        Variant("iterative", "iterative mode", mode="iterative"),
        Variant("no_projection", "no conflict projection", config={"projection": "none"}),
        Variant("iterative_no_projection", "iterative, no projection", mode="iterative",
                config={"projection": "none"}),
        Variant("plain_ascent", "plain ascent (paper)", config={"row_weighting": "none", "projection": "none"}),
    ]
    return out


# ----------------------------------------------------------------------------------------------- arguments

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="tiny", choices=sorted(DEMO_SIZES), help="the demo's corpus and model size")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default: the demo's: " + ", ".join(
                       f"{k} {v.epochs}" for k, v in DEMO_SIZES.items()) + ")")
    p.add_argument("--fixed-scales", type=float, nargs="+", default=[1.0, 16.0, 256.0],
                   help="scales of the fixed-step variants (1.0 = the engine's initial_scale)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where the stores go (default: a temporary directory, removed at the end)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file, or a directory for ablations_<device>.json (default benchmarks/results/)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available; use --device cpu")
    if args.epochs is None:
        args.epochs = DEMO_SIZES[args.size].epochs
    if args.epochs < 2:
        p.error("--epochs must be at least 2: the multi-epoch variant needs later-epoch records")
    return args


class Log:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)


def link_copy(src: Path, dst: Path) -> None:
    """A copy of a local store whose files are hard links: the store never rewrites a file in place (new
    objects get new names, erasure writes new segments and unlinks the old), so the copies stay independent."""
    try:
        shutil.copytree(src, dst, copy_function=os.link)
    except OSError:  # another file system, or no hard links: a real copy
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)


# ------------------------------------------------------------------------------------------------- setup

@dataclass
class Setup:
    """Everything the variants share: the trained model, the stores, the sets, the references."""

    tokenizer: Any
    model: torch.nn.Module
    retrained: torch.nn.Module
    store: Path  # as captured (policy all); the variants work on copies
    forget_ids: list[Any]
    forget_docs: list[data.Document]
    judge_docs: list[data.Document]
    sets: dict[str, list[list[int]]]  # forget / retain / judge / general / reference token sequences
    train: dict[str, Any]
    checks: list[dict[str, Any]] = field(default_factory=list)

    def evaluate(self, model: torch.nn.Module, *, reference: torch.nn.Module | None,
                 never_seen_canaries: bool = False) -> EvaluationReport:
        return evaluate_model(model, self.tokenizer, forget=self.sets["forget"], retain=self.sets["retain"],
                              holdout=self.sets["judge"], general=self.sets["general"],
                              forget_canaries=[d.canary for d in self.forget_docs],
                              holdout_canaries=[d.canary for d in self.judge_docs] if never_seen_canaries else (),
                              reference=reference)


def build_setup(args: argparse.Namespace, work: Path, log: Log) -> Setup:
    spec = dataclasses.replace(DEMO_SIZES[args.size], epochs=args.epochs)
    log("building the corpus and the tokenizer (the demo's)")
    demo_data = prepare_data(spec, args.seed)
    corpus, tokenizer, encode = demo_data.corpus, demo_data.tokenizer, demo_data.encode
    sequences, ids = encode(demo_data.train_docs), [d.id for d in demo_data.train_docs]
    reference_docs, judge_docs = demo_data.reference_docs, demo_data.judge_docs
    # The demo's forget set: the records it forgets by ID and the one it forgets by text.
    forget_docs = demo_data.forget_docs
    forget_ids = [d.id for d in forget_docs]

    log(f"training a {spec.model} GPT-2 on {len(sequences)} documents for {spec.epochs} epochs, capturing every "
        "epoch (policy all)")
    trained_demo = train_demo_model(spec, demo_data, work / "store", seed=args.seed, device=args.device,
                                    model_id=f"ablations-{spec.model}", capture_policy="all", progress=False)
    model, store, config, trained = trained_demo.model, trained_demo.store, trained_demo.config, trained_demo.result
    log(f"  {trained.seconds:.0f} s, final loss {trained.final_loss:.3f}, store {store.stats().examples} records")

    log("retraining without the forget set (the reference for the KS test)")
    started = time.perf_counter()
    retrained = retrain_without(spec.model, len(tokenizer), spec.corpus.max_tokens, sequences, ids,
                                set(forget_ids), config, progress=False).eval()
    retrain_seconds = time.perf_counter() - started
    log(f"  {retrain_seconds:.0f} s")

    setup = Setup(
        tokenizer=tokenizer, model=model, retrained=retrained,
        store=work / "store",
        forget_ids=forget_ids, forget_docs=forget_docs, judge_docs=judge_docs,
        sets={"forget": encode(forget_docs), "retain": encode(corpus.split("retain")), "judge": encode(judge_docs),
              "general": encode(corpus.split("eval")), "reference": encode(reference_docs)},
        train={"config": config.to_dict(), "model": spec.model, "model_config": MODEL_SIZES[spec.model],
               "params": sum(p.numel() for p in model.parameters()), "examples": len(sequences),
               "corpus": corpus.split_counts(), "train_seconds": trained.seconds,
               "retrain_seconds": retrain_seconds, "final_loss": trained.final_loss,
               "capture": trained.capture.to_dict() if trained.capture else None,
               "store": {**store.stats().to_dict(), "uri": "store"}},  # a temporary directory: no path kept
    )
    setup.checks = engine_checks(setup, args.epochs)
    return setup


def engine_checks(setup: Setup, epochs: int) -> list[dict[str, Any]]:
    """What the engine reads from the all-policy store, and what it takes from it for the guard and the weights.

    Uses the engine's own helpers (`_stored_keys`, `_ownership`, `_retain_samples`: what `forget` calls)."""
    checks = []
    ids = setup.forget_ids
    store = GradStore.open(setup.store)
    for stored_epochs, want in (("first", [0] * len(ids)), ("all", sorted(list(range(epochs)) * len(ids)))):
        unlearner = Unlearner(copy.deepcopy(setup.model), store, config=ForgetConfig(stored_epochs=stored_epochs))
        got = sorted(int(m["epoch"]) for m in store.get_many(unlearner._stored_keys(ids), with_meta=True).meta)
        span = f"epochs {min(got)}..{max(got)}" if max(got) > min(got) else f"epoch {max(got)}"
        checks.append({"check": f'stored_epochs="{stored_epochs}" reads '
                                + ("the epoch-0 record of each ID" if stored_epochs == "first" else
                                   "every epoch's record of each ID"),
                       "value": f"{len(got)} records, {span}", "passed": got == want})

    unlearner = Unlearner(copy.deepcopy(setup.model), store)
    repair, guard = unlearner._retain_samples(set(ids), unlearner._ownership(setup.sets["forget"]),
                                              unlearner.config.repair)
    guard = guard.sequences
    forgotten = {tuple(s) for s in setup.sets["forget"]}
    copies = sum(tuple(s) in forgotten for s in repair + guard)
    twice = any(len({tuple(s) for s in sample}) < len(sample) for sample in (repair, guard))
    checks.append({"check": "the engine's retain sample holds no copy of a forgotten example, no example twice",
                   "value": f"{copies} copies of forgotten examples in {len(repair)} repair + {len(guard)} guard "
                            f"sequences{', some twice' if twice else ''}",
                   "passed": copies == 0 and not twice})

    expected = np.zeros(store.vocab_size)
    for tokens in store.get_sequences([k for k in store.ids() if not is_later_epoch_record(k)]):
        expected[np.unique(np.asarray(tokens, dtype=np.int64))] += 1
    engine = unlearner.document_frequency().numpy()
    tokens = np.unique(np.concatenate([np.asarray(s) for s in setup.sets["forget"]]))
    ratio = float(np.median(engine[tokens] / np.maximum(expected[tokens], 1)))
    checks.append({"check": "the ownership weights count each example once, not once per epoch",
                   "value": f"document frequency = {ratio:g} x the first-epoch count (median over the forget "
                            "set's tokens)",
                   "passed": bool(np.array_equal(engine, expected))})
    return checks


# ---------------------------------------------------------------------------------------------- variants

def run_variant(variant: Variant, setup: Setup, work: Path, log: Log) -> dict[str, Any]:
    store_dir = work / f"store-{variant.name}"
    link_copy(setup.store, store_dir)
    store = GradStore.open(store_dir)
    model = copy.deepcopy(setup.model)
    unlearner = Unlearner(model, store, tokenizer=setup.tokenizer, config=ForgetConfig(**variant.config))
    report = unlearner.forget(setup.forget_ids, mode=variant.mode, request_id=f"ablation-{variant.name}")
    started = time.perf_counter()
    evaluation = setup.evaluate(model, reference=setup.retrained)
    erased = sum(store.is_erased(i) for i in setup.forget_ids)
    shutil.rmtree(store_dir)
    log(f"  {variant.name}: {report.status}, forget loss {report.forget_loss_before:.3f} -> "
        f"{report.forget_loss_after:.3f} (target {report.target_loss:.3f}), {report.seconds:.1f} s "
        f"+ {time.perf_counter() - started:.1f} s evaluation")
    return {"name": variant.name, "label": variant.label, "mode": variant.mode, "config": variant.config,
            "status": report.status, "seconds": report.seconds, "eval_seconds": time.perf_counter() - started,
            "erased_from_store": erased, "request": report.to_dict() | {"interference": None},
            "evaluation": evaluation}


def summary_row(name: str, label: str, evaluation: EvaluationReport, before: EvaluationReport, target: float,
                status: str = "-", seconds: float | None = None) -> dict[str, Any]:
    """The table's numbers for one model (JSON-ready)."""
    return {
        "name": name, "label": label, "status": status,
        "forget_loss": evaluation.forget_loss,
        "gap_to_target": evaluation.forget_loss - target,
        "gap_to_retrained": evaluation.forget_loss_gap,
        "retain_ppl_change_pct": 100 * (evaluation.retain_ppl / before.retain_ppl - 1),
        "general_ppl_change_pct": (100 * (evaluation.general_ppl / before.general_ppl - 1)
                                   if evaluation.general_ppl and before.general_ppl else None),
        "forget_exposure_bits": evaluation.forget_exposure_mean,
        "forget_extraction_rate": evaluation.forget_extraction_rate,
        "mia_auc": evaluation.mia_auc_loss,
        "ks_pvalue": evaluation.ks_pvalue,
        "seconds": seconds,
    }


# ------------------------------------------------------------------------------------------- conclusions

# Success is matching the model retrained without the forget set (see gradstore_unlearn.evaluate), at the least
# cost to what is kept. Differences below these margins count as even.
GAP_MARGIN = 0.02  # nats/token of |forget loss - retrained forget loss|
RETAIN_MARGIN = 0.25  # percentage points of retain perplexity change
TARGET_MARGIN = 0.1  # nats: a calibration target this close to the retrained model's forget loss is right
CRITERION = (f"A beats B when A's forget loss is as close or closer to the retrained model's (margin "
             f"{GAP_MARGIN} nats) at an equal or smaller retain perplexity increase (margin {RETAIN_MARGIN} points), "
             "and strictly better on one of the two; better on one and worse on the other is a trade-off")


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    """'better' | 'worse' | 'even' | 'trade-off': row a against row b, by `CRITERION`."""
    closer = abs(b["gap_to_retrained"]) - abs(a["gap_to_retrained"])
    cheaper = b["retain_ppl_change_pct"] - a["retain_ppl_change_pct"]
    sign = [0 if abs(closer) < GAP_MARGIN else (1 if closer > 0 else -1),
            0 if abs(cheaper) < RETAIN_MARGIN else (1 if cheaper > 0 else -1)]
    if sign == [0, 0]:
        return "even"
    if min(sign) >= 0:
        return "better"
    if max(sign) <= 0:
        return "worse"
    return "trade-off"


def _describe(row: dict[str, Any]) -> str:
    return (f"{row['status']}, {row['gap_to_retrained']:+.3f} nats from retrained, retain "
            f"{row['retain_ppl_change_pct']:+.2f}%")


def _reached(row: dict[str, Any]) -> bool:
    return row["status"] == "forgotten"


def _matches_retrained(row: dict[str, Any]) -> bool:
    """The demo's criterion: forgotten records' losses indistinguishable from the retrained model's."""
    return row["ks_pvalue"] is not None and row["ks_pvalue"] > 0.05


def conclusions(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each of the paper's findings that the variants test, with the verdict the numbers give."""
    out = []
    ours, multi = rows["first_epoch"], rows["multi_epoch"]
    versus = compare(ours, multi)
    out.append({
        "finding": "1. first-epoch stored gradients unlearn more effectively than multi-epoch ones",
        "measured": f"first-epoch: {_describe(ours)}; all-epoch: {_describe(multi)}",
        "verdict": {"better": "agrees", "worse": "disagrees: the all-epoch rows do better",
                    "even": "neither: no difference here",
                    "trade-off": "neither: a trade-off (one is closer to retrained, the other cheaper)"}[versus],
    })

    last2, every = rows["layers_last2"], rows["layers_all"]
    more_layers = [compare(more, ours) for more in (last2, every)]
    out.append({
        "finding": "2. the embedding layer alone is enough; gradients of the last blocks add nothing",
        "measured": (f"embedding only: {_describe(ours)}; + last 2 blocks: {_describe(last2)} ({more_layers[0]}); "
                     f"all layers: {_describe(every)} ({more_layers[1]})"),
        "verdict": ("disagrees: updating more layers does better" if "better" in more_layers else
                    "partly: more layers trade retain cost for forgetting" if "trade-off" in more_layers else
                    "agrees" if _reached(ours) or _matches_retrained(ours) else
                    "partly: more layers add nothing, but the embedding alone neither reaches the target nor "
                    "matches retrained (KS p <= 0.05)"),
    })

    fixed = [r for name, r in rows.items() if name.startswith("fixed_")]
    beaten_by = [r["label"] for r in fixed if compare(r, ours) == "better"]
    out.append({
        "finding": "4. gradient ascent needs calibration: a fixed step stops short or overshoots",
        "measured": "; ".join([f"calibrated: {_describe(ours)}"] + [f"{r['label']}: {_describe(r)}" for r in fixed]),
        "verdict": ("agrees (no fixed step beats the calibrated one)" if not beaten_by else
                    f"disagrees: {', '.join(beaten_by)} beats the calibrated step"),
    })

    it = rows["iterative"]
    closer = [it["ks_pvalue"] > ours["ks_pvalue"],
              abs(it["gap_to_retrained"]) < abs(ours["gap_to_retrained"]),
              abs(it["mia_auc"] - 0.5) < abs(ours["mia_auc"] - 0.5)]
    out.append({
        "finding": "5. iterative unlearning is more complete than a single stored step",
        "measured": (f"iterative vs single step: KS p {it['ks_pvalue']:.3f} vs {ours['ks_pvalue']:.3f}, "
                     f"{it['gap_to_retrained']:+.3f} vs {ours['gap_to_retrained']:+.3f} nats from retrained, "
                     f"MIA AUC {it['mia_auc']:.3f} vs {ours['mia_auc']:.3f}, retain {it['retain_ppl_change_pct']:+.2f}% "
                     f"vs {ours['retain_ppl_change_pct']:+.2f}%, {it['seconds']:.0f} s vs {ours['seconds']:.0f} s"),
        "verdict": (f"{'agrees' if sum(closer) >= 2 else 'disagrees'}: iterative is closer to retrained on "
                    f"{sum(closer)} of 3 (KS p, gap, MIA AUC)"),
    })

    plain, unprojected = rows["plain_ascent"], rows["no_projection"]
    verdicts = {"better": "yes", "even": "no difference here", "trade-off": "a trade-off"}
    out.append({  # both unprojected: the weighting alone
        "finding": "(ours) ownership row weighting beats the paper's plain ascent",
        "measured": f"ownership: {_describe(unprojected)}; plain: {_describe(plain)}",
        "verdict": {**verdicts, "worse": "no: plain ascent does better"}[compare(unprojected, plain)],
    })
    for projected, without, label in ((ours, unprojected, "single step"),
                                      (it, rows["iterative_no_projection"], "iterative")):
        out.append({
            "finding": f"(ours) the conflict projection beats the unprojected step ({label})",
            "measured": f"projected: {_describe(projected)}; unprojected: {_describe(without)}",
            "verdict": {**verdicts, "worse": "no: the unprojected step does better"}[compare(projected, without)],
        })

    retrained = rows["retrained"]
    out.append({
        "finding": "(engine) the calibration target, the trained model's holdout loss, is the retrained model's "
                   "forget loss",
        "measured": (f"target {retrained['forget_loss'] - retrained['gap_to_target']:.3f}, retrained forget loss "
                     f"{retrained['forget_loss']:.3f} ({retrained['gap_to_target']:+.3f} nats from the target)"),
        "verdict": (f"yes (within {TARGET_MARGIN} nats)" if abs(retrained["gap_to_target"]) <= TARGET_MARGIN else
                    "no: reaching the target " + ("over-unlearns" if retrained["gap_to_target"] < 0 else
                                                  "under-unlearns") + " relative to retraining"),
    })
    return out


# ----------------------------------------------------------------------------------------------- report

COLUMNS = [  # header, key, format (None: text)
    ("variant", "label", None), ("status", "status", None), ("forget loss", "forget_loss", ".3f"),
    ("gap target", "gap_to_target", "+.3f"), ("gap retrained", "gap_to_retrained", "+.3f"),
    ("retain ppl", "retain_ppl_change_pct", "+.2f%"), ("exposure", "forget_exposure_bits", ".2f"),
    ("MIA AUC", "mia_auc", ".3f"), ("KS p", "ks_pvalue", ".3f"), ("s", "seconds", ".1f"),
]


def _cell(value: Any, spec: str | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if spec is None:
        return str(value)
    return f"{value:{spec[:-1]}}%" if spec.endswith("%") else f"{value:{spec}}"


def _shout(verdict: str) -> str:
    """'agrees (why)' -> 'AGREES (why)': the verdict's first word in capitals."""
    word, _, rest = verdict.partition(" ")
    return f"{word.upper()} {rest}".rstrip()


def table(report: dict[str, Any]) -> str:
    rows = [[_cell(r.get(key), spec) for _, key, spec in COLUMNS] for r in report["table"]]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, (h, _, _) in enumerate(COLUMNS)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if spec is None else c.rjust(w)
                         for c, w, (_, _, spec) in zip(cells, widths, COLUMNS, strict=True)).rstrip()

    t = report["train"]
    lines = [
        f"{report['device']} ({report['device_type']}), torch {report['torch']}: GPT-2 {t['model']} "
        f"({t['params'] / 1e6:.1f}M params), {t['examples']} documents x {t['config']['epochs']} epochs (capture all), "
        f"forget {len(report['forget_ids'])} records, target = holdout loss {report['target_loss']:.3f} "
        f"(band +-{100 * TOLERANCE:g}%)",
        "",
        "Engine checks:",
        *[f"  [{'ok' if c['passed'] else 'NO'}] {c['check']}: {c['value']}" for c in report["checks"]],
        "",
        line([h for h, _, _ in COLUMNS]),
        "  ".join("-" * w for w in widths),
        *[line(r) for r in rows],
        "gap target / retrained: forget loss minus the holdout target / the retrained model's forget loss (nats); "
        "exposure: forgotten canaries (bits); s: the request",
        "",
        f"Against the paper (Zagardo 2024), from the numbers above. {CRITERION}.",
        *[f"  {c['finding']}: {_shout(c['verdict'])}\n      {c['measured']}" for c in report["conclusions"]],
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    log = Log()
    started = time.perf_counter()
    own_dir = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="ablations-")) if own_dir else args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    try:
        setup = build_setup(args, work, log)
        for c in setup.checks:
            log(f"  check [{'ok' if c['passed'] else 'NO'}] {c['check']}: {c['value']}")
        log("evaluating the trained and the retrained model")
        before = setup.evaluate(setup.model, reference=setup.retrained, never_seen_canaries=True)
        retrained = setup.evaluate(setup.retrained, reference=None)
        target = float(sequence_losses(setup.model, setup.sets["reference"]).double().mean())
        results = []
        for variant in variants(args):
            log(f"variant {variant.name}: {variant.label}")
            results.append(run_variant(variant, setup, work, log))
        untouched = GradStore.open(setup.store)
        assert all(i in untouched for i in setup.forget_ids), "a variant's erasure reached the shared store"
    finally:
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)

    never_seen = {"name": "never_seen_canaries", "label": "never-seen canaries", "status": "-",
                  "forget_exposure_bits": before.holdout_exposure_mean}
    rows = [summary_row("before", "before (trained)", before, before, target, "reference"),
            summary_row("retrained", "retrained w/o forget set", retrained, before, target, "reference"),
            never_seen]
    rows[1]["gap_to_retrained"] = 0.0
    rows += [summary_row(r["name"], r["label"], r["evaluation"], before, target, r["status"], r["seconds"])
             for r in results]
    by_name = {r["name"]: r for r in rows}
    return {
        "benchmark": "ablations",
        "device": card_name(args.device), "device_type": args.device, "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "cpu_threads": torch.get_num_threads(),
        "size": args.size, "seed": args.seed, "train": setup.train,
        "forget_ids": setup.forget_ids, "target_loss": target, "checks": setup.checks,
        "table": rows, "conclusions": conclusions(by_name),
        "evaluations": {"before": before.to_dict(per_example=True), "retrained": retrained.to_dict(per_example=True),
                        **{r["name"]: r["evaluation"].to_dict(per_example=True) for r in results}},
        "variants": [{k: v for k, v in r.items() if k != "evaluation"} for r in results],
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = args.out or Path(__file__).resolve().parent / "results"
    if out.suffix != ".json":
        out = out / f"ablations_{device_slug(args.device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = run(args)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(table(report))
    print(f"\nwrote {out} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
