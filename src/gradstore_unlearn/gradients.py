"""Fresh gradients on the current model: embedding rows, other parameters, Hessian-vector products.

The stored rows are first-epoch gradients; iterative unlearning, influence queries for a text and the
ablations need the same quantities on the model as it is now. Everything here measures each sequence's own
*mean* token loss (the quantity capture stores and calibration targets), batched with right padding.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from .capture import IGNORE_INDEX

log = logging.getLogger("gradstore_unlearn")


def _batches(sequences: Sequence[Sequence[int]], batch_size: int, pad_token_id: int, device: torch.device
             ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        length = max(len(s) for s in chunk)
        input_ids = torch.full((len(chunk), length), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for i, sequence in enumerate(chunk):
            input_ids[i, : len(sequence)] = torch.as_tensor(list(sequence), dtype=torch.long)
            mask[i, : len(sequence)] = 1
        yield start, input_ids.to(device), mask.to(device)


def own_mean_losses(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor,
                    confidence_power: float = 0.0) -> torch.Tensor:
    """float32 [B]: each sequence's mean next-token cross-entropy (differentiable).

    With `confidence_power` γ > 0, a weighted mean: token t counts p_t^γ (its current probability, constant),
    so that tokens the model is sure of — memorised ones, whose plain cross-entropy gradient p - 1 vanishes —
    steer the direction of ascent.
    """
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
    targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                           reduction="none")
    valid = (targets != IGNORE_INDEX).float()
    if confidence_power:
        weights = torch.exp(-ce.detach() * confidence_power) * valid
        return (ce * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-12)
    return ce.sum(dim=1) / valid.sum(dim=1).clamp(min=1)


@contextmanager
def _training_mode(model: torch.nn.Module, train: bool) -> Iterator[None]:
    states = {m: m.training for m in model.modules()}
    model.train(train)
    try:
        yield
    finally:
        for module, state in states.items():
            module.train(state)


def embedding_gradient(model: torch.nn.Module, sequences: Sequence[Sequence[int]], weights: Sequence[float] | None
                       = None, *, pad_token_id: int = 0, batch_size: int = 32,
                       params: Sequence[torch.nn.Parameter] = (), confidence_power: float = 0.0
                       ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Gradient of sum_i w_i * loss_i through the embedding *lookup* (as capture stores it), dense.

    Returns (rows float32 [V, D], gradients of `params`, in order). The lookup gradient is the gradient at the
    embedding output scattered by token id: with tied input/output embeddings it excludes the output side,
    exactly like the stored rows. Dropout is off (eval mode) so that gradients are deterministic.
    """
    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    rows = torch.zeros_like(embedding.weight, dtype=torch.float32)
    grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    w = torch.ones(len(sequences)) if weights is None else torch.as_tensor(list(weights), dtype=torch.float32)
    captured: dict[str, torch.Tensor] = {}

    def keep(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        output.register_hook(lambda g: captured.__setitem__("g", g))

    handle = embedding.register_forward_hook(keep)
    try:
        with _training_mode(model, False), torch.enable_grad():
            for start, input_ids, mask in _batches(sequences, batch_size, pad_token_id, device):
                batch_w = w[start : start + len(input_ids)].to(device)
                if not bool((batch_w != 0).any()):
                    continue
                loss = (own_mean_losses(model, input_ids, mask, confidence_power) * batch_w).sum()
                # Asking for the embedding weight's gradient routes backward through the lookup, where the hook
                # picks up the per-position gradient; the weight's own (tied, output-side) gradient is unused.
                out = torch.autograd.grad(loss, [embedding.weight, *params], allow_unused=True)[1:]
                for acc, g in zip(grads, out, strict=True):
                    if g is not None:
                        acc += g.float()
                keep_positions = mask.bool()
                rows.index_add_(0, input_ids[keep_positions], captured["g"][keep_positions].float())
    finally:
        handle.remove()
    return rows, grads


def sparse_rows(model: torch.nn.Module, sequence: Sequence[int], *, pad_token_id: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence's own embedding rows on the current model: (token_ids int32 [k], rows float32 [k, D])."""
    dense, _ = embedding_gradient(model, [sequence], pad_token_id=pad_token_id)
    tokens = torch.unique(torch.as_tensor(list(sequence), dtype=torch.long))
    return tokens.to(torch.int32), dense[tokens.to(dense.device)].cpu()


def retain_fisher(model: torch.nn.Module, sequences: Sequence[Sequence[int]], weights: Sequence[float] | None = None,
                  *, pad_token_id: int = 0) -> torch.Tensor:
    """float32 [V, D]: the diagonal empirical Fisher of the input-embedding matrix, sum_i w_i (dL_i/dW)^2.

    Unlike `embedding_gradient`, this is the gradient of the whole matrix: with tied input/output embeddings it
    includes the output side (every row's logit at every position), which is where ascent on the lookup side
    does much of its damage to text that shares no tokens with the forgotten examples. One backward per
    sequence: the square must be taken per example (the square of a batch's sum would let examples cancel).
    """
    weight = model.get_input_embeddings().weight
    fisher = torch.zeros_like(weight, dtype=torch.float32)
    w = [1.0] * len(sequences) if weights is None else [float(x) for x in weights]
    with _training_mode(model, False), torch.enable_grad():
        for i, sequence in enumerate(sequences):
            if w[i] == 0 or len(sequence) < 2:
                continue
            _, input_ids, mask = next(_batches([sequence], 1, pad_token_id, weight.device))
            (grad,) = torch.autograd.grad(own_mean_losses(model, input_ids, mask).sum(), [weight])
            fisher.add_(grad.float().square(), alpha=w[i])
    return fisher


def matrix_gradient(model: torch.nn.Module, sequences: Sequence[Sequence[int]], *, pad_token_id: int = 0,
                    batch_size: int = 32) -> torch.Tensor:
    """float32 [V, D]: the gradient of the sequences' mean loss w.r.t. the whole input-embedding matrix.

    With tied input/output embeddings this is one matrix, so both sides count: the first-order effect of moving
    a row on these sequences, wherever the row is used (untied, the input side only).
    """
    weight = model.get_input_embeddings().weight
    out = torch.zeros_like(weight, dtype=torch.float32)
    with _training_mode(model, False), torch.enable_grad():
        for _, input_ids, mask in _batches(sequences, batch_size, pad_token_id, weight.device):
            loss = own_mean_losses(model, input_ids, mask).sum() / len(sequences)
            (grad,) = torch.autograd.grad(loss, [weight])
            out += grad.float()
    return out


# ------------------------------------------------------------------------------ Hessian-vector products
def embedding_hvp(model: torch.nn.Module, sequences: Sequence[Sequence[int]], vector: torch.Tensor, *,
                  pad_token_id: int = 0, batch_size: int = 32) -> torch.Tensor:
    """H v for H = Hessian, w.r.t. the input-embedding matrix only, of the mean of the sequences' own losses.

    Double backward (Pearlmutter): d/dW <dL/dW, v>. `vector` is [V, D]; so is the result. Tied output
    embeddings are part of the same matrix, so their second-order terms are included.
    """
    weight = model.get_input_embeddings().weight
    out = torch.zeros_like(weight, dtype=torch.float32)
    # The fused attention kernels have no second derivative; the math one does.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with _training_mode(model, False), torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        for _, input_ids, mask in _batches(sequences, batch_size, pad_token_id, weight.device):
            loss = own_mean_losses(model, input_ids, mask).sum() / len(sequences)
            (grad,) = torch.autograd.grad(loss, [weight], create_graph=True)
            (hv,) = torch.autograd.grad((grad * vector.to(grad.dtype)).sum(), [weight])
            out += hv.float()
    return out


class InverseHvpError(ValueError):
    """The inverse Hessian-vector product has no reliable answer with these settings (the message says why)."""


def inverse_hvp(model: torch.nn.Module, sequences: Sequence[Sequence[int]], vector: torch.Tensor, *,
                damping: float = 0.01, method: str = "cg", iterations: int = 50, tolerance: float = 1e-6,
                lissa_scale: float = 10.0, pad_token_id: int = 0) -> torch.Tensor:
    """(H + damping I)^-1 v over the embedding matrix, by conjugate gradient (default) or LiSSA.

    CG needs H + damping I positive definite. A trained model away from an exact minimum has negative
    curvature (measured on the test world's model: smallest eigenvalue -0.37), which a small damping does not
    cover: CG then meets a direction p with p^T (H + damping I) p <= 0 and its answer is meaningless, so it
    raises `InverseHvpError` naming the curvature and the damping that would cover it. LiSSA iterates
    x <- v + (I - (H + damping I) / scale) x and returns x / scale; it converges when `scale` exceeds the
    largest eigenvalue and the damping covers the smallest; a run whose iterate grows without bound raises.
    An answer that did not converge within `iterations` is returned with a warning in the log.
    """

    def apply(x: torch.Tensor) -> torch.Tensor:
        return embedding_hvp(model, sequences, x, pad_token_id=pad_token_id) + damping * x

    v = vector.float()
    v_norm = float(v.norm())
    if method == "lissa":
        x = v.clone()
        for _ in range(iterations):
            x = v + x - apply(x) / lissa_scale
            size = float(x.norm())
            if not math.isfinite(size) or size > 1e6 * max(v_norm, 1e-30):
                raise InverseHvpError(f"LiSSA diverged (|x| = {size:.3g} from |v| = {v_norm:.3g}): raise lissa_scale "
                                      f"above the largest eigenvalue of H (now {lissa_scale:g}) or the damping "
                                      f"above the magnitude of its most negative one (now {damping:g})")
        return x / lissa_scale
    if method != "cg":
        raise ValueError(f"unknown inverse-HVP method {method!r}; choose 'cg' or 'lissa'")
    x = torch.zeros_like(v)
    r = v.clone()
    p = r.clone()
    rs = float((r * r).sum())
    threshold = tolerance**2 * max(rs, 1e-30)
    for _ in range(iterations):
        if rs <= threshold:
            break
        hp = apply(p)
        curvature = float((p * hp).sum())
        if curvature <= 0:
            per_unit = curvature / float((p * p).sum())
            raise InverseHvpError(
                f"H + damping I is not positive definite: curvature {per_unit:.3g} along a conjugate-gradient "
                f"direction with damping {damping:g}; the damping must exceed the magnitude of H's most negative "
                f"eigenvalue, so at least {damping - per_unit:.3g} (the curvature met so far)")
        alpha = rs / curvature
        x += alpha * p
        r -= alpha * hp
        rs_new = float((r * r).sum())
        p = r + (rs_new / rs) * p
        rs = rs_new
    else:
        if rs > threshold:
            log.warning("inverse HVP: conjugate gradient did not converge in %d iterations (relative residual "
                        "%.3g > tolerance %.3g)", iterations, math.sqrt(rs / max(v_norm**2, 1e-30)), tolerance)
    return x
