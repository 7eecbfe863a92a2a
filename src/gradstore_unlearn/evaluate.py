"""Evaluation of unlearning: did the model forget, and only what it was asked to?

Success means *matching a model retrained without the forget set*, not maximising the forget
loss: a model that has been pushed far past the retrained model ("over-unlearning") is as
detectable, and as much a failure, as one that still remembers. So every number here is meant
to be read next to the same number for the retrained reference model.

The protocol (see the design note):

- mean next-token loss on the forget / retain / holdout sets, and on the forget set for the
  retrained reference;
- retain and general perplexity (utility), and their change before -> after (`compare`);
- membership-inference ROC AUC, forget vs holdout, for the loss attack and for Min-K% Prob
  (Shi et al. 2023); 0.5 means the attacker cannot tell forgotten records from unseen ones;
- canary exposure in bits (Carlini et al. 2019, "The Secret Sharer"), computed exactly by
  enumerating the candidate space, and greedy extraction of each canary's secret;
- a two-sample Kolmogorov-Smirnov test of the per-example forget losses against the
  reference's.

Conventions: token sequences are plain ``list[int]`` (tensors and arrays work too); all losses
are natural-log NLL per token; models are Hugging Face causal LMs on any device, run under
``torch.no_grad()`` in eval mode, with every module's previous training flag restored after.
Returned tensors live on the CPU.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F

log = logging.getLogger("gradstore_unlearn")

__all__ = [
    "Canary",
    "Comparison",
    "EvaluationReport",
    "canary_candidate_logprobs",
    "canary_exposure",
    "canary_logprob",
    "compare",
    "context_length",
    "evaluate_model",
    "exposures",
    "extraction",
    "extractions",
    "ks_test",
    "mia_auc",
    "min_k_scores",
    "perplexity",
    "sequence_losses",
    "token_logprobs",
]


class Canary(Protocol):
    """What evaluation needs of a canary: a record ``prefix + secret`` planted in the training data.

    The secret is ``length`` characters drawn from ``alphabet``; the candidate space is every such
    string, ``len(alphabet) ** length`` of them.
    """

    prefix: str
    secret: str
    alphabet: str
    length: int


# ----------------------------------------------------------------------------------------------
# running the model


@contextmanager
def _inference(model: torch.nn.Module) -> Iterator[None]:
    """eval() + no_grad() for the duration, then put back each module's own training flag.

    Restoring per module (not ``model.train(was_training)``) keeps deliberately frozen
    submodules, e.g. an eval-mode dropout inside a training model, as the caller left them.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def _model_device(model: torch.nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


_FORWARD_PARAMS: dict[type, frozenset[str]] = {}


def _forward_params(model: torch.nn.Module) -> frozenset[str]:
    """Names forward() takes, looked up once per model class."""
    params = _FORWARD_PARAMS.get(type(model))
    if params is None:
        params = _FORWARD_PARAMS[type(model)] = frozenset(inspect.signature(model.forward).parameters)
    return params


def _forward(model: torch.nn.Module, input_ids: torch.Tensor, **kwargs: Any) -> Any:
    """Call ``model(input_ids, ...)``, passing each optional keyword only if forward() names it.

    The optional keywords are ``use_cache``, ``logits_to_keep`` and ``cache`` (called
    ``past_key_values`` before transformers 5.x renamed it); a model without them still works,
    only slower (full logits, no KV cache). ``attention_mask`` is always passed when given.
    """
    params = _forward_params(model)
    call: dict[str, Any] = {}
    for name, value in kwargs.items():
        if value is None:
            continue
        if name == "cache" and "cache" not in params:
            name = "past_key_values"
        if name == "attention_mask" or name in params:
            call[name] = value
    return model(input_ids, **call)


def _output_cache(out: Any) -> Any:
    """The KV cache a forward returned (``.cache`` in transformers 5, ``.past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


# ----------------------------------------------------------------------------------------------
# per-token scores of token sequences


def _as_id_lists(sequences: Sequence[Sequence[int]]) -> list[list[int]]:
    """Plain int lists; tensors / numpy arrays are accepted too. Raises on length < 2."""
    out = []
    for i, seq in enumerate(sequences):
        ids = seq.tolist() if hasattr(seq, "tolist") else list(seq)
        if len(ids) < 2:
            raise ValueError(
                f"sequence {i} has {len(ids)} token(s); a next-token loss needs at least 2 tokens"
            )
        out.append(ids)
    return out


def _padded_batches(
    seqs: list[list[int]], batch_size: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Length-sorted, right-padded batches.

    Yields ``(index, input_ids, attention_mask)``: index long [B] into ``seqs``, input_ids long
    [B, T] and attention_mask long [B, T] on ``device``, T = longest sequence of the batch.
    Longest first, so an out-of-memory batch size fails on the first batch rather than the last.
    Right padding is invisible to real tokens under a causal mask, and position ids of the real
    tokens stay 0..L-1, so padded results equal unpadded ones.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        width = len(seqs[index[0]])
        # pad with token 0: any valid id does, the mask and ignore_index keep it out of every score
        rows = [seqs[i] + [0] * (width - len(seqs[i])) for i in index]
        lengths = torch.tensor([len(seqs[i]) for i in index])
        input_ids = torch.tensor(rows, dtype=torch.long, device=device)
        attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long().to(device)
        yield torch.tensor(index), input_ids, attention_mask


def _batch_token_nll(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Next-token NLL of a padded batch: float32 [B, T]; column t scores token t+1; 0 where unscored.

    Computed the way Hugging Face's ForCausalLMLoss does (float32 logits, labels shifted by
    padding rather than slicing the logits, cross_entropy with ignore_index), so that a
    sequence's mean equals ``model(ids, labels=ids).loss`` up to float32 summation order.
    """
    logits = _forward(model, input_ids, attention_mask=attention_mask, use_cache=False).logits
    targets = input_ids.masked_fill(attention_mask == 0, -100)
    targets = F.pad(targets, (0, 1), value=-100)[:, 1:]  # [B, T]; last column is always ignored
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
    )
    return nll.view(targets.shape)


def _min_k_mean(logprobs: torch.Tensor, counts: torch.Tensor, k: float) -> torch.Tensor:
    """Mean of the lowest ``max(1, floor(k * n))`` of each row's first n log-probs.

    logprobs float [B, T] (entries past a row's count are ignored), counts long [B].
    Returns float64 [B]. Floor as in Shi et al.'s reference code, but never fewer than 1 token.
    """
    width = logprobs.shape[1]
    valid = torch.arange(width, device=logprobs.device)[None, :] < counts[:, None]
    ordered = logprobs.double().masked_fill(~valid, math.inf).sort(dim=1).values
    # 1e-9 keeps e.g. 0.29 * 100 = 28.999999999999996 from flooring to 28
    keep = torch.clamp(torch.floor(k * counts.double() + 1e-9).long(), min=1)
    lowest = torch.where(torch.arange(width, device=logprobs.device)[None, :] < keep[:, None], ordered, 0.0)
    return lowest.sum(dim=1) / keep.double()


def _score(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    *,
    batch_size: int,
    device: torch.device | str | None,
    min_k: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One pass over ``sequences``: (nll_sum float64 [n], n_tokens long [n], min_k float64 [n] | None).

    Everything in this section is derived from these: mean loss = nll_sum / n_tokens,
    perplexity = exp(sum nll_sum / sum n_tokens), so a report needs a single forward per set.
    """
    seqs = _as_id_lists(sequences)
    n = len(seqs)
    nll_sum = torch.zeros(n, dtype=torch.float64)
    n_tokens = torch.tensor([len(s) - 1 for s in seqs], dtype=torch.long)
    min_k_out = torch.zeros(n, dtype=torch.float64) if min_k is not None else None
    dev = _model_device(model, device)
    with _inference(model):
        for index, input_ids, attention_mask in _padded_batches(seqs, batch_size, dev):
            nll = _batch_token_nll(model, input_ids, attention_mask)
            # float64 accumulation: sums over long sequences should not drift from HF's mean
            nll_sum[index] = nll.double().sum(dim=1).cpu()
            if min_k_out is not None:
                min_k_out[index] = _min_k_mean(-nll, n_tokens[index].to(nll.device), min_k).cpu()
    return nll_sum, n_tokens, min_k_out


def sequence_losses(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    *,
    batch_size: int = 32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Each sequence's own mean next-token NLL over positions 1..L-1.

    sequences: n token-id sequences of length >= 2 (ValueError naming the first shorter one).
    Returns float64 [n] on the CPU, in input order; equals ``model(ids, labels=ids).loss`` for
    each sequence alone. Batched with right padding (padding never counts), sorted by length.
    This is also the unlearning engine's calibration objective, so it is kept loop-free per token.
    """
    nll_sum, n_tokens, _ = _score(model, sequences, batch_size=batch_size, device=device)
    return nll_sum / n_tokens


def token_logprobs(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    *,
    batch_size: int = 32,
    device: torch.device | str | None = None,
) -> list[torch.Tensor]:
    """Log-prob of each actual next token: one float64 [L_i - 1] CPU tensor per sequence, input order."""
    seqs = _as_id_lists(sequences)
    out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    dev = _model_device(model, device)
    with _inference(model):
        for index, input_ids, attention_mask in _padded_batches(seqs, batch_size, dev):
            logprobs = (-_batch_token_nll(model, input_ids, attention_mask)).double().cpu()
            for row, i in enumerate(index.tolist()):
                out[i] = logprobs[row, : len(seqs[i]) - 1].clone()
    return out


def perplexity(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    *,
    batch_size: int = 32,
    device: torch.device | str | None = None,
) -> float:
    """Token-weighted perplexity: exp(total NLL / total scored tokens), every token counted once."""
    if len(sequences) == 0:
        raise ValueError("perplexity of an empty set of sequences is undefined")
    nll_sum, n_tokens, _ = _score(model, sequences, batch_size=batch_size, device=device)
    return math.exp(float(nll_sum.sum()) / int(n_tokens.sum()))


def min_k_scores(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    k: float = 0.2,
    *,
    batch_size: int = 32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Min-K% Prob (Shi et al. 2023): mean of the lowest k-fraction of a sequence's token log-probs.

    Returns float64 [n]; higher means "more likely a training member". The number of tokens kept
    is ``max(1, floor(k * (L - 1)))``.
    """
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")
    _, _, scores = _score(model, sequences, batch_size=batch_size, device=device, min_k=k)
    assert scores is not None
    return scores


# ----------------------------------------------------------------------------------------------
# membership inference and distribution tests


def _as_float64(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def mia_auc(member_scores: Any, nonmember_scores: Any) -> float:
    """ROC AUC of a membership attack whose higher score means "member"; 0.5 is chance.

    Mann-Whitney U / (n_m n_n) via average ranks, so a tie between a member and a non-member
    counts 1/2. Scores: 1-D tensors, arrays or lists; pass ``-losses`` for the loss attack.
    """
    members, nonmembers = _as_float64(member_scores), _as_float64(nonmember_scores)
    if members.size == 0 or nonmembers.size == 0:
        raise ValueError("mia_auc needs at least one member and one non-member score")
    if not (np.isfinite(members).all() and np.isfinite(nonmembers).all()):
        raise ValueError("mia_auc scores must be finite")
    ranks = scipy.stats.rankdata(np.concatenate([members, nonmembers]))  # ties get their average rank
    n_m, n_n = members.size, nonmembers.size
    u = ranks[:n_m].sum() - n_m * (n_m + 1) / 2.0
    return float(u / (n_m * n_n))


def ks_test(losses_a: Any, losses_b: Any) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov test (scipy.stats.ks_2samp): (statistic, p-value).

    Used on per-example forget losses, unlearned model vs retrained reference: a small p-value
    says the two loss distributions differ (under- *or* over-unlearning).
    """
    a, b = _as_float64(losses_a), _as_float64(losses_b)
    if a.size == 0 or b.size == 0:
        raise ValueError("ks_test needs two non-empty samples")
    result = scipy.stats.ks_2samp(a, b)
    return float(result.statistic), float(result.pvalue)


# ----------------------------------------------------------------------------------------------
# canaries: exposure and extraction


def _encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _canary_ids(tokenizer: Any, canary: Canary) -> tuple[list[int], list[int], list[int]]:
    """(prefix token ids, token id of each alphabet character, secret as alphabet indices).

    The prefix is encoded like a training record (with the tokenizer's special tokens, e.g. a
    BOS); the alphabet characters without. Checks the tokenizer contract exposure relies on:
    one distinct token per alphabet character, and ``prefix + secret`` tokenizing as the
    concatenation, so the enumerated candidates are exactly the token sequences seen in training.
    """
    alphabet, secret = canary.alphabet, canary.secret
    if len(set(alphabet)) != len(alphabet) or len(alphabet) < 2:
        raise ValueError(f"canary alphabet must have >= 2 distinct characters, got {alphabet!r}")
    if len(secret) != canary.length or any(c not in alphabet for c in secret):
        raise ValueError(f"secret {secret!r} is not {canary.length} characters of alphabet {alphabet!r}")
    digit_ids = []
    for c in alphabet:
        ids = _encode(tokenizer, c, special=False)
        if len(ids) != 1:
            raise ValueError(
                f"alphabet character {c!r} encodes to {len(ids)} tokens {ids}; exposure needs exactly 1"
            )
        digit_ids.append(ids[0])
    if len(set(digit_ids)) != len(digit_ids):
        raise ValueError("two alphabet characters encode to the same token")
    prefix_ids = _encode(tokenizer, canary.prefix, special=True)
    if not prefix_ids:
        raise ValueError("canary prefix encodes to no tokens; the first secret character needs context")
    secret_idx = [alphabet.index(c) for c in secret]
    if prefix_ids + [digit_ids[j] for j in secret_idx] != _encode(
        tokenizer, canary.prefix + secret, special=True
    ):
        raise ValueError(
            f"tokenizer does not split prefix+secret at the boundary for canary {canary.prefix!r}+{secret!r}; "
            "exposure would score a token sequence the model never saw"
        )
    return prefix_ids, digit_ids, secret_idx


def context_length(model: torch.nn.Module) -> int | None:
    """The most positions the model can attend over (GPT-2: ``n_positions``), or None if it does not say."""
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _fit_prefix(model: torch.nn.Module, prefix_ids: list[int], length: int) -> list[int]:
    """The prefix, cut from the left so that prefix + a ``length``-token secret fits the model's context.

    A canary planted late in a long record lies beyond the context of a short-context model, which can only
    condition on the positions just before the secret: that is what gets scored, with a warning. Whether the
    model ever saw the secret depends on how its training cut long records (`data.encode_documents` keeps
    their beginning, so there it did not).
    """
    limit = context_length(model)
    if limit is None or len(prefix_ids) + length <= limit:
        return prefix_ids
    if limit <= length:
        raise ValueError(f"a {length}-character secret does not fit the model's context of {limit} positions")
    cut = len(prefix_ids) + length - limit
    log.warning("canary prefix + secret is %d tokens, the model's context %d: scored on the last %d prefix "
                "tokens", len(prefix_ids) + length, limit, len(prefix_ids) - cut)
    return prefix_ids[cut:]


def _alphabet_logprobs(
    model: torch.nn.Module,
    prefix_ids: list[int],
    suffixes: torch.Tensor,
    digit_ids: list[int],
    *,
    batch_size: int | None,
    device: torch.device,
    use_cache: bool | None,
) -> torch.Tensor:
    """Log-probs of every alphabet token at each secret position, for many candidate suffixes.

    suffixes: long [R, L-1], token ids of the first L-1 secret characters of R candidates.
    Returns float64 [R, L, A] on the CPU: [r, i, a] = log p(alphabet[a] | prefix + suffixes[r, :i]),
    softmax over the full vocabulary (the probability the model really assigns; Carlini et al.).

    With a KV cache (default when the model returns one) the prefix is run once and each batch
    only feeds its L-1 suffix tokens on a copy of the prefix cache; without, each row runs
    prefix + suffix in full. Both give one row per candidate parent, not per candidate.

    Measured on CPU (GPT-2 n_layer=4, n_embd=128, 50-token prefix, 4 digits, 1 thread): prefix
    cache 0.34-0.39 s; no cache 2.4-3.2 s; depth-by-depth tree without cache (1111 rows,
    last-position logits) 2.7-3.5 s; brute force over all 10**4 candidates 21-60 s. With the
    cache, ~40% of the time is copying the prefix keys/values into each batch. On a GPU (H200)
    the same model is launch-bound: ~12 ms in batches of 1000 rows with or without the cache,
    ~55 ms (cache) / ~34 ms (none) in batches of 128. Hence ``batch_size=None`` means 128 rows
    on the CPU (bounded memory for the copied caches) and 1024 on an accelerator.
    """
    if batch_size is None:
        batch_size = 128 if device.type == "cpu" else 1024
    n_rows, n_suffix = suffixes.shape
    prefix_ids = _fit_prefix(model, prefix_ids, n_suffix + 1)
    digits = torch.tensor(digit_ids, device=device)
    prefix = torch.tensor([prefix_ids], dtype=torch.long, device=device)

    def alphabet_lp(logits: torch.Tensor) -> torch.Tensor:  # [..., V] -> float64 [..., A]
        logits = logits.float()
        return (logits[..., digits] - logits.logsumexp(dim=-1, keepdim=True)).double().cpu()

    cache = None
    if use_cache is not False and "use_cache" in _forward_params(model):
        out = _forward(model, prefix, use_cache=True, logits_to_keep=1)
        cache = _output_cache(out)
        if not hasattr(cache, "batch_repeat_interleave"):
            cache = None  # no cache, or one that cannot be copied across a batch
        first = alphabet_lp(out.logits[0, -1])  # [A], shared by every row
    if use_cache and cache is None:
        raise ValueError("use_cache=True but the model does not return a batch-expandable KV cache")

    if cache is None:
        # no cache: run prefix + suffix per row; the last L positions hold all L distributions
        chunks = []
        for chunk in suffixes.split(batch_size):
            ids = torch.cat([prefix.expand(chunk.shape[0], -1), chunk.to(device)], dim=1)
            logits = _forward(model, ids, use_cache=False, logits_to_keep=n_suffix + 1).logits
            chunks.append(alphabet_lp(logits[:, -(n_suffix + 1) :]))
        return torch.cat(chunks)

    out_rows = [first.expand(n_rows, 1, -1)]
    if n_suffix > 0:
        chunks = []
        for chunk in suffixes.split(batch_size):
            # the cache is mutated by the forward (keys appended), so each batch gets its own copy
            batch_cache = copy.deepcopy(cache)
            batch_cache.batch_repeat_interleave(chunk.shape[0])
            logits = _forward(model, chunk.to(device), cache=batch_cache, use_cache=True).logits
            chunks.append(alphabet_lp(logits))
        out_rows.append(torch.cat(chunks))
    return torch.cat(out_rows, dim=1)


def _all_strings(n_symbols: int, length: int) -> torch.Tensor:
    """Every string of ``length`` symbols in lexicographic order: long [n_symbols**length, length]."""
    index = torch.arange(n_symbols**length)
    powers = n_symbols ** torch.arange(length - 1, -1, -1)
    return (index[:, None] // powers[None, :]) % n_symbols


def canary_candidate_logprobs(
    model: torch.nn.Module,
    tokenizer: Any,
    canary: Canary,
    *,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    use_cache: bool | None = None,
) -> torch.Tensor:
    """Exact log p(candidate | prefix) for every candidate secret: float64 [A**L], CPU.

    Candidates are in lexicographic order of alphabet index, so the secret ``s`` sits at
    ``sum_i alphabet.index(s_i) * A**(L-1-i)``. The space is enumerated as a tree: the model is run
    once per parent of a leaf, A**(L-1) rows (1000 for a 4-digit secret), each row
    giving the distributions at all L depths of its path; a candidate's log-prob is the sum of
    the conditionals along its path. ``use_cache``: None = use a prefix KV cache when the model
    supports one (about 7x faster on CPU, see `_alphabet_logprobs`), False = never, True = require it.
    """
    prefix_ids, digit_ids, _ = _canary_ids(tokenizer, canary)
    n_sym, length = len(digit_ids), canary.length
    if length < 1:
        raise ValueError("canary length must be >= 1")
    parents = _all_strings(n_sym, length - 1)  # [R, L-1] alphabet indices
    dev = _model_device(model, device)
    with _inference(model):
        lp = _alphabet_logprobs(
            model,
            prefix_ids,
            torch.tensor(digit_ids)[parents],
            digit_ids,
            batch_size=batch_size,
            device=dev,
            use_cache=use_cache,
        )  # [R, L, A]
    # log-prob of each parent path, then every last character appended: [R, A] -> [A**L]
    path = lp[:, : length - 1, :].gather(2, parents[:, :, None]).sum(dim=(1, 2))
    return (path[:, None] + lp[:, length - 1, :]).reshape(-1)


def canary_logprob(
    model: torch.nn.Module,
    tokenizer: Any,
    canary: Canary,
    *,
    secret: str | None = None,
    device: torch.device | str | None = None,
) -> float:
    """log p(secret | prefix) in nats, full-vocabulary softmax, one forward of prefix + secret.

    ``secret`` scores another candidate of the same space instead of ``canary.secret``.
    """
    prefix_ids, digit_ids, secret_idx = _canary_ids(tokenizer, canary)
    if secret is not None:
        if len(secret) != canary.length or any(c not in canary.alphabet for c in secret):
            raise ValueError(f"{secret!r} is not in the canary's candidate space")
        secret_idx = [canary.alphabet.index(c) for c in secret]
    target = [digit_ids[j] for j in secret_idx]
    prefix_ids = _fit_prefix(model, prefix_ids, len(target))
    dev = _model_device(model, device)
    n_prefix, length = len(prefix_ids), len(target)
    with _inference(model):
        ids = torch.tensor([prefix_ids + target], device=dev)
        logits = _forward(model, ids, use_cache=False).logits[0].float()
        logprobs = logits[n_prefix - 1 : n_prefix - 1 + length].log_softmax(dim=-1)  # [L, V]
        return float(logprobs.gather(1, torch.tensor(target, device=dev)[:, None]).double().sum())


def canary_exposure(
    model: torch.nn.Module,
    tokenizer: Any,
    canary: Canary,
    *,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    use_cache: bool | None = None,
    exact_max_length: int = 5,
    num_samples: int = 4096,
    seed: int = 0,
) -> float:
    """Exposure of the canary's secret in bits (Carlini et al. 2019): log2 |space| - log2 rank.

    rank = 1 + number of candidates with strictly higher log p(candidate | prefix), so ties do
    not lower the exposure; it ranges from 0 (rank = |space|) to log2 |space| (the secret is the
    model's top candidate; 13.29 bits for 4 decimal digits).

    Exact for ``canary.length <= exact_max_length`` (enumeration, see
    `canary_candidate_logprobs`; 10**5 candidates cost 10**4 rows). Longer secrets are
    *estimated* from ``num_samples`` candidates drawn uniformly (with replacement, seeded): the
    fraction p of samples beating the secret gives rank ~ 1 + p (|space| - 1). When fewer than
    10 samples beat it, that fraction is too coarse (it is 0 for any well-memorised secret), so
    p is instead the tail of a skew-normal fitted to the samples' log-probs, the extrapolation
    of Carlini et al. section 4.3. The estimate is deterministic for a given seed.

    ``batch_size``: candidate rows per forward; None = 128 on the CPU, 1024 on an accelerator.
    ``use_cache``: as in `canary_candidate_logprobs`.
    """
    n_sym, length = len(canary.alphabet), canary.length
    log2_space = length * math.log2(n_sym)
    if length <= exact_max_length:
        scores = canary_candidate_logprobs(
            model, tokenizer, canary, batch_size=batch_size, device=device, use_cache=use_cache
        )
        secret_at = sum(
            canary.alphabet.index(c) * n_sym ** (length - 1 - i) for i, c in enumerate(canary.secret)
        )
        rank = 1 + int((scores > scores[secret_at]).sum())
        return log2_space - math.log2(rank)

    # sampling estimate: the secret rides along as row 0 so it is scored by the same code path
    prefix_ids, digit_ids, secret_idx = _canary_ids(tokenizer, canary)
    generator = torch.Generator().manual_seed(seed)
    rows = torch.cat(
        [torch.tensor([secret_idx]), torch.randint(n_sym, (num_samples, length), generator=generator)]
    )
    with _inference(model):
        lp = _alphabet_logprobs(
            model,
            prefix_ids,
            torch.tensor(digit_ids)[rows[:, :-1]],
            digit_ids,
            batch_size=batch_size,
            device=_model_device(model, device),
            use_cache=use_cache,
        )
    scores = lp.gather(2, rows[:, :, None]).sum(dim=(1, 2)).numpy()  # [1 + num_samples]
    secret_score, samples = scores[0], scores[1:]
    n_higher = int((samples > secret_score).sum())
    if n_higher >= 10:
        frac = n_higher / num_samples
    else:
        a, loc, scale = scipy.stats.skewnorm.fit(samples)
        frac = float(scipy.stats.skewnorm.sf(secret_score, a, loc, scale))
    rank = 1.0 + frac * (float(n_sym) ** length - 1.0)
    return log2_space - math.log2(rank)


def exposures(
    model: torch.nn.Module, tokenizer: Any, canaries: Sequence[Canary], **kwargs: Any
) -> torch.Tensor:
    """`canary_exposure` of each canary: float64 [n] bits. Keyword arguments are passed through."""
    return torch.tensor(
        [canary_exposure(model, tokenizer, c, **kwargs) for c in canaries], dtype=torch.float64
    )


def extractions(
    model: torch.nn.Module,
    tokenizer: Any,
    canaries: Sequence[Canary],
    *,
    batch_size: int = 32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Whether greedy decoding of ``length`` tokens after each prefix reproduces its secret: bool [n].

    Greedy decoding emits the secret iff, at every secret position, the argmax next token given
    prefix + the secret's *own* earlier characters is the next secret character (by induction
    on the position). So a single teacher-forced forward of prefix + secret per canary decides
    it, batched, instead of ``length`` sequential decoding steps. Argmax is over the full
    vocabulary; ties resolve to the lowest token id, as in ``generate``.
    """
    seqs, starts = [], []
    for c in canaries:
        prefix_ids, digit_ids, secret_idx = _canary_ids(tokenizer, c)
        prefix_ids = _fit_prefix(model, prefix_ids, c.length)
        seqs.append(prefix_ids + [digit_ids[j] for j in secret_idx])
        starts.append(len(prefix_ids) - 1)  # the position whose prediction is the first secret token
    result = torch.zeros(len(seqs), dtype=torch.bool)
    if not seqs:
        return result
    starts_t = torch.tensor(starts)
    dev = _model_device(model, device)
    with _inference(model):
        for index, input_ids, attention_mask in _padded_batches(seqs, batch_size, dev):
            logits = _forward(model, input_ids, attention_mask=attention_mask, use_cache=False).logits
            hit = logits[:, :-1].argmax(dim=-1) == input_ids[:, 1:]  # [B, T-1]: prediction at t is token t+1
            pos = torch.arange(hit.shape[1], device=dev)[None, :]
            window = (pos >= starts_t[index].to(dev)[:, None]) & (
                pos < attention_mask.sum(dim=1)[:, None] - 1
            )
            result[index] = (hit | ~window).all(dim=1).cpu()
    return result


def extraction(
    model: torch.nn.Module, tokenizer: Any, canary: Canary, *, device: torch.device | str | None = None
) -> bool:
    """Whether greedy decoding of ``canary.length`` tokens after the prefix reproduces the secret."""
    return bool(extractions(model, tokenizer, [canary], device=device)[0])


# ----------------------------------------------------------------------------------------------
# the report


# (attribute, label, format, compared before/after). Attributes may be properties.
_METRICS: list[tuple[str, str, str, bool]] = [
    ("n_forget", "examples: forget", "d", False),
    ("n_retain", "examples: retain", "d", False),
    ("n_holdout", "examples: holdout", "d", False),
    ("n_general", "examples: general", "d", False),
    ("forget_loss", "loss forget (mean)", ".4f", True),
    ("forget_loss_std", "loss forget (std)", ".4f", True),
    ("retain_loss", "loss retain (mean)", ".4f", True),
    ("retain_loss_std", "loss retain (std)", ".4f", True),
    ("holdout_loss", "loss holdout (mean)", ".4f", True),
    ("holdout_loss_std", "loss holdout (std)", ".4f", True),
    ("reference_forget_loss", "loss forget, reference (mean)", ".4f", True),
    ("reference_forget_loss_std", "loss forget, reference (std)", ".4f", True),
    ("forget_loss_gap", "loss gap: forget - reference (target 0)", "+.4f", True),
    ("ks_statistic", "KS statistic, forget losses vs reference", ".4f", True),
    ("ks_pvalue", "KS p-value", ".3g", True),
    ("retain_ppl", "perplexity retain", ".3f", True),
    ("general_ppl", "perplexity general", ".3f", True),
    ("mia_auc_loss", "MIA AUC forget vs holdout, loss", ".4f", True),
    ("mia_auc_min_k", "MIA AUC forget vs holdout, Min-K% prob", ".4f", True),
    ("min_k", "Min-K% fraction k", ".2f", False),
    ("n_forget_canaries", "canaries: forget", "d", False),
    ("n_holdout_canaries", "canaries: holdout", "d", False),
    ("forget_exposure_mean", "exposure forget canaries, mean (bits)", ".3f", True),
    ("forget_exposure_median", "exposure forget canaries, median (bits)", ".3f", True),
    ("holdout_exposure_mean", "exposure holdout canaries, mean (bits)", ".3f", True),
    ("holdout_exposure_median", "exposure holdout canaries, median (bits)", ".3f", True),
    ("forget_extraction_rate", "extraction rate forget canaries", ".3f", True),
    ("holdout_extraction_rate", "extraction rate holdout canaries", ".3f", True),
]

# per-example arrays kept for plots; optional in JSON
_PER_EXAMPLE = (
    "forget_losses",
    "retain_losses",
    "holdout_losses",
    "reference_forget_losses",
    "forget_min_k",
    "holdout_min_k",
    "forget_exposures",
    "holdout_exposures",
    "forget_extracted",
    "holdout_extracted",
)


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned, a dashed rule."""
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _json_float(x: float | None) -> float | None:
    """JSON has no NaN / inf: those become null (strict parsers reject the bare tokens)."""
    return x if x is None or math.isfinite(x) else None


@dataclass(eq=False)
class EvaluationReport:
    """Everything the protocol measures for one model. Losses in nats/token, exposure in bits.

    Scalar fields are plain Python numbers (None = not measured: no general set, no canaries, no
    reference). Per-example fields are CPU tensors in the order of the input sets, for plots;
    ``to_dict(per_example=False)`` leaves them out.
    """

    n_forget: int
    n_retain: int
    n_holdout: int
    forget_loss: float
    forget_loss_std: float | None
    retain_loss: float
    retain_loss_std: float | None
    holdout_loss: float
    holdout_loss_std: float | None
    retain_ppl: float
    mia_auc_loss: float
    mia_auc_min_k: float
    min_k: float
    n_general: int = 0
    general_ppl: float | None = None
    n_forget_canaries: int = 0
    n_holdout_canaries: int = 0
    forget_exposure_mean: float | None = None
    forget_exposure_median: float | None = None
    holdout_exposure_mean: float | None = None
    holdout_exposure_median: float | None = None
    forget_extraction_rate: float | None = None
    holdout_extraction_rate: float | None = None
    reference_forget_loss: float | None = None
    reference_forget_loss_std: float | None = None
    ks_statistic: float | None = None
    ks_pvalue: float | None = None
    # per-example arrays (float64, or bool for *_extracted)
    forget_losses: torch.Tensor | None = field(default=None, repr=False)
    retain_losses: torch.Tensor | None = field(default=None, repr=False)
    holdout_losses: torch.Tensor | None = field(default=None, repr=False)
    reference_forget_losses: torch.Tensor | None = field(default=None, repr=False)
    forget_min_k: torch.Tensor | None = field(default=None, repr=False)
    holdout_min_k: torch.Tensor | None = field(default=None, repr=False)
    forget_exposures: torch.Tensor | None = field(default=None, repr=False)
    holdout_exposures: torch.Tensor | None = field(default=None, repr=False)
    forget_extracted: torch.Tensor | None = field(default=None, repr=False)
    holdout_extracted: torch.Tensor | None = field(default=None, repr=False)

    @property
    def forget_loss_gap(self) -> float | None:
        """Forget loss minus the reference's: < 0 still remembers, > 0 over-unlearnt; target 0."""
        if self.reference_forget_loss is None:
            return None
        return self.forget_loss - self.reference_forget_loss

    def to_dict(self, per_example: bool = True) -> dict[str, Any]:
        """JSON-ready dict: scalar fields (non-finite -> None), plus ``per_example`` lists if asked."""
        out: dict[str, Any] = {}
        arrays: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _PER_EXAMPLE:
                if value is not None:
                    values = value.tolist()
                    arrays[f.name] = values if value.dtype == torch.bool else [_json_float(v) for v in values]
                else:
                    arrays[f.name] = None
            elif isinstance(value, float):
                out[f.name] = _json_float(value)
            else:
                out[f.name] = value
        if per_example:
            out["per_example"] = arrays
        return out

    def to_json(self, per_example: bool = True, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(per_example=per_example), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationReport:
        """Inverse of `to_dict` (per-example lists become tensors again)."""
        kwargs = {k: v for k, v in data.items() if k != "per_example"}
        for name, values in (data.get("per_example") or {}).items():
            if values is not None:
                is_bool = name.endswith("_extracted")
                kwargs[name] = torch.tensor(
                    [math.nan if v is None else v for v in values] if not is_bool else values,
                    dtype=torch.bool if is_bool else torch.float64,
                )
        return cls(**kwargs)

    def to_table(self) -> str:
        """Aligned plain-text ``metric  value`` table; unmeasured metrics are left out."""
        rows = [
            [label, _fmt(value, spec)]
            for key, label, spec, _ in _METRICS
            if (value := getattr(self, key)) is not None
        ]
        return _table(["metric", "value"], rows)

    def __str__(self) -> str:
        return self.to_table()


def _std_or_none(x: torch.Tensor) -> float | None:
    """Sample standard deviation, None for a single value (where it is undefined)."""
    return float(x.std()) if x.numel() > 1 else None


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any = None,
    *,
    forget: Sequence[Sequence[int]],
    retain: Sequence[Sequence[int]],
    holdout: Sequence[Sequence[int]],
    general: Sequence[Sequence[int]] | None = None,
    forget_canaries: Sequence[Canary] = (),
    holdout_canaries: Sequence[Canary] = (),
    reference: torch.nn.Module | None = None,
    batch_size: int = 32,
    exposure_batch_size: int | None = None,
    min_k: float = 0.2,
    device: torch.device | str | None = None,
) -> EvaluationReport:
    """Run the whole protocol on ``model``; see `EvaluationReport` for what comes back.

    forget / retain / holdout / general: token sequences (each >= 2 tokens; the first three
    non-empty). holdout must be drawn from the same distribution as forget but never trained
    on: the MIA AUCs compare the two. Canaries need ``tokenizer``. ``reference`` is a model
    retrained without the forget set; with it the report carries its forget losses and the KS
    test of ours against them. One forward pass per set and model, plus the canary enumerations.
    ``batch_size`` is in sequences; ``exposure_batch_size`` in candidate rows (see `canary_exposure`).
    """
    for name, seqs in (("forget", forget), ("retain", retain), ("holdout", holdout)):
        if len(seqs) == 0:
            raise ValueError(f"the {name} set is empty")
    if (forget_canaries or holdout_canaries) and tokenizer is None:
        raise ValueError("canary exposure needs the tokenizer")
    if not 0.0 < min_k <= 1.0:
        raise ValueError(f"min_k must be in (0, 1], got {min_k}")
    kw = {"batch_size": batch_size, "device": device}

    f_nll, f_tok, f_min_k = _score(model, forget, min_k=min_k, **kw)
    h_nll, h_tok, h_min_k = _score(model, holdout, min_k=min_k, **kw)
    r_nll, r_tok, _ = _score(model, retain, **kw)
    assert f_min_k is not None and h_min_k is not None
    forget_losses, holdout_losses, retain_losses = f_nll / f_tok, h_nll / h_tok, r_nll / r_tok

    report = EvaluationReport(
        n_forget=len(forget),
        n_retain=len(retain),
        n_holdout=len(holdout),
        forget_loss=float(forget_losses.mean()),
        forget_loss_std=_std_or_none(forget_losses),
        retain_loss=float(retain_losses.mean()),
        retain_loss_std=_std_or_none(retain_losses),
        holdout_loss=float(holdout_losses.mean()),
        holdout_loss_std=_std_or_none(holdout_losses),
        retain_ppl=math.exp(float(r_nll.sum()) / int(r_tok.sum())),
        mia_auc_loss=mia_auc(-forget_losses, -holdout_losses),  # lower loss = "member"
        mia_auc_min_k=mia_auc(f_min_k, h_min_k),
        min_k=min_k,
        forget_losses=forget_losses,
        retain_losses=retain_losses,
        holdout_losses=holdout_losses,
        forget_min_k=f_min_k,
        holdout_min_k=h_min_k,
    )
    if general is not None and len(general) > 0:
        report.n_general = len(general)
        report.general_ppl = perplexity(model, general, **kw)

    for side, canaries in (("forget", forget_canaries), ("holdout", holdout_canaries)):
        if not canaries:
            continue
        bits = exposures(model, tokenizer, canaries, batch_size=exposure_batch_size, device=device)
        extracted = extractions(model, tokenizer, canaries, **kw)
        setattr(report, f"n_{side}_canaries", len(canaries))
        setattr(report, f"{side}_exposure_mean", float(bits.mean()))
        setattr(report, f"{side}_exposure_median", float(np.median(bits.numpy())))
        setattr(report, f"{side}_extraction_rate", float(extracted.double().mean()))
        setattr(report, f"{side}_exposures", bits)
        setattr(report, f"{side}_extracted", extracted)

    if reference is not None:
        ref_losses = sequence_losses(reference, forget, **kw)
        report.reference_forget_losses = ref_losses
        report.reference_forget_loss = float(ref_losses.mean())
        report.reference_forget_loss_std = _std_or_none(ref_losses)
        report.ks_statistic, report.ks_pvalue = ks_test(forget_losses, ref_losses)
    return report


# ----------------------------------------------------------------------------------------------
# before / after


@dataclass(eq=False)
class Comparison:
    """Two reports of the same sets, before and after unlearning, with deltas (after - before)."""

    before: EvaluationReport
    after: EvaluationReport

    def _pct(self, key: str) -> float | None:
        b, a = getattr(self.before, key), getattr(self.after, key)
        if a is None or b is None or b == 0:
            return None
        return 100.0 * (a - b) / abs(b)

    @property
    def retain_ppl_change_pct(self) -> float | None:
        """Relative change of retain perplexity in % (utility cost of unlearning; > 0 is worse)."""
        return self._pct("retain_ppl")

    @property
    def general_ppl_change_pct(self) -> float | None:
        return self._pct("general_ppl")

    def rows(self) -> list[dict[str, Any]]:
        """One dict per metric measured in both reports: key, label, before, after, delta, delta_pct."""
        out = []
        for key, label, _, compared in _METRICS:
            b, a = getattr(self.before, key), getattr(self.after, key)
            if not compared or (a is None and b is None):
                continue
            delta = None if a is None or b is None else a - b
            out.append(
                {
                    "key": key,
                    "label": label,
                    "before": b,
                    "after": a,
                    "delta": delta,
                    "delta_pct": self._pct(key),
                }
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        metrics = [
            {k: _json_float(v) if isinstance(v, float) else v for k, v in r.items()} for r in self.rows()
        ]
        return {
            "retain_ppl_change_pct": _json_float(self.retain_ppl_change_pct),
            "general_ppl_change_pct": _json_float(self.general_ppl_change_pct),
            "metrics": metrics,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def to_table(self) -> str:
        """Aligned ``metric  before  after  delta  delta %`` table."""
        specs = {key: spec for key, _, spec, _ in _METRICS}
        rows = []
        for r in self.rows():
            spec = specs[r["key"]].lstrip("+")
            rows.append(
                [
                    r["label"],
                    _fmt(r["before"], spec),
                    _fmt(r["after"], spec),
                    _fmt(r["delta"], "+" + spec),
                    _fmt(r["delta_pct"], "+.1f"),
                ]
            )
        return _table(["metric", "before", "after", "delta", "delta %"], rows)

    def __str__(self) -> str:
        return self.to_table()


def compare(before: EvaluationReport, after: EvaluationReport) -> Comparison:
    """Before/after table of two reports, e.g. ``print(compare(r0, r1))``."""
    return Comparison(before, after)
