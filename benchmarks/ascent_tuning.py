"""Tuning of the deterministic `ascent_score` kernel: a sweep of its launch constants, and where the time goes.

    python benchmarks/ascent_tuning.py --device cuda                 # 2M rows (8192 examples x 256)
    TRITON_INTERPRET=1 python benchmarks/ascent_tuning.py --device cpu --quick --examples 2 \\
        --rows-per-example 32 --dim 48 --vocab 500                                      # rehearsal

The workload is kernel_throughput.py's (Zipf(1) token ids, D = 768, V = 50257, bf16 rows into a float32 W,
Q aliasing W), at one size. Every configuration runs through the public `ascent_score`, input checks and
sort included, and is timed the same way (median, L2 flushed between runs). In order:

  1. memory probes: a contiguous copy of the rows, and the same rows gathered in token-sorted order
     (`index_select` through the sort permutation) -- the order the kernel reads rows in;
  2. rows per step x D-block x warps, then the pipelining stages and the rows per piece at the best;
  3. the best on input already sorted by token (the permutation is the identity, rows are read in
     address order): how much of the time is the scattered read;
  4. a torch.profiler breakdown of the best (device time per kernel and per torch op).

The JSON (rewritten after every configuration, and on SIGTERM) names the fastest configuration as `best`;
`kernel_throughput.py --tuning FILE` runs with it.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import sys
from pathlib import Path

import torch
from bench_device import card_name, device_slug
from kernel_throughput import copy_bandwidth_gbps, floor_bytes, median_ms, sync, triton_version, zipf_batch

from gradstore_kernels import ascent_score, ascent_triton

# (rows per step, D-block, warps); the first is the default, the last the former default.
PIECE_KERNELS = [(4, 256, 1), (2, 256, 1), (8, 256, 1), (4, 128, 1), (8, 128, 1), (2, 512, 1), (16, 256, 4)]
PIECE_STAGES = (2, 3, 4)
PIECE_LENGTHS = (128, 256, 512)
TUNED = ("PIECE_ROWS", "PIECE_BLOCK_R", "PIECE_BLOCK_D", "PIECE_WARPS", "PIECE_STAGES")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"]
    )
    p.add_argument("--examples", type=int, default=8192, help="examples x 256 rows (default 8192: 2M rows)")
    p.add_argument("--rows-per-example", type=int, default=256)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="a handful of configurations (a rehearsal)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def apply_config(config: dict) -> None:
    """Set the deterministic kernel's launch constants (only the names in TUNED)."""
    for name, value in config.items():
        if name not in TUNED:
            raise KeyError(f"{name} is not a tuned constant of ascent_triton ({', '.join(TUNED)})")
        setattr(ascent_triton, name, value)


def piece_config(kernel: tuple[int, int, int], **extra) -> dict:
    block_r, block_d, warps = kernel
    return {"PIECE_BLOCK_R": block_r, "PIECE_BLOCK_D": block_d, "PIECE_WARPS": warps, **extra}


def memory_probes(rows: torch.Tensor, perm: torch.Tensor, device: str, repeats: int) -> dict:
    """GB/s (bytes read + written) of a contiguous copy of the rows and of their token-sorted gather."""
    out = torch.empty_like(rows)
    moved = 2 * rows.numel() * rows.element_size()
    copy_ms = median_ms(lambda: out.copy_(rows), repeats, device)
    gather_ms = median_ms(lambda: torch.index_select(rows, 0, perm, out=out), repeats, device)
    return {"rows_bytes": moved // 2, "copy_ms": copy_ms, "copy_gbps": moved / copy_ms / 1e6,
            "sorted_gather_ms": gather_ms, "sorted_gather_gbps": moved / gather_ms / 1e6}


def profile_breakdown(fn, device: str, top: int = 12) -> list[dict]:
    """Device time per kernel / op over 3 calls of fn (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            fn()
        sync(device)
    rows = []
    for ev in prof.key_averages():
        device_us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        self_device_us = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
        if device == "cuda" and not self_device_us:
            continue
        rows.append(
            {
                "name": ev.key[:80],
                "calls_per_run": ev.count / 3,
                "self_device_ms_per_run": self_device_us / 3e3,
                "device_ms_per_run": device_us / 3e3,
                "cpu_ms_per_run": ev.cpu_time_total / 3e3,
            }
        )
    key = "self_device_ms_per_run" if device == "cuda" else "cpu_ms_per_run"
    return sorted(rows, key=lambda r: -r[key])[:top]


class _Terminated(BaseException):
    """SIGTERM (e.g. from `timeout`): stop measuring, keep what was measured."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv=None) -> None:
    args = parse_args(argv)
    device = args.device
    V, D, per_example = args.vocab, args.dim, args.rows_per_example
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ascent_tuning_{device_slug(device)}.json"
    defaults = {name: getattr(ascent_triton, name) for name in TUNED}

    offsets, token_ids, rows, lr = zipf_batch(args.examples, per_example, V, D, torch.bfloat16, device, args.seed)
    torch.manual_seed(args.seed)
    W0 = torch.randn(V, D, device=device) * 0.02
    W_ref = W0.clone()
    ref_scores = ascent_score(W_ref, offsets, token_ids, rows, lr, backend="reference")
    _, sort_perm = torch.sort(token_ids.to(torch.int32), stable=True)
    sorted_ids, sorted_rows = token_ids[sort_perm], rows[sort_perm]
    bandwidth = copy_bandwidth_gbps(device, 5)
    floor_ms = floor_bytes(offsets, token_ids, rows, lr, W0, None) / (bandwidth * 1e9) * 1e3
    report = {
        "benchmark": "ascent_tuning",
        "device": card_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "python": platform.python_version(),
        "rows": rows.shape[0],
        "examples": args.examples,
        "workload": f"Zipf(1) ids, D={D}, V={V}, bf16 rows, fp32 W, Q = W",
        "copy_bandwidth_gbps": bandwidth,
        "floor_ms": floor_ms,
        "defaults": defaults,
        "memory": None,
        "results": [],
        "best": None,
        "breakdown": None,
        "complete": False,
    }

    def save() -> None:
        ok = [r for r in report["results"] if "ms" in r and r["input"] == "zipf"]
        if ok:
            fastest = min(ok, key=lambda r: r["ms"])
            report["best"] = {"config": fastest["config"], "ms": fastest["ms"],
                              "pct_of_floor": fastest["pct_of_floor"]}
        path.write_text(json.dumps(report, indent=2) + "\n")

    def measure(config: dict, presorted: bool = False) -> float | None:
        apply_config({**defaults, **config})
        row = {"config": {**defaults, **config}, "input": "presorted" if presorted else "zipf"}
        tok, x = (sorted_ids, sorted_rows) if presorted else (token_ids, rows)
        try:
            if not presorted:  # the error is checked on the real input; presorted rows are only timed
                W = W0.clone()
                scores = ascent_score(W, offsets, tok, x, lr, backend="triton")
                sync(device)
                row["max_abs_err_w"] = (W.double() - W_ref.double()).abs().max().item()
                row["max_abs_err_scores"] = (scores.double() - ref_scores.double()).abs().max().item()
            W = W0.clone()
            ms = median_ms(lambda: ascent_score(W, offsets, tok, x, lr, backend="triton"), args.repeats, device)
            row.update(ms=ms, pct_of_floor=100 * floor_ms / ms)
        except Exception as exc:  # a configuration that does not compile (registers, shared memory)
            row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        report["results"].append(row)
        save()
        status = f"{row['ms']:8.3f} ms {row['pct_of_floor']:5.1f}% floor" if "ms" in row else row["error"][:80]
        print(f"{status}  {'presorted ' if presorted else ''}{row['config']}", flush=True)
        return row.get("ms")

    signal.signal(signal.SIGTERM, _on_sigterm)
    print(f"{card_name(device)}: {rows.shape[0]} rows, floor {floor_ms:.3f} ms at {bandwidth:.0f} GB/s", flush=True)
    try:
        report["memory"] = memory_probes(rows, sort_perm, device, args.repeats)
        print(f"rows: copy {report['memory']['copy_gbps']:.0f} GB/s, "
              f"token-sorted gather {report['memory']['sorted_gather_gbps']:.0f} GB/s", flush=True)
        pieces = PIECE_KERNELS[:2] if args.quick else PIECE_KERNELS
        timed = {k: measure(piece_config(k)) for k in pieces}
        if all(ms is None for ms in timed.values()):
            raise RuntimeError("no configuration ran; see the errors above")
        best = min((k for k in timed if timed[k] is not None), key=lambda k: timed[k])
        for stages in PIECE_STAGES[1:2] if args.quick else PIECE_STAGES:
            if stages != defaults["PIECE_STAGES"]:
                measure(piece_config(best, PIECE_STAGES=stages))
        for rows_per_piece in PIECE_LENGTHS[:1] if args.quick else PIECE_LENGTHS:
            if rows_per_piece != defaults["PIECE_ROWS"]:
                measure({**report["best"]["config"], "PIECE_ROWS": rows_per_piece})
        measure(report["best"]["config"], presorted=True)

        apply_config(report["best"]["config"])
        W = W0.clone()
        try:
            report["breakdown"] = profile_breakdown(
                lambda: ascent_score(W, offsets, token_ids, rows, lr, backend="triton"), device)
        except Exception as exc:  # the profiler is a nicety; the sweep is the result
            report["breakdown"] = [{"error": f"{type(exc).__name__}: {exc}"[:300]}]
        for r in report["breakdown"]:
            if "error" in r:
                print(f"  no breakdown: {r['error']}")
            else:
                print(f"  {r['self_device_ms_per_run']:8.3f} ms device {r['cpu_ms_per_run']:8.3f} ms cpu"
                      f"  {r['calls_per_run']:4.1f} calls  {r['name']}")
        report["complete"] = True
    except (_Terminated, KeyboardInterrupt):
        print("interrupted: writing what was measured", file=sys.stderr)
    save()
    print(f"best: {report['best']}\nwrote {path}")


if __name__ == "__main__":
    main()
