"""Training-step overhead of `GradientCapture`: the same model, the same run, with and without capture.

    python benchmarks/capture_overhead.py --device cuda --size gpt2 --batch 16 --seq 512   # GPT-2 124M, bf16
    python benchmarks/capture_overhead.py --device cpu --size tiny --batch 8 --seq 128      # this machine

Workload: a GPT-2-architecture model built from its config (nothing downloaded), trained with AdamW on
synthetic batches of Zipf(1) token ids (fixed length, no padding, labels = inputs), bf16 autocast on CUDA.
After a warmup, measured blocks of `--steps` steps alternate between the arms (the order rotates per block):

    baseline        no capture at all (no hooks installed)
    capture         GradientCapture defaults: float32 device-to-host copy, dedupe + rescale on the host,
                    per-example loss recorded (policy `first`; every step brings fresh example IDs)
    capture_bf16    the same with transfer_dtype=torch.bfloat16 (half the bytes over PCIe)
    capture_noloss  the same as `capture` with record_loss=False (isolates the per-example loss pass)
    capture_1thread the same as `capture` with torch's intra-op threads set to 1 during the block: on a GPU run
                    the host's torch work is the writer's, and CPU `index_add_` over dim 0 runs one OpenMP
                    parallel region per row, so this isolates the cost of the thread pool in the writer

Each capture block starts a fresh `GradientCapture` on its arm's store and closes it after the timed
steps (the drain is reported, not timed), so no writer thread outlives its block. On CUDA each step is
timed with CUDA events on the training stream (the GPU timeline, including any gap the host leaves when
capture stalls it) and the device is synchronised only at block boundaries; on CPU with perf_counter.
A round is one block of every arm. Another round starts only if it should end within `--budget-s` seconds
of timed rounds (90 on CUDA), and the JSON is rewritten after every round (and on SIGTERM), so a run cut
short still leaves its complete rounds.

Reported per arm: median step ms (overhead % against the baseline median), mean step ms from the block
wall clock (overhead % with stalls included), tokens/s, stall seconds (`capture.report`), the writer's
seconds per step (whether it keeps up in the long run), bytes transferred and captured per step, the
store's bytes on disk, and peak GPU memory. Target on the GPU: <= 1% overhead with dedupe on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from bench_device import card_name, device_slug

from gradstore import GradStore
from gradstore_unlearn.capture import GradientCapture
from gradstore_unlearn.train import MODEL_SIZES, build_model

ARMS = {
    "baseline": None,
    "capture": {"transfer_dtype": torch.float32, "record_loss": True},
    "capture_bf16": {"transfer_dtype": torch.bfloat16, "record_loss": True},
    "capture_noloss": {"transfer_dtype": torch.float32, "record_loss": False},
    "capture_1thread": {"transfer_dtype": torch.float32, "record_loss": True, "threads": 1},
}
CAPTURE_KWARGS = ("transfer_dtype", "record_loss")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--size", default=None, choices=sorted(MODEL_SIZES),
                   help="model size (default gpt2 on CUDA, tiny on CPU)")
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--batch", type=int, default=None, help="examples per step (default 16 CUDA, 8 CPU)")
    p.add_argument("--seq", type=int, default=None, help="tokens per example (default 512 CUDA, 128 CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per arm per block (default 15 CUDA, 3 CPU)")
    p.add_argument("--blocks", type=int, default=None, help="rounds of alternating arms (default 3 CUDA, 2 CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed baseline steps first (default 20 CUDA, 2 CPU); then 2 untimed capture steps")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=None,
                   help="arms to run (baseline is always included; default all, on CPU all but capture_1thread)")
    p.add_argument("--autocast", choices=["auto", "bf16", "none"], default="auto",
                   help="auto: bf16 on CUDA, none on CPU")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start another round only if it should end within this many seconds of timed rounds "
                        "(default 90 on CUDA, none on CPU; 0 = none)")
    p.add_argument("--store-dtype", choices=["bfloat16", "float32", "int8"], default="bfloat16")
    p.add_argument("--max-pending", type=int, default=4, help="GradientCapture's queue bound, in batches")
    p.add_argument("--store-dir", type=Path, default=None,
                   help="where the stores go (default: a temporary directory, removed at the end)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file, or a directory for capture_overhead_<device>.json "
                        "(default benchmarks/results/capture_overhead_<device>.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on CPU: cores - 1, leaving one to the capture writer thread)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available; use --device cpu")
    args.size = args.size or ("gpt2" if cuda else "tiny")
    args.batch = args.batch or (16 if cuda else 8)
    args.seq = args.seq or (512 if cuda else 128)
    args.steps = args.steps or (15 if cuda else 3)
    args.blocks = args.blocks or (3 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (20 if cuda else 2)
    if args.budget_s is None:
        args.budget_s = 90.0 if cuda else 0.0
    if args.arms is None:
        args.arms = [a for a in ARMS if cuda or a != "capture_1thread"]
    if "baseline" not in args.arms:
        args.arms = ["baseline", *args.arms]
    args.arms = list(dict.fromkeys(args.arms))
    if args.threads is None and not cuda:
        args.threads = max(1, (os.cpu_count() or 1) - 1)
    if args.autocast == "auto":
        args.autocast = "bf16" if cuda else "none"
    return args


# ----------------------------------------------------------------------------- workload

def zipf_batches(count: int, batch: int, seq: int, vocab: int, seed: int, device: str) -> list[torch.Tensor]:
    """`count` distinct int64 [batch, seq] batches of Zipf(1) token ids (ranks mapped by a fixed permutation)."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    rank_to_token = torch.randperm(vocab, generator=g)
    out = []
    for _ in range(count):
        ranks = torch.multinomial(weights, batch * seq, replacement=True, generator=g)
        out.append(rank_to_token[ranks].view(batch, seq).to(device))
    return out


# ----------------------------------------------------------------------------- the benchmark

class Bench:
    def __init__(self, args: argparse.Namespace, store_root: Path):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.model = build_model(args.size, args.vocab, args.seq, seed=args.seed).to(self.device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.0)
        self.batches = zipf_batches(4, args.batch, args.seq, args.vocab, args.seed, args.device)
        self.autocast_dtype = torch.bfloat16 if args.autocast == "bf16" else None
        self.dim = self.model.get_input_embeddings().weight.shape[1]
        self.store_root = store_root
        self.stores: dict[str, GradStore] = {}
        self.step_count = 0
        self.next_id = 0
        self.threads = torch.get_num_threads()

    def store(self, arm: str) -> GradStore:
        if arm not in self.stores:
            self.stores[arm] = GradStore.create(self.store_root / arm, dim=self.dim, vocab_size=self.args.vocab,
                                                dtype=self.args.store_dtype, model_id=f"gpt2-{self.args.size}")
        return self.stores[arm]

    def fresh_ids(self) -> list[int]:
        ids = list(range(self.next_id, self.next_id + self.args.batch))
        self.next_id += self.args.batch
        return ids

    def step(self, capture: GradientCapture | None) -> None:
        x = self.batches[self.step_count % len(self.batches)]
        self.step_count += 1
        with capture.batch(self.fresh_ids()) if capture is not None else contextlib.nullcontext():
            with (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                  else contextlib.nullcontext()):
                loss = self.model(input_ids=x, labels=x).loss
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def make_capture(self, arm: str) -> GradientCapture:
        spec = {k: v for k, v in ARMS[arm].items() if k in CAPTURE_KWARGS}
        return GradientCapture(self.model, self.store(arm), optimizer=self.optimizer, policy="first",
                               max_pending=self.args.max_pending, **spec)

    def block(self, arm: str, steps: int) -> dict:
        """`steps` timed steps of one arm; returns per-step ms, the block's wall clock and the capture report."""
        capture = self.make_capture(arm) if ARMS[arm] is not None else None
        threads = torch.get_num_threads()
        if capture is not None:
            torch.set_num_threads(ARMS[arm].get("threads", threads))
            capture.start()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sync()
        times: list[float] = []
        events = []
        wall0 = time.perf_counter()
        for _ in range(steps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self.step(capture)
                end.record()
                events.append((start, end))
            else:
                t0 = time.perf_counter()
                self.step(capture)
                times.append((time.perf_counter() - t0) * 1e3)
        self.sync()
        wall = time.perf_counter() - wall0
        if self.cuda:
            times = [s.elapsed_time(e) for s, e in events]
        peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else None
        out = {"arm": arm, "step_ms": times, "wall_s": wall, "peak_bytes": peak}
        if capture is not None:
            t0 = time.perf_counter()
            report = capture.close()  # drains the queue and commits: outside the timed region
            out["drain_s"] = time.perf_counter() - t0
            torch.set_num_threads(threads)
            out["report"] = report.to_dict()
        return out


def summarise(args: argparse.Namespace, blocks: list[dict], bench: Bench) -> dict:
    tokens = args.batch * args.seq
    arms: dict[str, dict] = {}
    for arm in args.arms:
        mine = [b for b in blocks if b["arm"] == arm]
        steps = [t for b in mine for t in b["step_ms"]]
        n = len(steps)
        wall_ms = 1e3 * sum(b["wall_s"] for b in mine) / n
        median = statistics.median(steps)
        row = {
            "steps": n,
            "median_step_ms": median,
            "p10_step_ms": quantile(steps, 0.1),
            "p90_step_ms": quantile(steps, 0.9),
            "mean_step_ms_wall": wall_ms,
            "block_median_ms": [statistics.median(b["step_ms"]) for b in mine],
            "tokens_per_s": tokens / (median * 1e-3),
            "tokens_per_s_wall": tokens / (wall_ms * 1e-3),
            "peak_gpu_bytes": max((b["peak_bytes"] or 0) for b in mine) if bench.cuda else None,
        }
        if ARMS[arm] is not None:
            reports = [b["report"] for b in mine]
            total = {k: sum(r[k] for r in reports) for k in reports[0]}
            stats = bench.stores[arm].stats()
            expected = n * args.batch
            row.update(
                transfer_dtype=str(ARMS[arm]["transfer_dtype"]).replace("torch.", ""),
                record_loss=ARMS[arm]["record_loss"],
                torch_threads=ARMS[arm].get("threads", bench.threads),
                captured_steps=total["steps"],
                examples_captured=total["examples_captured"],
                complete=total["examples_captured"] == expected and total["steps"] == n and stats.examples == expected,
                stall_s=total["stall_seconds"],
                stall_ms_per_step=1e3 * total["stall_seconds"] / n,
                writer_ms_per_step=1e3 * total["writer_seconds"] / n,
                drain_s=[b["drain_s"] for b in mine],
                rows_per_step=total["rows_captured"] / n,
                bytes_transferred_per_step=total["bytes_transferred"] / n,
                bytes_captured_per_step=total["bytes_captured"] / n,
                store_bytes_on_disk=stats.bytes_on_disk,
                store_bytes_per_step=stats.bytes_on_disk / n,
                store_compression_ratio=stats.compression_ratio,
                store_segments=stats.segments,
            )
        arms[arm] = row
    base = arms["baseline"]
    for row in arms.values():
        row["overhead_pct"] = 100.0 * (row["median_step_ms"] / base["median_step_ms"] - 1.0)
        row["overhead_pct_wall"] = 100.0 * (row["mean_step_ms_wall"] / base["mean_step_ms_wall"] - 1.0)
        if "writer_ms_per_step" in row:
            # In a long run the writer is the bottleneck if it needs more time per step than training takes.
            row["writer_keeps_up"] = row["writer_ms_per_step"] <= base["median_step_ms"]
    return arms


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run(args: argparse.Namespace, on_progress=None) -> dict:
    """The report; `on_progress(report)` is called after every round (each arm one block), with the rounds so far."""
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.set_float32_matmul_precision("high")
    t_start = time.perf_counter()
    report = {
        "benchmark": "capture_overhead",
        "device": card_name(args.device),
        "device_type": args.device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "config": {
            "model": f"GPT-2 architecture, size {args.size} {MODEL_SIZES[args.size]}",
            "params": None,
            "vocab": args.vocab, "batch": args.batch, "seq": args.seq, "tokens_per_step": args.batch * args.seq,
            "steps_per_block": args.steps, "blocks": args.blocks, "warmup_steps": args.warmup,
            "budget_s": args.budget_s, "autocast": args.autocast, "optimizer": "AdamW(lr=1e-4)",
            "store_dtype": args.store_dtype, "max_pending": args.max_pending,
            "token_ids": "Zipf(1), fixed length, labels = inputs", "policy": "first (fresh IDs every step)",
            "timing": "CUDA events per step, sync per block" if args.device == "cuda" else "perf_counter per step",
            "statistic": "median over all timed steps of an arm",
        },
        "complete": False,
        "rounds": 0,
        "seconds": {},
        "arms": {},
        "blocks": [],
    }
    own_dir = args.store_dir is None
    store_root = Path(tempfile.mkdtemp(prefix="capture-overhead-")) if own_dir else args.store_dir
    store_root.mkdir(parents=True, exist_ok=True)
    try:
        bench = Bench(args, store_root)
        n_params = sum(p.numel() for p in bench.model.parameters())
        report["config"]["params"] = n_params
        print(f"{card_name(args.device)}: GPT-2 {args.size} ({n_params / 1e6:.1f}M params), batch {args.batch} x "
              f"{args.seq}, autocast {args.autocast}, arms {', '.join(args.arms)}", file=sys.stderr, flush=True)
        for _ in range(args.warmup):
            bench.step(None)
        # Warm the capture path too (pinned-memory cache, copy stream, store code), on a throwaway store.
        warm = GradientCapture(bench.model, bench.store("warmup"), optimizer=bench.optimizer, policy="first")
        with warm:
            for _ in range(2):
                bench.step(warm)
        bench.sync()
        t_timed = time.perf_counter()
        blocks = []
        for b in range(args.blocks):
            elapsed = time.perf_counter() - t_timed
            if b and args.budget_s and elapsed + elapsed / b > args.budget_s:
                print(f"  stopping after {b} rounds: another would pass the {args.budget_s:.0f} s budget",
                      file=sys.stderr, flush=True)
                break
            order = args.arms[b % len(args.arms):] + args.arms[: b % len(args.arms)]
            for arm in order:
                blocks.append(bench.block(arm, args.steps))
                last = blocks[-1]
                print(f"  block {b} {arm:<15} median {statistics.median(last['step_ms']):8.2f} ms"
                      + (f"  stall {last['report']['stall_seconds']:.3f} s  drain {last['drain_s']:.2f} s"
                         if "report" in last else ""), file=sys.stderr, flush=True)
            report["rounds"] = b + 1
            report["arms"] = summarise(args, blocks, bench)
            report["blocks"] = [
                {"round": i // len(args.arms), "arm": blk["arm"], "step_ms": [round(t, 3) for t in blk["step_ms"]],
                 "wall_s": blk["wall_s"], "drain_s": blk.get("drain_s"),
                 "stall_s": blk["report"]["stall_seconds"] if "report" in blk else None,
                 "writer_s": blk["report"]["writer_seconds"] if "report" in blk else None}
                for i, blk in enumerate(blocks)
            ]
            report["seconds"] = {"total": time.perf_counter() - t_start, "timed_blocks": time.perf_counter() - t_timed}
            if on_progress is not None:
                on_progress(report)
        report["complete"] = report["rounds"] == args.blocks
    finally:
        if own_dir:
            shutil.rmtree(store_root, ignore_errors=True)
    return report


# ----------------------------------------------------------------------------- reporting

def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e6:.2f}"


def table(report: dict) -> str:
    c = report["config"]
    head = (f"{'arm':<15} {'ms':>8} {'ovh %':>7} {'wall ms':>8} {'ovh% wall':>9} {'tok/s':>9} {'stall s':>8} "
            f"{'writer ms':>9} {'MB xfer':>8} {'MB capt':>8} {'MB disk':>8}")
    lines = [
        f"{report['device']} ({report['device_type']}), torch {report['torch']}, transformers "
        f"{report['transformers']}: {c['model']}, {c['params'] / 1e6:.1f}M params, batch {c['batch']} x "
        f"{c['seq']}, autocast {c['autocast']}, {report['rounds']} rounds x {c['steps_per_block']} steps per arm"
        + ("" if report["complete"] else f" (of {c['blocks']} rounds asked for)"),
        head,
        "-" * len(head),
    ]
    for arm, r in report["arms"].items():
        cap = "stall_s" in r
        lines.append(
            f"{arm:<15} {r['median_step_ms']:>8.2f} {r['overhead_pct']:>+7.2f} {r['mean_step_ms_wall']:>8.2f} "
            f"{r['overhead_pct_wall']:>+9.2f} {r['tokens_per_s']:>9.0f} "
            + (f"{r['stall_s']:>8.3f} {r['writer_ms_per_step']:>9.2f} {_mb(r['bytes_transferred_per_step']):>8} "
               f"{_mb(r['bytes_captured_per_step']):>8} {_mb(r['store_bytes_per_step']):>8}"
               + ("" if r["complete"] else "  INCOMPLETE") if cap else f"{'-':>8} {'-':>9} {'-':>8} {'-':>8} {'-':>8}")
        )
    lines.append("MB per step: xfer = device-to-host copy, capt = deduplicated rows in the store's dtype, "
                 "disk = store bytes on disk; writer ms = background writer time per step")
    return "\n".join(lines)


class _Terminated(BaseException):
    """SIGTERM (e.g. from `timeout`): stop measuring, keep the rounds measured."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv=None) -> None:
    args = parse_args(argv)
    out = args.out or Path(__file__).resolve().parent / "results"
    if out.suffix != ".json":
        out = out / f"capture_overhead_{device_slug(args.device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    latest: dict = {}

    def save(report: dict) -> None:  # after every round, so a run cut short still leaves its rounds
        latest["report"] = report
        out.write_text(json.dumps(report, indent=2) + "\n")

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        report = run(args, on_progress=save)
    except (_Terminated, KeyboardInterrupt):
        if "report" not in latest:
            raise
        report = latest["report"]
        print("interrupted: writing the rounds measured so far", file=sys.stderr)
    save(report)
    if report["arms"]:
        print(table(report))
    print(f"wrote {out}", file=sys.stderr)
    if report["rounds"] == 0:
        sys.exit(1)


if __name__ == "__main__":
    main()
