"""What every benchmark script records about the machine it ran on, and how it names its result files.

Imported by the scripts beside it (run as `python benchmarks/<script>.py`, so this directory is on sys.path).
"""

from __future__ import annotations

import contextlib
import platform
import re
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
