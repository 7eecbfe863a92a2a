"""Checks every op runs before it launches anything, with errors that name the problem.

The value checks (token range, monotone offsets, finite lr) need the data, so on CUDA
they cost one device-to-host sync; all of them are fetched together in that one sync,
and only when a check fails is the offending index looked up for the message.
"""

import math
import numbers
from dataclasses import dataclass

import torch

from .errors import KernelDtypeError, KernelInputError

ROW_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class SparseRows:
    """A validated CSR batch of stored gradients.

    offsets:   int64 [n + 1], contiguous; example e owns rows offsets[e]:offsets[e + 1].
    token_ids: int32 or int64 [R], contiguous, every id in [0, V).
    rows:      float32 / bfloat16 / float16 / int8 [R, D], any strides.
    scales:    float32 [R], contiguous, iff rows are int8 (row = rows.float() * scales[:, None]).
    """

    offsets: torch.Tensor
    token_ids: torch.Tensor
    rows: torch.Tensor
    scales: torch.Tensor | None

    @property
    def n(self) -> int:
        return self.offsets.numel() - 1

    @property
    def R(self) -> int:
        return self.rows.shape[0]

    @property
    def D(self) -> int:
        return self.rows.shape[1]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _require_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise KernelDtypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _require_dtype(name: str, x: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if x.dtype not in allowed:
        names = ", ".join(_dtype_name(d) for d in allowed)
        raise KernelDtypeError(f"{name} has dtype {_dtype_name(x.dtype)}; expected one of {names}")


def _require_device(name: str, x: torch.Tensor, device: torch.device) -> None:
    if x.device != device:
        raise KernelInputError(f"{name} is on {x.device} but the other inputs are on {device}")


def check_matrix(name: str, M, *, dtypes: tuple[torch.dtype, ...] | None = None) -> torch.Tensor:
    """A dense [V, D] matrix (W or Q): 2-D, floating (or one of `dtypes`); any strides."""
    M = _require_tensor(name, M)
    if M.dim() != 2:
        raise KernelInputError(f"{name} must be 2-D [V, D], got shape {tuple(M.shape)}")
    if dtypes is not None:
        _require_dtype(name, M, dtypes)
    elif not M.is_floating_point():
        raise KernelDtypeError(f"{name} must be a floating-point tensor, got {_dtype_name(M.dtype)}")
    return M


def check_sparse_rows(
    offsets,
    token_ids,
    rows,
    scales,
    *,
    vocab_size: int,
    dim: int,
    device: torch.device,
    lr=None,
) -> tuple[SparseRows, torch.Tensor | None]:
    """Validate and normalise one CSR batch (and `lr`, if given) against a [vocab_size, dim] matrix.

    Returns the batch with contiguous int64 offsets / contiguous token ids and scales, and
    `lr` as contiguous float32 [n] (a Python float is broadcast to every example).
    """
    offsets = _require_tensor("offsets", offsets)
    token_ids = _require_tensor("token_ids", token_ids)
    rows = _require_tensor("rows", rows)

    if offsets.dim() != 1 or offsets.numel() < 1:
        raise KernelInputError(f"offsets must be 1-D [n + 1] with n >= 0, got shape {tuple(offsets.shape)}")
    _require_dtype("offsets", offsets, INDEX_DTYPES)
    if token_ids.dim() != 1:
        raise KernelInputError(f"token_ids must be 1-D [R], got shape {tuple(token_ids.shape)}")
    _require_dtype("token_ids", token_ids, INDEX_DTYPES)
    if rows.dim() != 2:
        raise KernelInputError(f"rows must be 2-D [R, D], got shape {tuple(rows.shape)}")
    _require_dtype("rows", rows, ROW_DTYPES)
    R = rows.shape[0]
    if token_ids.numel() != R:
        raise KernelInputError(f"token_ids has {token_ids.numel()} entries but rows has {R} rows")
    if rows.shape[1] != dim:
        raise KernelInputError(f"rows.shape[1] = {rows.shape[1]} does not match the matrix dim D = {dim}")

    if rows.dtype == torch.int8:
        if scales is None:
            raise KernelInputError("int8 rows need scales (float32 [R]): row = rows.float() * scales[:, None]")
        scales = _require_tensor("scales", scales)
        if scales.shape != (R,):
            raise KernelInputError(f"scales must have shape ({R},), got {tuple(scales.shape)}")
        if not scales.is_floating_point():
            raise KernelDtypeError(f"scales must be floating point, got {_dtype_name(scales.dtype)}")
        _require_device("scales", scales, device)
        scales = scales.to(torch.float32).contiguous()
    elif scales is not None:
        raise KernelInputError(f"scales are only for int8 rows; rows are {_dtype_name(rows.dtype)}")

    for name, x in (("offsets", offsets), ("token_ids", token_ids), ("rows", rows)):
        _require_device(name, x, device)

    n = offsets.numel() - 1
    lr_tensor = None if lr is None else _normalise_lr(lr, n, device)

    offsets = offsets.to(torch.int64).contiguous()
    token_ids = token_ids.contiguous()
    _check_values(offsets, token_ids, R, vocab_size, lr_tensor, scales)
    return SparseRows(offsets, token_ids, rows, scales), lr_tensor


def _normalise_lr(lr, n: int, device: torch.device) -> torch.Tensor:
    if isinstance(lr, torch.Tensor):
        if not lr.is_floating_point():
            raise KernelDtypeError(f"lr must be a floating-point tensor, got {_dtype_name(lr.dtype)}")
        _require_device("lr", lr, device)
        if lr.dim() == 0:
            lr = lr.expand(n)
        if lr.shape != (n,):
            raise KernelInputError(f"lr must be a float or a tensor of shape ({n},), got {tuple(lr.shape)}")
        # Finiteness is checked after the cast: the kernels use the float32 value.
        return lr.to(torch.float32).contiguous()
    if isinstance(lr, numbers.Real) and not isinstance(lr, bool):
        value = float(lr)
        if not math.isfinite(value) or abs(value) > torch.finfo(torch.float32).max:
            raise KernelInputError(f"lr = {lr} is not finite (in float32)")
        return torch.full((n,), value, dtype=torch.float32, device=device)
    raise KernelDtypeError(f"lr must be a float or a float tensor, got {type(lr).__name__}")


def _check_values(
    offsets: torch.Tensor,
    token_ids: torch.Tensor,
    R: int,
    vocab_size: int,
    lr: torch.Tensor | None,
    scales: torch.Tensor | None = None,
) -> None:
    # Everything that needs the data goes through one stacked tensor: one sync on CUDA. The rows themselves
    # are not checked for finiteness: that would read them a second time, and they are the op's main
    # traffic. (Stored rows are finite: capture refuses non-finite rows, and every chunk is checksummed.)
    # The int8 scales are [R] floats, a small fraction of it: a NaN, infinite or negative scale is caught.
    probes = [offsets[0], offsets[-1], (offsets[1:] < offsets[:-1]).any()]
    if R:
        probes += list(torch.aminmax(token_ids))
    if scales is not None and R:
        probes.append((~torch.isfinite(scales) | (scales < 0)).any())
    if lr is not None and lr.numel():
        probes.append((~torch.isfinite(lr)).any())
    values = torch.stack([p.to(torch.int64) for p in probes]).tolist()
    first, last, not_monotone = values[:3]

    if first != 0:
        raise KernelInputError(f"offsets[0] must be 0, got {first}")
    if not_monotone:
        i = int(torch.nonzero(offsets[1:] < offsets[:-1])[0])
        raise KernelInputError(
            f"offsets must be non-decreasing: offsets[{i}] = {int(offsets[i])} > offsets[{i + 1}] = {int(offsets[i + 1])}"
        )
    if last != R:
        raise KernelInputError(f"offsets[-1] must equal the number of rows R = {R}, got {last}")
    if R:
        lo, hi = values[3:5]
        if lo < 0 or hi >= vocab_size:
            bad = (token_ids < 0) | (token_ids >= vocab_size)
            i = int(torch.nonzero(bad)[0])
            raise KernelInputError(
                f"token_ids[{i}] = {int(token_ids[i])} is out of range [0, {vocab_size})"
            )
    if scales is not None and R and values[5]:
        bad = ~torch.isfinite(scales) | (scales < 0)
        i = int(torch.nonzero(bad)[0])
        raise KernelInputError(f"scales[{i}] = {float(scales[i])} is not a finite non-negative scale")
    if lr is not None and lr.numel() and values[-1]:
        i = int(torch.nonzero(~torch.isfinite(lr))[0])
        raise KernelInputError(f"lr[{i}] = {float(lr[i])} is not finite (in float32)")
