"""Tests for gradstore_unlearn.evaluate on tiny GPT-2 models and a character-level tokenizer."""

from __future__ import annotations

import itertools
import json
import math
import string
from dataclasses import dataclass

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from gradstore_unlearn import evaluate as ev

# ----------------------------------------------------------------------------------------------
# fixtures: a 64-token character tokenizer, tiny models, records and canaries

CHARS = string.ascii_lowercase + string.digits + " :.,'-_" + string.ascii_uppercase[:20]  # 63 + [UNK]


@dataclass
class Canary:
    prefix: str
    secret: str
    alphabet: str = "0123456789"
    length: int = 3


NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
NAMES += ["ivan", "judy", "mallory", "niaj", "olivia", "peggy", "rupert", "sybil"]
RECORDS = [f"{n} lives at {10 + 7 * i} oak street" for i, n in enumerate(NAMES)]
FORGET_TEXT, HOLDOUT_TEXT = RECORDS[:8], RECORDS[8:]
RETAIN_TEXT = ["the cat sat on the mat", "a quick brown fox", "hello world", "oak trees grow slowly"]
FORGET_CANARY = Canary("pin of alice: ", "482")
HOLDOUT_CANARY = Canary("pin of bob: ", "193")


def make_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, so every digit is one token and prefix + secret splits cleanly."""
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def make_model(seed: int = 0, n_layer: int = 1) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer, n_head=2, n_embd=32, vocab_size=64, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def model() -> GPT2LMHeadModel:
    return make_model()


@pytest.fixture(scope="module")
def memorised(tok) -> GPT2LMHeadModel:
    """A model overfit on the forget records and the forget canary (never on holdout ones)."""
    m = make_model(seed=1)
    data = [tok(s).input_ids for s in [*FORGET_TEXT, FORGET_CANARY.prefix + FORGET_CANARY.secret]]
    width = max(map(len, data))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in data])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in data])
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.Adam(m.parameters(), lr=2e-2)
    m.train()
    for _ in range(40):
        loss = m(ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def encode(tok, texts: list[str]) -> list[list[int]]:
    return [tok(t).input_ids for t in texts]


# ----------------------------------------------------------------------------------------------
# losses, log-probs, perplexity


def test_sequence_losses_match_hf_loss_per_sequence(model, tok):
    seqs = encode(tok, ["hello world", "ab", "the quick brown fox jumps over", "x y z", "oak"])
    for batch_size in (1, 2, 32):  # 2: several padded batches of mixed lengths
        losses = ev.sequence_losses(model, seqs, batch_size=batch_size)
        assert losses.dtype == torch.float64 and losses.shape == (len(seqs),)
        for seq, loss in zip(seqs, losses, strict=True):  # input order, not length order
            ids = torch.tensor([seq])
            with torch.no_grad():
                expected = model(ids, labels=ids).loss
            torch.testing.assert_close(loss.item(), expected.item(), rtol=1e-5, atol=1e-6)


def test_sequence_losses_accepts_tensors_and_rejects_short_sequences(model, tok):
    seqs = encode(tok, ["hello", "world wide"])
    as_tensors = [torch.tensor(s) for s in seqs]
    torch.testing.assert_close(ev.sequence_losses(model, as_tensors), ev.sequence_losses(model, seqs))
    assert ev.sequence_losses(model, []).shape == (0,)
    with pytest.raises(ValueError, match="sequence 2"):
        ev.sequence_losses(model, [*seqs, [5]])


def test_training_flags_are_restored(tok):
    m = make_model()
    m.train()
    m.transformer.h[0].attn.eval()  # a deliberately frozen submodule must stay as the caller left it
    before = {name: mod.training for name, mod in m.named_modules()}
    ev.sequence_losses(m, encode(tok, ["hello world"]))
    ev.canary_exposure(m, tok, FORGET_CANARY)
    assert {name: mod.training for name, mod in m.named_modules()} == before


def test_token_logprobs_and_perplexity(model, tok):
    seqs = encode(tok, ["hello world", "ab", "the quick brown fox"])
    lps = ev.token_logprobs(model, seqs, batch_size=2)
    losses = ev.sequence_losses(model, seqs)
    for seq, lp, loss in zip(seqs, lps, losses, strict=True):
        assert lp.shape == (len(seq) - 1,) and lp.dtype == torch.float64
        assert (lp <= 0).all()
        torch.testing.assert_close(-lp.mean(), loss)
    # token-weighted: every token counts once, so long sequences weigh more than in mean(losses)
    total_nll = -sum(float(lp.sum()) for lp in lps)
    n_tokens = sum(len(s) - 1 for s in seqs)
    # rel 1e-6, not tighter: the two read float32 logits from batches padded differently (batch_size 2 here, 32
    # there), which on some CPUs round differently in the last bits (measured: 2.5e-8 on an AMD EPYC).
    assert ev.perplexity(model, seqs) == pytest.approx(math.exp(total_nll / n_tokens), rel=1e-6)
    assert ev.perplexity(model, seqs) != pytest.approx(math.exp(float(losses.mean())), rel=1e-6)


def test_min_k_scores(model, tok):
    seqs = encode(tok, ["hello world", "abc", "the quick brown fox"])
    lps = ev.token_logprobs(model, seqs)
    for k in (0.2, 0.5):
        scores = ev.min_k_scores(model, seqs, k=k, batch_size=2)
        for lp, score in zip(lps, scores, strict=True):
            keep = max(1, math.floor(k * len(lp)))  # "abc" has 2 scored tokens: keeps 1, not 0
            torch.testing.assert_close(score, lp.sort().values[:keep].mean())
    torch.testing.assert_close(ev.min_k_scores(model, seqs, k=1.0), -ev.sequence_losses(model, seqs))
    with pytest.raises(ValueError):
        ev.min_k_scores(model, seqs, k=0.0)


# ----------------------------------------------------------------------------------------------
# membership inference and KS


def test_mia_auc_matches_pairwise_definition():
    gen = torch.Generator().manual_seed(0)
    members = torch.randint(0, 8, (37,), generator=gen).double()  # small integers: many ties
    nonmembers = torch.randint(0, 6, (23,), generator=gen).double()
    wins = (members[:, None] > nonmembers[None, :]).double() + 0.5 * (members[:, None] == nonmembers[None, :])
    assert ev.mia_auc(members, nonmembers) == pytest.approx(float(wins.mean()), abs=1e-12)


def test_mia_auc_edge_cases():
    assert ev.mia_auc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert ev.mia_auc([0.0, 1.0], [2.0, 3.0]) == 0.0
    assert ev.mia_auc([1.0, 1.0, 1.0], [1.0, 1.0]) == 0.5  # all tied: chance
    assert ev.mia_auc([0.0, 3.0], [1.0, 2.0]) == 0.5
    with pytest.raises(ValueError):
        ev.mia_auc([], [1.0])


def test_ks_test():
    a = torch.linspace(0, 1, 50, dtype=torch.float64)
    assert ev.ks_test(a, a) == (0.0, 1.0)
    stat, p = ev.ks_test(a, a + 2.0)
    assert stat == 1.0 and p < 1e-10


# ----------------------------------------------------------------------------------------------
# canaries


def brute_force_logprobs(model, tok, canary) -> torch.Tensor:
    """log p(candidate | prefix) of every candidate, from full forwards of each prefix + candidate."""
    candidates = ["".join(t) for t in itertools.product(canary.alphabet, repeat=canary.length)]
    lps = ev.token_logprobs(model, encode(tok, [canary.prefix + c for c in candidates]), batch_size=500)
    return torch.stack([lp[-canary.length :].sum() for lp in lps])


@pytest.mark.parametrize("use_cache", [True, False])
def test_exact_exposure_equals_brute_force(model, tok, use_cache):
    canary = Canary("pin of dave: ", "71", length=2)
    brute = brute_force_logprobs(model, tok, canary)
    enumerated = ev.canary_candidate_logprobs(model, tok, canary, batch_size=7, use_cache=use_cache)
    torch.testing.assert_close(enumerated, brute, rtol=0, atol=1e-5)
    secret_at = int(canary.secret)  # lexicographic order of decimal digits = numeric order
    rank = 1 + int((brute > brute[secret_at]).sum())
    expected = math.log2(100) - math.log2(rank)
    assert ev.canary_exposure(model, tok, canary, use_cache=use_cache) == pytest.approx(expected)
    assert ev.canary_logprob(model, tok, canary) == pytest.approx(float(brute[secret_at]), abs=1e-5)


def test_exact_exposure_three_digits(model, tok):
    brute = brute_force_logprobs(model, tok, FORGET_CANARY)
    rank = 1 + int((brute > brute[int(FORGET_CANARY.secret)]).sum())
    assert ev.canary_exposure(model, tok, FORGET_CANARY) == pytest.approx(math.log2(1000) - math.log2(rank))


def test_memorised_canary_is_exposed_and_extracted(memorised, tok):
    assert ev.canary_exposure(memorised, tok, FORGET_CANARY) == pytest.approx(math.log2(1000))
    assert ev.extraction(memorised, tok, FORGET_CANARY)
    assert ev.canary_exposure(memorised, tok, HOLDOUT_CANARY) < 8.0
    assert not ev.extraction(memorised, tok, HOLDOUT_CANARY)
    bits = ev.exposures(memorised, tok, [FORGET_CANARY, HOLDOUT_CANARY])
    assert bits.dtype == torch.float64 and bits[0] > bits[1]


def greedy_decode(model, tok, canary) -> str:
    """Reference: append the argmax token ``length`` times."""
    ids = tok(canary.prefix).input_ids
    with torch.no_grad():
        for _ in range(canary.length):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return tok.decode(ids[-canary.length :]).replace(" ", "")


def test_extraction_equals_greedy_decoding(model, memorised, tok):
    canaries = [
        FORGET_CANARY,
        HOLDOUT_CANARY,
        Canary("x: ", "0000", length=4),
        Canary("pin of alice: ", "4", length=1),
    ]
    for m in (model, memorised):
        expected = [greedy_decode(m, tok, c) == c.secret for c in canaries]
        assert ev.extractions(m, tok, canaries, batch_size=3).tolist() == expected
    assert [greedy_decode(memorised, tok, c) == c.secret for c in canaries] == [True, False, False, True]


def test_sampled_exposure_estimate(model, memorised, tok):
    # force the sampling path on a space small enough to know the exact answer
    exact = ev.canary_exposure(model, tok, FORGET_CANARY)
    estimate = ev.canary_exposure(model, tok, FORGET_CANARY, exact_max_length=2, num_samples=2000)
    assert estimate == pytest.approx(exact, abs=0.3)
    # a memorised secret beats every sample: the skew-normal tail still ranks it near the top
    estimate = ev.canary_exposure(memorised, tok, FORGET_CANARY, exact_max_length=2, num_samples=2000)
    assert 7.0 < estimate <= math.log2(1000)


def test_a_canary_beyond_the_context_is_scored_on_the_last_positions_before_it(model, tok):
    # The model's context is 64 positions; this prefix alone is 80 characters (tokens). Exposure and extraction
    # score what the model can condition on: the prefix cut from the left to leave room for the secret.
    tail = "pin of alice: "
    long = Canary("x" * (80 - len(tail)) + tail, "482")
    cut = Canary(long.prefix[-(64 - 3) :], "482")
    assert ev.canary_exposure(model, tok, long) == pytest.approx(ev.canary_exposure(model, tok, cut))
    assert ev.extractions(model, tok, [long, cut]).tolist() == [ev.extraction(model, tok, cut)] * 2
    assert ev.canary_logprob(model, tok, long) == pytest.approx(ev.canary_logprob(model, tok, cut))
    # The cut is exact: prefix + secret fill the context, and a prefix that fits is left alone.
    ids = list(range(1, 81))
    assert ev._fit_prefix(model, ids, 3) == ids[-61:]
    assert ev._fit_prefix(model, ids[:61], 3) == ids[:61]
    assert ev._fit_prefix(model, ids[:62], 3) == ids[1:62]
    with pytest.raises(ValueError, match="does not fit the model's context of 64"):
        ev.canary_exposure(model, tok, Canary("pin: ", "1" * 64, length=64), exact_max_length=0, num_samples=4)


def test_canary_tokenisation_is_checked(model, tok):
    with pytest.raises(ValueError, match="alphabet"):
        ev.canary_exposure(model, tok, Canary("pin: ", "48a"))
    with pytest.raises(ValueError, match="same token"):  # both unknown to the tokenizer
        ev.canary_exposure(model, tok, Canary("pin: ", "AB", alphabet="AB\u00e9\u00fc", length=2))


# ----------------------------------------------------------------------------------------------
# report


@pytest.fixture(scope="module")
def reports(memorised, model, tok):
    kw = {
        "forget": encode(tok, FORGET_TEXT),
        "retain": encode(tok, RETAIN_TEXT),
        "holdout": encode(tok, HOLDOUT_TEXT),
        "general": encode(tok, ["some general text here"]),
        "forget_canaries": [FORGET_CANARY],
        "holdout_canaries": [HOLDOUT_CANARY],
        "reference": model,  # stands in for the retrained model
    }
    return ev.evaluate_model(memorised, tok, **kw), ev.evaluate_model(model, tok, **kw)


def test_report_contents(reports):
    trained, untouched = reports
    assert trained.forget_loss < trained.holdout_loss
    assert trained.mia_auc_loss == 1.0 and trained.mia_auc_min_k > 0.9
    assert trained.forget_exposure_mean == pytest.approx(math.log2(1000))
    assert trained.forget_extraction_rate == 1.0 and trained.holdout_extraction_rate == 0.0
    assert trained.forget_losses.shape == (8,) and trained.n_general == 1
    assert trained.forget_loss_gap < 0 and trained.ks_pvalue < 0.01  # far from the reference
    # evaluated against itself, the reference matches exactly
    assert untouched.forget_loss_gap == pytest.approx(0.0, abs=1e-12)
    assert untouched.ks_statistic == 0.0 and untouched.ks_pvalue == 1.0


def test_report_json_round_trip(reports):
    trained, _ = reports
    text = trained.to_json()
    data = json.loads(text)
    assert data == trained.to_dict()
    assert len(data["per_example"]["forget_losses"]) == 8
    assert data["per_example"]["forget_extracted"] == [True]
    assert ev.EvaluationReport.from_dict(data).to_dict() == data
    assert "per_example" not in json.loads(trained.to_json(per_example=False))


def test_report_json_has_no_nan(tok, model):
    # one forget example: its std is undefined and must come out as null, not NaN
    report = ev.evaluate_model(
        model, forget=encode(tok, ["ab"]), retain=encode(tok, ["cd"]), holdout=encode(tok, ["ef"])
    )
    assert report.forget_loss_std is None and report.general_ppl is None
    assert json.loads(report.to_json())["forget_loss_std"] is None


def test_tables_and_comparison(reports):
    trained, untouched = reports
    table = trained.to_table()
    assert "MIA AUC forget vs holdout, loss" in table and "exposure forget canaries" in table
    lines = table.splitlines()
    assert (
        len({line.index(line.split()[-1]) + len(line.split()[-1]) for line in lines[2:]}) == 1
    )  # right-aligned
    cmp = ev.compare(untouched, trained)
    assert cmp.retain_ppl_change_pct == pytest.approx(100 * (trained.retain_ppl / untouched.retain_ppl - 1))
    rows = {r["key"]: r for r in cmp.rows()}
    assert rows["forget_loss"]["delta"] == pytest.approx(trained.forget_loss - untouched.forget_loss)
    assert "perplexity retain" in cmp.to_table() and "delta %" in cmp.to_table()
    json.loads(cmp.to_json())
