"""Throughput of `ascent_score` against the memory floor: table, JSON and PNG.

    python benchmarks/kernel_throughput.py                      # CUDA: 16k, 262k, 2M rows
    python benchmarks/kernel_throughput.py --device cpu         # CPU: small sizes, torch only

Workload (the issue's): n examples x 256 rows, D = 768, V = 50257, Zipf(1) token ids (the
hottest token owns ~9% of the rows), bf16 rows into a float32 W, per-example lr, and
Q = None (scores against W before the update). Providers:

    torch_eager     the torch reference (`backend="reference"`)
    torch_compile   torch.compile of the reference
    triton_det      Triton, deterministic (sort + segment), the default
    triton_atomic   Triton, float32 atomics (opt-in)

Every provider goes through the public API, so input checks and (for triton_det) the sort
are included. The floor is the time to move every byte once -- rows, ids, offsets, lr,
scores, and each touched row of W read and written (and of Q read, if separate) -- at the
device-to-device copy bandwidth measured in the same run. "err" columns are the max abs
difference from the reference (W after one update, and the scores) on fresh copies of W.
"""

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_device import card_name, device_slug

from gradstore_kernels import ascent_score
from gradstore_kernels.ascent import ascent_score_reference
from gradstore_kernels.checks import check_sparse_rows

PROVIDERS = ("torch_eager", "torch_compile", "triton_det", "triton_atomic")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="examples per batch (x --rows-per-example rows); default 64 1024 8192 on CUDA, 4 16 on CPU")
    p.add_argument("--rows-per-example", type=int, default=256)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--rows-dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--w-dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--separate-q", action="store_true", help="score against a separate fp32 Q instead of W")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per provider (default 20 CUDA, 3 CPU)")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--name", default=None, help="output file stem (default from the device)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--tuning", type=Path, default=None,
                   help="an ascent_tuning JSON: run the Triton kernels with its best configuration")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only (the plot can be drawn later)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available; use --device cpu")
    args.sizes = args.sizes or ([64, 1024, 8192] if cuda else [4, 16])
    args.repeats = args.repeats or (20 if cuda else 3)
    return args


# ----------------------------------------------------------------------------- workload

def zipf_batch(n: int, rows_per_example: int, V: int, D: int, rows_dtype, device, seed: int):
    """CSR batch with Zipf(1) token ids (ranks mapped to ids by a fixed permutation)."""
    g = torch.Generator(device=device).manual_seed(seed)
    R = n * rows_per_example
    weights = 1.0 / torch.arange(1, V + 1, device=device, dtype=torch.float64)
    cdf = torch.cumsum(weights / weights.sum(), 0)
    ranks = torch.searchsorted(cdf, torch.rand(R, device=device, dtype=torch.float64, generator=g))
    token_ids = torch.randperm(V, device=device, generator=g)[ranks.clamp_(max=V - 1)].to(torch.int32)
    offsets = torch.arange(0, R + 1, rows_per_example, device=device, dtype=torch.int64)
    rows = (torch.randn(R, D, device=device, generator=g) * 1e-2).to(rows_dtype)
    lr = torch.full((n,), 1e-3, device=device)
    return offsets, token_ids, rows, lr


def floor_bytes(offsets, token_ids, rows, lr, W, Q) -> int:
    touched = torch.unique(token_ids).numel()
    D = rows.shape[1]
    moved = rows.numel() * rows.element_size() + token_ids.numel() * token_ids.element_size()
    moved += offsets.numel() * offsets.element_size() + lr.numel() * 4 + lr.numel() * 4  # lr in, scores out
    moved += 2 * touched * D * W.element_size()  # each touched row of W read once and written once
    if Q is not None:
        moved += touched * D * Q.element_size()
    return moved


# ----------------------------------------------------------------------------- timing

def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, repeats: int, device: str, warmup: int = 2) -> float:
    for _ in range(warmup):  # compiles Triton kernels / torch.compile graphs, fills the allocator
        fn()
    sync(device)
    # On CUDA, evict L2 between runs so small batches are not served from cache.
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device) if device == "cuda" else None
    times = []
    for _ in range(repeats):
        if device == "cuda":
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbps(device: str, repeats: int) -> float:
    """Device-to-device copy bandwidth, counting the read and the write."""
    n_bytes = (1 << 30) if device == "cuda" else (256 << 20)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), max(repeats, 5), device)
    return 2 * n_bytes / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------- providers

def triton_runnable(device: str) -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def make_provider(name: str, offsets, token_ids, rows, lr, Q):
    if name == "torch_eager":
        return lambda W: ascent_score(W, offsets, token_ids, rows, lr, Q, backend="reference")
    if name == "torch_compile":
        compiled = torch.compile(ascent_score_reference)

        def run(W):
            batch, lr32 = check_sparse_rows(offsets, token_ids, rows, None, vocab_size=W.shape[0],
                                            dim=W.shape[1], device=W.device, lr=lr)
            return compiled(W, Q, batch, lr32)

        return run
    deterministic = name == "triton_det"
    return lambda W: ascent_score(W, offsets, token_ids, rows, lr, Q, backend="triton", deterministic=deterministic)


def run(args: argparse.Namespace, on_progress=None) -> dict:
    """The report; `on_progress(report)` is called after every (size, provider) row, with the rows so far."""
    device = args.device
    V, D = args.vocab, args.dim
    rows_dtype, w_dtype = DTYPES[args.rows_dtype], DTYPES[args.w_dtype]
    providers = [p for p in args.providers if not p.startswith("triton") or triton_runnable(device)]
    skipped = sorted(set(args.providers) - set(providers))
    if skipped:
        print(f"skipping {', '.join(skipped)}: Triton needs CUDA (or TRITON_INTERPRET=1 on CPU)", file=sys.stderr)

    bandwidth = copy_bandwidth_gbps(device, args.repeats)
    print(f"{card_name(device)}: device-to-device copy {bandwidth:.0f} GB/s", file=sys.stderr)
    torch.manual_seed(args.seed)
    W0 = (torch.randn(V, D, device=device) * 0.02).to(w_dtype)
    Q = torch.randn(V, D, device=device) * 0.02 if args.separate_q else None
    results = []
    report = {
        "device": card_name(device),
        "device_type": device,
        "torch": torch.__version__,
        "triton": triton_version(),
        "python": platform.python_version(),
        "copy_bandwidth_gbps": bandwidth,
        "config": {
            "vocab": V, "dim": D, "rows_per_example": args.rows_per_example, "rows_dtype": args.rows_dtype,
            "w_dtype": args.w_dtype, "q": "separate fp32" if args.separate_q else "W (aliased)",
            "token_ids": "Zipf(1)", "repeats": args.repeats, "statistic": "median",
            "cpu_threads": torch.get_num_threads(),
            "deterministic_kernel": deterministic_kernel_config(),
        },
        "skipped_providers": skipped,
        "complete": False,
        "results": results,
    }
    for n in args.sizes:
        offsets, token_ids, rows, lr = zipf_batch(n, args.rows_per_example, V, D, rows_dtype, device, args.seed)
        R = rows.shape[0]
        moved = floor_bytes(offsets, token_ids, rows, lr, W0, Q)
        floor_ms = moved / (bandwidth * 1e9) * 1e3
        W_ref = W0.clone()
        ref_scores = ascent_score(W_ref, offsets, token_ids, rows, lr, Q, backend="reference")
        eager_ms = None
        for name in providers:
            fn = make_provider(name, offsets, token_ids, rows, lr, Q)
            row = {"rows": R, "examples": n, "provider": name, "floor_ms": floor_ms, "floor_bytes": moved}
            try:
                W_check = W0.clone()
                scores = fn(W_check)
                sync(device)
                row["max_abs_err_w"] = (W_check.double() - W_ref.double()).abs().max().item()
                row["max_abs_err_scores"] = (scores.double() - ref_scores.double()).abs().max().item()
                W_bench = W0.clone()  # timed runs keep updating this copy
                ms = median_ms(lambda fn=fn, W=W_bench: fn(W), args.repeats, device)
            except Exception as exc:  # e.g. torch.compile without a working compiler
                row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                print(f"{name} @ {R} rows failed: {row['error']}", file=sys.stderr)
                results.append(row)
                if on_progress is not None:
                    on_progress(report)
                continue
            eager_ms = ms if name == "torch_eager" else eager_ms
            row.update(
                ms=ms,
                gbps=moved / (ms * 1e-3) / 1e9,
                pct_of_floor=100.0 * floor_ms / ms,
                speedup_vs_eager=None if eager_ms is None else eager_ms / ms,
            )
            results.append(row)
            if on_progress is not None:
                on_progress(report)
            del W_check, W_bench
    report["complete"] = True
    return report


def deterministic_kernel_config() -> dict | None:
    """The launch constants the deterministic Triton kernel ran with (None without Triton)."""
    try:
        from ascent_tuning import TUNED

        from gradstore_kernels import ascent_triton
    except ImportError:
        return None
    return {name: getattr(ascent_triton, name) for name in TUNED}


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


# ----------------------------------------------------------------------------- reporting

def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(report: dict) -> str:
    head = f"{'rows':>9} {'provider':<14} {'ms':>9} {'GB/s':>8} {'% floor':>8} {'x eager':>8} {'err W':>9} {'err scores':>10}"
    lines = [
        f"{report['device']} ({report['device_type']}), torch {report['torch']}, triton {report['triton']}, "
        f"copy {report['copy_bandwidth_gbps']:.0f} GB/s",
        head,
        "-" * len(head),
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"{r['rows']:>9} {r['provider']:<14} failed: {r['error'][:60]}")
            continue
        lines.append(
            f"{r['rows']:>9} {r['provider']:<14} {r['ms']:>9.3f} {r['gbps']:>8.1f} {r['pct_of_floor']:>7.1f}% "
            f"{_fmt(r['speedup_vs_eager'], '>7.1f')}x {r['max_abs_err_w']:>9.1e} {r['max_abs_err_scores']:>10.1e}"
        )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["results"] if "error" not in r]
    fig, (ax_ms, ax_pct) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in PROVIDERS:
        pts = sorted((r["rows"], r["ms"], r["pct_of_floor"]) for r in ok if r["provider"] == name)
        if pts:
            xs, ms, pct = zip(*pts, strict=True)
            ax_ms.plot(xs, ms, marker="o", label=name)
            ax_pct.plot(xs, pct, marker="o", label=name)
    floors = sorted({(r["rows"], r["floor_ms"]) for r in ok})
    if floors:
        xs, fl = zip(*floors, strict=True)
        ax_ms.plot(xs, fl, "k--", label="memory floor")
    ax_pct.axhline(70, color="grey", ls=":", label="target 70%")
    for ax in (ax_ms, ax_pct):
        ax.set_xscale("log")
        ax.set_xlabel("rows (examples x 256)")
        ax.grid(True, which="both", alpha=0.3)
    ax_ms.set_yscale("log")
    ax_ms.set_ylabel("ms (median)")
    ax_pct.set_ylabel("% of memory floor")
    ax_pct.legend(fontsize=8)
    ax_ms.legend(fontsize=8)
    c = report["config"]
    fig.suptitle(
        f"ascent_score on {report['device']}: D={c['dim']}, V={c['vocab']}, {c['rows_dtype']} rows, "
        f"{c['w_dtype']} W, Q = {c['q']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class _Terminated(BaseException):
    """SIGTERM (e.g. from `timeout`): stop measuring, keep what was measured."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tuning is not None:
        from ascent_tuning import apply_config

        best = json.loads(args.tuning.read_text()).get("best")
        if best is None:  # the sweep measured nothing (cut short, or every configuration failed)
            print(f"{args.tuning} names no best configuration: running with the defaults", file=sys.stderr)
        else:
            apply_config(best["config"])
    stem = args.name or f"kernel_throughput_{device_slug(args.device)}"
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / f"{stem}.json", args.out / f"{stem}.png"
    latest: dict = {}

    def save(report: dict) -> None:  # after every row, so a run cut short still leaves its rows
        latest["report"] = report
        json_path.write_text(json.dumps(report, indent=2) + "\n")

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        report = run(args, on_progress=save)
    except (_Terminated, KeyboardInterrupt):
        if "report" not in latest:
            raise
        report = latest["report"]
        print("interrupted: writing the rows measured so far", file=sys.stderr)
    save(report)
    print(table(report))
    if args.no_plot:
        print(f"wrote {json_path}", file=sys.stderr)
    else:
        try:
            plot(report, png_path)
        except ImportError as exc:  # matplotlib is optional: the JSON and the table are the results
            print(f"no plot ({exc}); wrote {json_path}", file=sys.stderr)
        else:
            print(f"wrote {json_path} and {png_path}", file=sys.stderr)
    if not report["complete"]:
        sys.exit(124)


if __name__ == "__main__":
    main()
