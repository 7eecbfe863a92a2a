"""Errors raised before any kernel launches.

Input problems are `ValueError`s (dtype problems are also `TypeError`s), so callers that
already catch the builtin exceptions keep working; a missing backend is a `RuntimeError`.
"""


class KernelInputError(ValueError):
    """An input is malformed: a shape, a value (token id, offsets, lr) or a device mismatch."""


class KernelDtypeError(KernelInputError, TypeError):
    """An input has a dtype the op does not accept."""


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (no Triton, or CPU tensors without the interpreter)."""
