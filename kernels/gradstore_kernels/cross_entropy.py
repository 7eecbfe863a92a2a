"""`token_cross_entropy`: per-row cross-entropy of a logits matrix, without a float32 copy of it.

    loss[i] = logsumexp(logits[i]) - logits[i, targets[i]]      (float32; 0 where targets[i] == ignore_index)

This is `F.cross_entropy(logits.float(), targets, reduction="none")` without materialising the float32
logits: the Triton kernel reads each row once in its own dtype and accumulates in float32, and an ignored
row is not read at all. The torch reference here is the specification the kernel is tested against, and
the production path wherever there is no GPU.
"""

import torch

from .backend import resolve_backend
from .checks import INDEX_DTYPES, WEIGHT_DTYPES, _require_device, _require_dtype, _require_tensor
from .errors import KernelDtypeError, KernelInputError
from .scoring import reference_chunk_rows

LOGIT_DTYPES = WEIGHT_DTYPES  # float32, bfloat16, float16


@torch.no_grad()
def token_cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
                                  ) -> torch.Tensor:
    """Reference `token_cross_entropy` on validated inputs: float32 [N].

    Rows are upcast to float32 a chunk at a time (memory stays bounded by a few [chunk, V] float32
    temporaries; float32 logits are not copied). A target outside [0, V) that is not `ignore_index`
    gives NaN (the public function rejects those unless told not to check).
    """
    N, V = logits.shape
    out = torch.empty(N, dtype=torch.float32, device=logits.device)
    live = targets != ignore_index
    in_range = (targets >= 0) & (targets < V)
    safe = torch.where(in_range, targets, 0).to(torch.int64)
    step = reference_chunk_rows(V, logits.device)
    for lo in range(0, N, step):
        hi = min(lo + step, N)
        x = logits[lo:hi].to(torch.float32)
        target_logit = x.gather(1, safe[lo:hi, None]).squeeze(1)
        torch.sub(torch.logsumexp(x, dim=1), target_logit, out=out[lo:hi])
    out = torch.where(in_range, out, torch.nan)
    return torch.where(live, out, 0.0)


def _check_inputs(logits, targets, ignore_index: int, check_targets: bool) -> None:
    logits = _require_tensor("logits", logits)
    targets = _require_tensor("targets", targets)
    if logits.dim() != 2:
        raise KernelInputError(f"logits must be 2-D [N, V], got shape {tuple(logits.shape)}")
    _require_dtype("logits", logits, LOGIT_DTYPES)
    if targets.dim() != 1:
        raise KernelInputError(f"targets must be 1-D [N], got shape {tuple(targets.shape)}")
    _require_dtype("targets", targets, INDEX_DTYPES)
    N, V = logits.shape
    if targets.numel() != N:
        raise KernelInputError(f"targets has {targets.numel()} entries but logits has {N} rows")
    if V == 0:
        raise KernelInputError("logits has no columns (V = 0)")
    _require_device("targets", targets, logits.device)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise KernelDtypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if check_targets and N:
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
        if bool(bad.any()):  # one device-to-host sync on CUDA
            i = int(torch.nonzero(bad)[0])
            raise KernelInputError(
                f"targets[{i}] = {int(targets[i])} is out of range [0, {V}) and is not ignore_index = {ignore_index}"
            )


@torch.no_grad()
def token_cross_entropy(
    logits, targets, *, ignore_index: int = -100, check_targets: bool = True, backend: str = "auto"
) -> torch.Tensor:
    """Cross-entropy of every row of `logits` against its target, in float32.

    logits:  [N, V] float32/bfloat16/float16; any row stride (a last-dim stride other than 1 is copied).
    targets: int32/int64 [N], each in [0, V) or equal to `ignore_index` (-100, as in F.cross_entropy).
    check_targets: True (default) raises KernelInputError for a target outside [0, V) that is not
             `ignore_index`, at the cost of one device-to-host sync on CUDA; False skips the check (no
             sync), and such a row's loss is NaN instead -- nothing is read out of bounds either way.
    backend: "auto" (Triton on CUDA, else the reference), "triton" or "reference".
    Returns float32 [N]: logsumexp(logits[i]) - logits[i, targets[i]], and 0 for an ignored row (callers
    that average over valid positions multiply by their mask anyway; 0 keeps a masked sum finite).
    """
    _check_inputs(logits, targets, ignore_index, check_targets)
    if resolve_backend(backend, logits.device) == "triton":
        from .cross_entropy_triton import token_cross_entropy_triton

        return token_cross_entropy_triton(logits, targets, ignore_index)
    return token_cross_entropy_reference(logits, targets, ignore_index)
