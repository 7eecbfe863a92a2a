"""Which implementation runs an op: Triton on CUDA, the torch reference everywhere else.

`triton.jit` decides interpret-vs-compile when a kernel is decorated, i.e. when the
`*_triton` modules are first imported, from the `TRITON_INTERPRET` environment variable.
Those modules are imported lazily (Triton is Linux-only), so the reference path works
on any platform, and the interpreter can be switched on before the first Triton launch.
"""

import functools
import logging

import torch

from .errors import BackendUnavailableError

log = logging.getLogger("gradstore_kernels")

BACKENDS = ("auto", "triton", "reference")

_announced: set[tuple[str, str]] = set()


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # Triton ships for Linux only
        return str(exc)
    return None


def triton_interpreted() -> bool:
    """Whether the Triton kernels were decorated under `TRITON_INTERPRET=1` (imports them)."""
    from . import scoring_triton

    return scoring_triton.INTERPRETED


def resolve_backend(backend: str, device: torch.device) -> str:
    """Return "triton" or "reference" for tensors on `device`, or raise if `backend` cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    missing = _triton_import_error()
    if backend == "triton":
        if missing is not None:
            raise BackendUnavailableError(f"backend='triton' needs the triton package: {missing}")
        if device.type != "cuda" and not triton_interpreted():
            raise BackendUnavailableError(
                f"backend='triton' needs CUDA tensors (got {device.type}); on CPU set "
                "TRITON_INTERPRET=1 before gradstore_kernels first launches a Triton kernel"
            )
        return "triton"
    choice = "triton" if device.type == "cuda" and missing is None else "reference"
    if (choice, device.type) not in _announced:
        _announced.add((choice, device.type))
        why = "CUDA tensors" if choice == "triton" else (
            f"{device.type} tensors" if missing is None else f"triton unavailable ({missing})"
        )
        log.info("gradstore_kernels: backend='auto' uses %s (%s)", choice, why)
    return choice
