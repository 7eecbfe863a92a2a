"""What every benchmark script records about the machine it ran on, and how it names its result files.

Imported by the scripts beside it (run as `python benchmarks/<script>.py`, so this directory is on sys.path).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import time
from pathlib import Path

import torch


def card_name(device: str) -> str:
    """The GPU's name on "cuda"; on the CPU, its model (Linux) or whatever `platform` knows."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: str) -> str:
    """The device part of a result file's name: "cpu", or the card's name in lower case, e.g. "nvidia-h200"."""
    return "cpu" if device == "cpu" else re.sub(r"[^a-z0-9]+", "-", card_name(device).lower()).strip("-")


RESULTS = Path(__file__).resolve().parent / "results"


def demo_benchmark_parser(doc: str, result: str) -> argparse.ArgumentParser:
    """The options every CPU benchmark on the demo's setting shares: `--seed` and `--out` (default
    benchmarks/results/`result`). `doc`: the script's docstring, whose first paragraph describes it."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / result)
    return p


def cpu_model() -> str:
    """The CPU's model name, family/model numbers and widest vector extension (Linux; else what platform says).
    Recorded because the same training run gives a slightly different model on another CPU (the math library
    takes other code paths), and every engine figure follows the trained model."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if ":" in line)
    except OSError:
        return platform.processor() or "unknown"
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = fields.get("flags", "").split()
    vector = next((f for f in ("avx512f", "avx2", "avx") if f in flags), "none")
    return (f"{fields.get('model name', 'unknown')} (family {fields.get('cpu family', '?')}, model "
            f"{fields.get('model', '?')}, {vector})")


def save_cpu_result(out: Path, benchmark: str, setup: str, started: float, **payload: object) -> dict:
    """Write a CPU benchmark's result JSON to `out` (with the machine, versions, setup and its wall time) and say so."""
    result = {"benchmark": benchmark, "machine": f"{os.cpu_count()}-core CPU", "cpu": cpu_model(),
              "python": platform.python_version(), "torch": torch.__version__, "setup": setup, **payload,
              "seconds": round(time.perf_counter() - started, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.name} ({result['seconds']:.0f} s)")
    return result
