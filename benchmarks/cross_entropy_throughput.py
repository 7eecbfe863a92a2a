"""Throughput of `token_cross_entropy` against reading the logits once: table and JSON.

    python benchmarks/cross_entropy_throughput.py                  # CUDA: [8192, 50257] bf16 (GPT-2, 16 x 512)
    python benchmarks/cross_entropy_throughput.py --device cpu     # CPU: a tiny shape, torch providers only

Workload: the per-position loss `GradientCapture` records, logits [N, V] (random normal x 4) and one target
per row, every 64th row ignored (-100). Providers:

    torch_logsumexp   what capture did before: torch.logsumexp + gather in the logits' dtype
    reference         `token_cross_entropy(backend="reference")`: float32 chunks, logsumexp + gather
    f_cross_entropy   F.cross_entropy(logits.float(), targets, reduction="none")
    triton            `token_cross_entropy(backend="triton")`, the default launch configuration
    triton[wW,lL]     (CUDA, unless --no-sweep) W warps, L 16-byte loads per thread per chunk

Bytes are the logits read once (N x V x itemsize); GB/s is those bytes over the median time, and "% copy"
compares it with the device-to-device copy bandwidth (read + write) measured in the same run. "err" is
the max abs difference from f_cross_entropy (float32 logits: the specification).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_device import card_name, device_slug
from kernel_throughput import (  # the script beside this one (its directory is on sys.path)
    DTYPES,
    copy_bandwidth_gbps,
    median_ms,
    sync,
    triton_runnable,
    triton_version,
)

from gradstore_kernels import token_cross_entropy

IGNORE = -100
SWEEP = [(w, loads) for w in (4, 8, 16) for loads in (1, 2, 4)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--rows", type=int, default=None, help="N (default 8192 on CUDA, 64 on CPU)")
    p.add_argument("--vocab", type=int, default=None, help="V (default 50257 on CUDA, 1000 on CPU)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per provider (default 20 CUDA, 3 CPU)")
    p.add_argument("--no-sweep", action="store_true", help="time only the default Triton launch configuration")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available; use --device cpu")
    args.rows = args.rows or (8192 if cuda else 64)
    args.vocab = args.vocab or (50257 if cuda else 1000)
    args.repeats = args.repeats or (20 if cuda else 3)
    return args


def logsumexp_gather(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The capture's previous per-position loss, in the logits' own dtype."""
    valid = targets != IGNORE
    target_logit = logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1).float()
    return (torch.logsumexp(logits, dim=1).float() - target_logit) * valid


def providers(device: str, sweep: bool) -> dict:
    fns = {
        "torch_logsumexp": logsumexp_gather,
        "reference": lambda x, t: token_cross_entropy(x, t, check_targets=False, backend="reference"),
        "f_cross_entropy": lambda x, t: F.cross_entropy(x.float(), t, reduction="none", ignore_index=IGNORE),
    }
    if not triton_runnable(device):
        print("skipping triton: it needs CUDA (or TRITON_INTERPRET=1 on CPU)", file=sys.stderr)
        return fns
    from gradstore_kernels import cross_entropy_triton as ct

    def triton_with(num_warps: int | None = None, loads: int | None = None):
        def run(x, t):
            saved = ct.NUM_WARPS, ct.LOADS_PER_THREAD
            ct.NUM_WARPS, ct.LOADS_PER_THREAD = num_warps or saved[0], loads or saved[1]
            try:
                return token_cross_entropy(x, t, check_targets=False, backend="triton")
            finally:
                ct.NUM_WARPS, ct.LOADS_PER_THREAD = saved

        return run

    fns["triton"] = triton_with()
    if sweep and device == "cuda":
        for w, loads in SWEEP:
            fns[f"triton[w{w},l{loads}]"] = triton_with(w, loads)
    return fns


def run(args: argparse.Namespace) -> dict:
    device, N, V, dtype = args.device, args.rows, args.vocab, DTYPES[args.dtype]
    bandwidth = copy_bandwidth_gbps(device, args.repeats)
    print(f"{card_name(device)}: device-to-device copy {bandwidth:.0f} GB/s", file=sys.stderr)
    g = torch.Generator(device=device).manual_seed(args.seed)
    logits = (torch.randn(N, V, device=device, generator=g) * 4).to(dtype)
    targets = torch.randint(0, V, (N,), device=device, generator=g)
    targets[::64] = IGNORE
    moved = logits.numel() * logits.element_size()
    want = F.cross_entropy(logits.float(), targets, reduction="none", ignore_index=IGNORE)
    results = []
    for name, fn in providers(device, not args.no_sweep).items():
        row = {"provider": name}
        try:
            got = fn(logits, targets)
            sync(device)
            row["max_abs_err"] = (got.double() - want.double()).abs().max().item()
            ms = median_ms(lambda fn=fn: fn(logits, targets), args.repeats, device)
        except Exception as exc:  # e.g. out of memory for a float32 copy
            row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            print(f"{name} failed: {row['error']}", file=sys.stderr)
        else:
            gbps = moved / (ms * 1e-3) / 1e9
            row.update(ms=ms, gbps=gbps, pct_of_copy=100.0 * gbps / bandwidth)
        results.append(row)
    return {
        "device": card_name(device),
        "device_type": device,
        "torch": torch.__version__,
        "triton": triton_version(),
        "copy_bandwidth_gbps": bandwidth,
        "config": {"rows": N, "vocab": V, "dtype": args.dtype, "ignored_rows": "every 64th",
                   "bytes_read": moved, "repeats": args.repeats, "statistic": "median"},
        "results": results,
    }


def table(report: dict) -> str:
    c = report["config"]
    head = f"{'provider':<18} {'ms':>9} {'GB/s':>8} {'% copy':>7} {'err':>9}"
    lines = [
        f"{report['device']}: [{c['rows']}, {c['vocab']}] {c['dtype']}, {c['bytes_read'] / 1e6:.4g} MB read, "
        f"copy {report['copy_bandwidth_gbps']:.0f} GB/s",
        head,
        "-" * len(head),
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"{r['provider']:<18} failed: {r['error'][:60]}")
        else:
            lines.append(f"{r['provider']:<18} {r['ms']:>9.3f} {r['gbps']:>8.1f} {r['pct_of_copy']:>6.1f}% "
                         f"{r['max_abs_err']:>9.1e}")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    report = run(args)
    stem = f"cross_entropy_{device_slug(args.device)}"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stem}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
