"""The unlearning engine: calibration, modes, idempotency, erasure, crash safety, bad input, fuzzy, HVP."""

from __future__ import annotations

import copy
import itertools
import json
import os
import shutil

import pytest
import torch
import transformers
from forget_setup import VOCAB, forget_records, record, tiny_model

from gradstore import ErasedError, GradStore, InvalidInputError, UnknownIdError
from gradstore_unlearn.evaluate import sequence_losses, token_logprobs
from gradstore_unlearn.fuzzy import MinHashIndex, ShingleIndex
from gradstore_unlearn.gradients import embedding_hvp, inverse_hvp
from gradstore_unlearn.train import TrainConfig, train_model
from gradstore_unlearn.unlearn import (
    ForgetConfig,
    ForgetError,
    ForgetReport,
    Unlearner,
    model_hash,
    paced_limit,
    record_trained_model,
    save_reference_set,
    verify_audit_chain,
)

SECRET = slice(10, 14)  # the four secret tokens: [1, template x4, name x3, 6, 7, secret x4, ...]
# The retain loss of these tiny records is ~0.25 nats: a 2% guard is 0.005 nats, finer than the noise of a
# 13-example guard sample. Tests that need the target reached allow 10% (0.025 nats). (With repair=True they
# would not: on this world the repair step costs more unseen retained loss than it wins back -- measured:
# 1 of 5 sampling seeds reaches the target with it, 5 of 5 without.) The others keep 2%.
LENIENT = ForgetConfig(retain_tolerance=0.10)


class SpaceTokenizer:
    """Texts are token ids written out ("1 2 5 ..."): enough for the text paths of the engine."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(t) for t in text.split()]}


def secret_logprob(model, sequences) -> float:
    """Mean log-probability of the secret tokens: high when memorised, ~log(1/10) or lower when not."""
    return float(torch.stack([lp[SECRET.start - 1 : SECRET.stop - 1].mean() for lp in
                              token_logprobs(model, sequences)]).mean())


def test_iterative_forgetting_reaches_never_seen_levels_and_erases(world):
    unlearner = Unlearner(world.model, world.store, config=LENIENT)
    target_before = world.train["r1"]
    seen_secret = secret_logprob(world.model, [target_before])
    retain_before_all = float(sequence_losses(world.model, [s for k, s in world.train.items() if k != "r1"]).mean())
    report = unlearner.forget(["r1"], mode="iterative")
    assert report.status == "forgotten", report.message
    assert report.forget_loss_after == pytest.approx(report.target_loss, rel=0.021)
    assert report.retain_loss_after <= report.retain_loss_before * 1.10 + 1e-9
    # The guard's estimate holds for every retained example, not only the ones it sampled.
    others = [s for k, s in world.train.items() if k != "r1"]
    assert float(sequence_losses(world.model, others).mean()) <= retain_before_all * 1.11
    # Judged on never-seen records the calibration did not use: same loss level, secret no longer known.
    judge = sequence_losses(world.model, world.judge)
    assert float(sequence_losses(world.model, [target_before])[0]) > float(judge.quantile(0.1))
    # The secret is far less known than before, though not yet as unknown as a never-seen one (this overfit
    # model is confidently wrong on those: measured -3.5 vs -5.1 nats per token, from -0.1 before).
    assert secret_logprob(world.model, [target_before]) < seen_secret - 1.0
    # Erased, and audited with salted hashes only.
    with pytest.raises(ErasedError):
        world.store.get("r1")
    (audit,) = forget_records(world.store)
    assert audit["request_id"] == report.request_id and "r1" not in json.dumps(audit)
    assert audit["id_hashes"] == [world.store.id_hash("r1")]
    assert audit["model_hash_after"] == model_hash(world.model) != audit["model_hash_before"]


def test_iterative_mode_with_the_repair_step_repairs_and_keeps_the_guard(world, monkeypatch):
    # repair=True is off by default (module docstring); when asked for, the step runs on the repair pool, and
    # whatever the request ends in, the model it leaves behind holds the guard.
    repaired = []
    original = Unlearner._repair

    def counting(self, batch, shared, size):
        repaired.append(len(batch))
        return original(self, batch, shared, size)

    monkeypatch.setattr(Unlearner, "_repair", counting)
    unlearner = Unlearner(world.model, world.store, config=ForgetConfig(repair=True))
    report = unlearner.forget(["r1"], mode="iterative")
    assert repaired and all(n > 0 for n in repaired)
    assert report.status in ("forgotten", "target_not_met"), report.message
    assert report.forget_loss_after > report.forget_loss_before
    assert report.retain_loss_after <= report.retain_loss_before * 1.02 + 1e-9


def test_first_epoch_mode_stops_at_the_best_admissible_point_when_the_target_is_out_of_reach(world):
    unlearner = Unlearner(world.model, world.store, config=ForgetConfig(retain_tolerance=0.005))
    before = sequence_losses(world.model, [world.train["r0"]])
    report = unlearner.forget(["r0"], mode="first_epoch")
    assert report.status in ("forgotten", "target_not_met")
    assert report.retain_loss_after <= report.retain_loss_before * 1.005 + 1e-9
    assert report.forget_loss_after > float(before[0])  # it did move toward the target...
    if report.status == "target_not_met":
        assert "r0" in world.store and "not reached" in report.message  # ...and erased nothing


def test_a_request_that_stops_short_says_which_examples_and_how_many_rows_they_own(world):
    # A guard too tight for any real step: the request must stop short, and the report must say where each
    # example ended -- by position, since the message is kept with ID-free copies of the report.
    unlearner = Unlearner(world.model, world.store, config=ForgetConfig(retain_tolerance=1e-6))
    report = unlearner.forget(["r0", "r1"], mode="first_epoch")
    assert report.status == "target_not_met"
    assert len(report.examples) == 2
    frequency = unlearner.document_frequency()  # stored examples holding each token (before any erasure)
    for entry, key in zip(report.examples, ["r0", "r1"], strict=True):
        tokens = set(world.train[key])
        mine = {t: sum(t in world.train[k] for k in ("r0", "r1")) for t in tokens}
        assert entry["tokens"] == len(tokens)
        assert entry["owned_tokens"] == sum(mine[t] >= 0.5 * float(frequency[t]) for t in tokens)
        assert entry["loss_after"] < entry["target"] == pytest.approx(report.target_loss)
    assert sum(e["loss_after"] for e in report.examples) / 2 == pytest.approx(report.forget_loss_after, rel=1e-6)
    assert report.below_target()[0] in (0, 1) and "2 of 2 examples stay below their own target: #" in report.message
    assert "r0" not in report.message and "r1" not in report.message
    assert "examples below their target" in report.to_table()
    assert ForgetReport.from_dict(report.to_dict()).examples == report.examples


def test_an_over_large_initial_scale_is_pulled_back_by_calibration(world, tmp_path):
    # The fixed step gets its own copy of the trained model and store: a model is only forgotten on where the
    # store's audit log ends.
    pristine, other = copy.deepcopy(world.model), GradStore.open(shutil.copytree(world.store.uri, tmp_path / "other"))
    unlearner = Unlearner(world.model, world.store, config=ForgetConfig(initial_scale=1e6))
    report = unlearner.forget(["r2"], mode="first_epoch")
    assert report.forget_loss_after <= report.target_loss * 1.02 + 1e-9  # no overshoot past never-seen
    assert report.retain_loss_after <= report.retain_loss_before * 1.02 + 1e-9  # no collapse
    fixed = Unlearner(pristine, other,
                      config=ForgetConfig(initial_scale=1e6, calibrate=False)).forget(["r3"], mode="first_epoch")
    assert fixed.forget_loss_after > fixed.target_loss * 1.5 or fixed.retain_loss_after > fixed.retain_loss_before * 1.1


def test_requests_are_idempotent_and_already_forgotten_ids_are_reported(world):
    unlearner = Unlearner(world.model, world.store, config=LENIENT)
    first = unlearner.forget(["r3"], mode="iterative", request_id="req-1")
    state = model_hash(world.model)
    again = unlearner.forget(["r3"], mode="iterative", request_id="req-1")
    assert again.request_id == first.request_id and again.status == first.status
    assert model_hash(world.model) == state
    later = unlearner.forget(["r3"], mode="iterative")
    assert later.status == "nothing_to_do" and later.already_forgotten == ["r3"]
    assert model_hash(world.model) == state
    # A request id names one request: reused for other examples it is refused, not answered with the old report.
    with pytest.raises(ForgetError, match="already used for a different set of examples"):
        unlearner.forget(["r5"], mode="iterative", request_id="req-1")
    assert "r5" in world.store and model_hash(world.model) == state
    with pytest.raises(ForgetError, match="already used for a different set of examples"):  # a dry run alike
        unlearner.forget(["r5"], request_id="req-1", dry_run=True)
    with pytest.raises(ForgetError, match="already used in mode 'iterative'"):  # and the mode is part of it
        unlearner.forget(["r3"], mode="first_epoch", request_id="req-1")
    assert unlearner.forget(["r3"], mode="iterative", request_id="req-1", dry_run=True).status == "dry_run"


def test_five_sequential_requests_each_act_on_the_current_model(world):
    unlearner = Unlearner(world.model, world.store, config=LENIENT)
    hashes = [model_hash(world.model)]
    statuses = []
    for i in range(5, 10):
        report = unlearner.forget([f"r{i}"], mode="iterative")
        statuses.append(report.status)
        # each request starts from the model the previous one left, and holds its guard
        assert report.model_hash_before in (hashes[-1], None)
        assert report.retain_loss_after <= report.retain_loss_before * 1.10 + 1e-9
        if report.status == "forgotten":
            assert report.forget_loss_after >= report.target_loss * 0.98
            assert f"r{i}" not in world.store
            hashes.append(report.model_hash_after)
        else:  # nothing committed: the model stays at the best admissible point, the rows stay stored
            assert f"r{i}" in world.store
            hashes.append(model_hash(world.model))
    assert statuses.count("forgotten") >= 3, statuses
    assert len(world.store) == 40 - statuses.count("forgotten")


def test_bad_input_gets_clear_errors_and_changes_nothing(world, tmp_path):
    unlearner = Unlearner(world.model, world.store)
    state, ids = model_hash(world.model), sorted(world.store.ids())
    with pytest.raises(UnknownIdError, match="cannot forget unknown ID 'nobody'"):
        unlearner.forget(["r1", "nobody"])
    with pytest.raises(ForgetError, match="no IDs given"):
        unlearner.forget([])
    with pytest.raises(ForgetError, match="unknown mode"):
        unlearner.forget(["r1"], mode="harder")
    with pytest.raises(InvalidInputError, match=r"ID 1\.5 has type float"):
        unlearner.forget([1.5])
    assert model_hash(world.model) == state and sorted(world.store.ids()) == ids
    other = GradStore.create(tmp_path / "other", dim=16, vocab_size=VOCAB)
    with pytest.raises(InvalidInputError, match="was not captured from this model"):
        Unlearner(world.model, other)
    empty = GradStore.create(tmp_path / "no-reference", dim=32, vocab_size=VOCAB)
    with empty.writer() as w:
        w.append(["x"], [[1, 2]], [torch.ones(2, 32)], [{"tokens": [1, 2, 3], "lr": 0.1}])
    with pytest.raises(ForgetError, match="no holdout examples"):
        Unlearner(world.model, empty).forget(["x"])


def test_a_crash_after_the_model_is_saved_is_finished_on_restart(world, tmp_path, monkeypatch):
    model_dir = tmp_path / "model"
    world.model.save_pretrained(model_dir)
    unlearner = Unlearner(world.model, world.store, model_dir=model_dir, config=LENIENT)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed between saving the model and erasing")

    monkeypatch.setattr(world.store, "erase", crash)
    with pytest.raises(KeyboardInterrupt):
        unlearner.forget(["r1"], mode="iterative", request_id="crashy")
    monkeypatch.undo()
    assert "r1" in GradStore.open(world.store.uri)  # not erased yet: the journal holds the intent
    from gradstore_unlearn.train import load_model

    reloaded, _ = load_model(model_dir)  # the after-state was saved
    restarted = Unlearner(reloaded, GradStore.open(world.store.uri), model_dir=model_dir, config=LENIENT)
    assert "r1" not in restarted.store and restarted.store.is_erased("r1")
    assert restarted.forget(["r1"], mode="iterative", request_id="crashy").status == "forgotten"  # the finished one


def test_a_crash_before_the_model_is_saved_rolls_back(world, tmp_path, monkeypatch):
    import gradstore_unlearn.unlearn as engine

    model_dir = tmp_path / "model"
    world.model.save_pretrained(model_dir)
    before = model_hash(world.model)
    unlearner = Unlearner(world.model, world.store, model_dir=model_dir, config=LENIENT)
    monkeypatch.setattr(engine, "save_weights_atomically",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        unlearner.forget(["r1"], mode="iterative")
    monkeypatch.undo()
    from gradstore_unlearn.train import load_model

    reloaded, _ = load_model(model_dir)
    assert model_hash(reloaded) == before
    restarted = Unlearner(reloaded, GradStore.open(world.store.uri), model_dir=model_dir)
    assert "r1" in restarted.store and not restarted.store.objects.list_dir("forget-journal")


def test_fuzzy_matching_finds_planted_near_duplicates_and_not_unrelated_records(world):
    near = list(world.train["r7"])
    near[6] = (near[6] + 1) % VOCAB  # one token of the name changed
    for index in (ShingleIndex().add_store(world.store), MinHashIndex(bands=32, rows=2).add_store(world.store)):
        matches = index.query(near, threshold=0.5)
        assert [m.id for m in matches] == ["r7"] and 0.5 <= matches[0].jaccard < 1
    unlearner = Unlearner(world.model, world.store, tokenizer=SpaceTokenizer())
    text = " ".join(map(str, near))
    assert [m.id for m in unlearner.find(text, 0.5)] == ["r7"]
    assert unlearner.find(" ".join(map(str, record(999))), 0.5) == []
    matches, report = unlearner.forget_text(text, 0.5, dry_run=True)
    assert report.status == "dry_run" and report.ids == ["r7"] and "r7" in world.store
    with pytest.raises(ForgetError, match="no stored example matches"):
        unlearner.forget_text(" ".join(map(str, record(998))), 0.9)


def test_influence_ranks_stored_examples_by_gradient_dot_product(world):
    unlearner = Unlearner(world.model, world.store, tokenizer=SpaceTokenizer())
    top = unlearner.influence("r3", k=5)
    assert len(top) == 5 and "r3" not in [i for i, _ in top]
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    by_text = unlearner.influence(" ".join(map(str, world.train["r3"])), k=3)
    assert len(by_text) == 3
    assert unlearner.self_influence("r3") > 0
    with pytest.raises(ForgetError, match="k must be a positive integer"):
        unlearner.influence("r3", k=0)
    # Which kind of query it is can be said: an unknown ID is then an error, not a text, and a text is a text.
    with pytest.raises(UnknownIdError):
        unlearner.influence("no-such-id", k=2, query_type="id")
    assert unlearner.influence(" ".join(map(str, world.train["r3"])), k=3, query_type="text") == by_text
    with pytest.raises(ForgetError, match="the model reads at most"):
        unlearner.influence(" ".join(["7"] * 10_000), k=2, query_type="text")


def test_hessian_vector_products_match_an_explicit_hessian():
    model = tiny_model().double()
    sequences = [record(i)[:8] for i in range(3)]
    weight = model.get_input_embeddings().weight
    rows = sorted({t for s in sequences for t in s})[:3]  # the explicit Hessian over all rows would be huge
    ids = torch.tensor(sequences)
    mask = torch.ones_like(ids)

    def loss_with_rows(sub):
        # Both the lookup and the tied output embedding see the replaced rows, as in the model itself.
        full = weight.detach().index_put((torch.tensor(rows),), sub)
        out = torch.func.functional_call(model, {"transformer.wte.weight": full, "lm_head.weight": full}, (),
                                         {"input_ids": ids, "attention_mask": mask})
        ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        return ce.mean(dim=1).mean()

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):  # fused attention kernels have no second derivative
        hessian = torch.autograd.functional.hessian(loss_with_rows, weight.detach()[rows].clone())
    v = torch.zeros_like(weight)
    v[rows] = torch.randn(len(rows), weight.shape[1], dtype=weight.dtype)
    hv = embedding_hvp(model, sequences, v)[rows].double()
    torch.testing.assert_close(hv, torch.einsum("ijkl,kl->ij", hessian, v[rows]), rtol=1e-5, atol=1e-8)
    # (H + damping I) x = b, solved by conjugate gradient, satisfies the system; LiSSA gets close too.
    b = torch.randn_like(weight) * 0.01
    # Damping 30 makes H + damping I positive definite here (CG needs it, and refuses otherwise: the smallest
    # eigenvalue of H of a model away from a minimum is negative; at damping 10 CG meets curvature -0.4).
    x = inverse_hvp(model, sequences, b, damping=30.0, iterations=150, tolerance=1e-6)
    residual = embedding_hvp(model, sequences, x).double() + 30.0 * x - b
    assert float(residual.norm()) < 1e-3 * float(b.norm())
    # LiSSA converges when its scale exceeds the largest eigenvalue (estimated here by power iteration), at
    # rate 1 - (lambda_min + damping) / scale: a heavier damping keeps the test short.
    u = torch.randn_like(weight)
    for _ in range(20):
        u = embedding_hvp(model, sequences, u / u.norm()).double()
    top = float(u.norm())
    x = inverse_hvp(model, sequences, b, damping=100.0, iterations=150, tolerance=1e-8)
    y = inverse_hvp(model, sequences, b, damping=100.0, method="lissa", iterations=300, lissa_scale=1.2 * (top + 100))
    assert float((y - x).norm()) < 0.02 * float(x.norm())


def test_hvp_influence_of_an_example_shrinks_when_it_is_forgotten(world):
    unlearner = Unlearner(world.model, world.store)
    sample = list(world.train.values())[10:20]
    # The trained world's Hessian has eigenvalues down to about -0.4: a damping of 1 covers them.
    before = unlearner.hvp_influence(world.train["r1"], sample, damping=1.0, iterations=20)
    unlearner.forget(["r1"], mode="iterative")
    after = unlearner.hvp_influence(world.train["r1"], sample, damping=1.0, iterations=20)
    assert before > 0 and after != before


def test_a_store_captured_every_epoch_counts_each_example_once(tmp_path):
    """Under the `all` policy later-epoch records are copies: they must not dilute the ownership weights,
    join the retain sample, or show up as fuzzy matches of their own; forgetting erases every copy."""
    train = {f"r{i}": record(i) for i in range(12)}
    model = tiny_model()
    store = GradStore.create(tmp_path / "store", dim=32, vocab_size=VOCAB, dtype="float32", capture_policy="all")
    train_model(model, list(train.values()), list(train), TrainConfig(epochs=3, batch_size=4, lr=1e-2,
                pad_token_id=0), store=store, progress=False)
    assert len(store) == 3 * len(train) and "r0@epoch2" in store
    unlearner = Unlearner(model, store, tokenizer=SpaceTokenizer(), holdout=[record(i) for i in range(100, 106)])
    expected = torch.zeros(VOCAB)
    for tokens in train.values():
        expected[torch.unique(torch.tensor(tokens))] += 1
    assert torch.equal(unlearner.document_frequency(), expected)
    repair, guard = unlearner._retain_samples({"r0"}, unlearner._ownership([train["r0"]]), True)
    assert train["r0"] not in repair + guard.sequences and len(repair + guard.sequences) <= len(train) - 1
    assert [m.id for m in unlearner.find(" ".join(map(str, train["r3"])), 0.9)] == ["r3"]
    ranked = [i for i, _ in unlearner.influence("r3", k=len(train))]  # examples, not per-epoch records
    assert sorted(ranked) == sorted(k for k in train if k != "r3")
    assert unlearner.forget(["r3"], dry_run=True).status == "dry_run"
    assert all(k in store for k in ("r3", "r3@epoch1", "r3@epoch2"))
    assert unlearner._later_epoch_records(["r3"]) == {"r3": ["r3@epoch1", "r3@epoch2"]}  # a commit erases these too


def test_the_guard_sample_is_stratified_disjoint_from_repair_and_independent_of_store_order(built, tmp_path):
    """The guard sees the retained examples most at risk, weighs them by their share of the retained set, never
    overlaps the repair pool, and is the same whatever order the capture threads committed the store in."""
    others = [k for k in built.train if k != "r1"]
    unlearner = Unlearner(copy.deepcopy(built.model), built.store)
    ownership = unlearner._ownership([built.train["r1"]])
    repair, guard = unlearner._retain_samples({"r1"}, ownership, True)
    assert not {tuple(s) for s in repair} & {tuple(s) for s in guard.sequences}
    assert float(guard.weights.sum()) == pytest.approx(1.0)
    risk = {k: float(ownership[torch.unique(torch.tensor(built.train[k]))].sum()) for k in others}
    most = max(others, key=lambda k: risk[k])
    assert risk[most] > 0 and built.train[most] in repair + guard.sequences  # the most at risk is always drawn
    second = sorted(others, key=lambda k: -risk[k])[1]
    assert built.train[second] in guard.sequences  # and the guard gets its share of the at-risk stratum
    # The weighted guard loss estimates the mean over every retained example: at the trained model, where no
    # stratum is special, it lands near the plain mean (a plain mean over the guard would not, if at-risk
    # examples differ).
    population = float(sequence_losses(built.model, [built.train[k] for k in others]).mean())
    assert unlearner._guard_loss(guard) == pytest.approx(population, rel=0.25)
    # Without repair the whole at-risk stratum guards.
    no_repair, full_guard = unlearner._retain_samples({"r1"}, ownership, False)
    assert no_repair == [] and built.train[most] in full_guard.sequences
    # Same store content committed in the opposite order: the same samples.
    reversed_store = GradStore.create(tmp_path / "reversed", dim=32, vocab_size=VOCAB, dtype="float32")
    batch = built.store.get_many(list(reversed(built.store.ids())), with_meta=True)
    with reversed_store.writer() as writer:
        for i, example_id in enumerate(batch.ids):
            lo, hi = int(batch.offsets[i]), int(batch.offsets[i + 1])
            writer.append([example_id], [batch.token_ids[lo:hi]], [batch.rows[lo:hi]], [batch.meta[i]])
    save_reference_set(reversed_store, built.holdout[:10])
    again = Unlearner(copy.deepcopy(built.model), reversed_store)
    repair2, guard2 = again._retain_samples({"r1"}, again._ownership([built.train["r1"]]), True)
    assert repair2 == repair and guard2.sequences == guard.sequences and torch.equal(guard2.weights, guard.weights)


# ----------------------------------------------------------------------------- commits that fail or crash
class Crash(BaseException):
    """Stands in for the process dying (BaseException: nothing in the library catches it)."""


def saved(world, tmp_path):
    model_dir = tmp_path / "model"
    world.model.save_pretrained(model_dir)
    return model_dir


def restart(world, model_dir):
    from gradstore_unlearn.train import load_model

    model, _ = load_model(model_dir)
    return Unlearner(model, GradStore.open(world.store.uri), model_dir=model_dir, config=LENIENT)


def crash_before_erasing(world, model_dir, monkeypatch, request_id: str) -> None:
    """Forget r1 and die after the new weights are in place, before the erasure."""
    unlearner = Unlearner(world.model, world.store, model_dir=model_dir, config=LENIENT)
    with monkeypatch.context() as patch:
        patch.setattr(world.store, "erase", lambda *a, **k: (_ for _ in ()).throw(Crash()))
        with pytest.raises(Crash):
            unlearner.forget(["r1"], mode="iterative", request_id=request_id)


def test_a_save_that_fails_leaves_the_model_in_memory_as_on_disk(world, tmp_path, monkeypatch):
    """Otherwise the next request would start from, and audit as its before-state, weights never saved."""
    import gradstore_unlearn.unlearn as engine

    model_dir = saved(world, tmp_path)
    before = model_hash(world.model)
    unlearner = Unlearner(world.model, world.store, model_dir=model_dir, config=LENIENT)
    with monkeypatch.context() as patch:
        patch.setattr(engine, "save_weights_atomically", lambda *a, **k: (_ for _ in ()).throw(OSError("full")))
        with pytest.raises(OSError):
            unlearner.forget(["r1"], mode="iterative", request_id="A")
    assert model_hash(world.model) == before and "r1" in world.store
    report = unlearner.forget(["r1"], mode="iterative", request_id="A")  # repeated: runs afresh, from `before`
    assert report.status == "forgotten" and report.model_hash_before == before
    assert not world.store.objects.list_dir("forget-journal")


def test_a_crash_after_an_unsaved_change_does_not_block_the_restart(world, tmp_path, monkeypatch):
    """A request that stops short (`target_not_met`) leaves its change in memory, unsaved. If the next request
    dies before its save, the weights on disk are neither of its journaled states: still nothing happened."""
    import gradstore_unlearn.unlearn as engine

    model_dir = saved(world, tmp_path)
    on_disk = model_hash(world.model)
    # A small fixed step stops short of the target within the guard: its change stays in memory, unsaved.
    unlearner = Unlearner(world.model, world.store, model_dir=model_dir,
                          config=ForgetConfig(calibrate=False, initial_scale=1e-3))
    assert unlearner.forget(["r2"], mode="first_epoch").status == "target_not_met"
    assert model_hash(world.model) != on_disk
    unlearner.config = LENIENT
    with monkeypatch.context() as patch:
        patch.setattr(engine, "save_weights_atomically", lambda *a, **k: (_ for _ in ()).throw(Crash()))
        with pytest.raises(Crash):
            unlearner.forget(["r1"], mode="iterative", request_id="B")
    assert world.store.objects.list_dir("forget-journal") == ["B.json"]
    again = restart(world, model_dir)
    assert model_hash(again.model) == on_disk and "r1" in again.store
    assert not again.store.objects.list_dir("forget-journal")


def test_a_crash_between_renaming_the_weights_and_erasing_is_finished(world, tmp_path, monkeypatch):
    model_dir = saved(world, tmp_path)
    crash_before_erasing(world, model_dir, monkeypatch, "C")
    entry = json.loads(world.store.objects.read("forget-journal/C.json"))
    assert set(entry["weights"]) == {"model.safetensors"}  # the staged weights' digests, journaled before renaming
    again = restart(world, model_dir)
    assert again.store.is_erased("r1") and not again.store.objects.list_dir("forget-journal")
    assert [r["request_id"] for r in forget_records(again.store)] == ["C"]


def test_a_commit_whose_erasure_failed_is_finished_when_repeated(world, tmp_path, monkeypatch):
    """The weights were saved, then the erasure raised: repeating the request finishes it (one audit record, the
    original before-state) instead of calibrating again on the model that already forgot."""
    model_dir = saved(world, tmp_path)
    before = model_hash(world.model)
    unlearner = Unlearner(world.model, world.store, model_dir=model_dir, config=LENIENT)
    with monkeypatch.context() as patch:
        patch.setattr(world.store, "erase", lambda *a, **k: (_ for _ in ()).throw(OSError("store unavailable")))
        with pytest.raises(OSError):
            unlearner.forget(["r1"], mode="iterative", request_id="D")
    after = model_hash(world.model)
    assert after != before  # saved: the model stays in its after-state
    report = unlearner.forget(["r1"], mode="iterative", request_id="D")
    assert report.status == "forgotten" and model_hash(world.model) == after
    assert report.model_hash_before == before and report.erasure_receipt
    audit = [r for r in forget_records(world.store) if r["request_id"] == "D"]
    assert len(audit) == 1 and audit[0]["model_hash_before"] == before
    assert audit[0]["erasure_receipt"] == report.erasure_receipt


@pytest.mark.parametrize("crash_at", ["audit", "request_record"])
def test_a_finish_replayed_after_a_late_crash_writes_one_audit_record_and_keeps_the_receipt(
        world, tmp_path, monkeypatch, crash_at):
    model_dir = saved(world, tmp_path)
    unlearner = Unlearner(world.model, world.store, model_dir=model_dir, config=LENIENT)
    objects = world.store.objects
    real_write_new = objects.write_new

    def write_new(key, data):
        if key.startswith("requests/"):
            raise Crash
        return real_write_new(key, data)

    def append_audit(record, **kwargs):
        raise Crash

    with monkeypatch.context() as patch:
        if crash_at == "audit":
            patch.setattr(world.store, "append_audit", append_audit)
        else:
            patch.setattr(objects, "write_new", write_new)
        with pytest.raises(Crash):
            unlearner.forget(["r1"], mode="iterative", request_id="E")
    again = restart(world, model_dir)
    audit = [r for r in forget_records(again.store) if r["request_id"] == "E"]
    assert len(audit) == 1 and audit[0]["erasure_receipt"]
    assert again.forget(["r1"], mode="iterative", request_id="E").erasure_receipt == audit[0]["erasure_receipt"]


def test_a_second_engine_opened_during_a_commit_leaves_its_journal_alone(world, tmp_path, monkeypatch):
    """`gradstore find` started while `gradstore forget` commits must not take the commit for a crashed one."""
    import gradstore_unlearn.unlearn as engine
    from gradstore_unlearn.train import load_model

    model_dir = saved(world, tmp_path)
    unlearner = Unlearner(world.model, world.store, model_dir=model_dir, config=LENIENT)
    real_save = engine.save_weights_atomically
    seen = []

    def save_while_another_opens(model, directory, **kwargs):
        reader, _ = load_model(directory)
        Unlearner(reader, GradStore.open(world.store.uri), model_dir=directory)
        seen.append(world.store.objects.list_dir("forget-journal"))
        real_save(model, directory, **kwargs)
        raise Crash  # and then the committing process dies

    with monkeypatch.context() as patch:
        patch.setattr(engine, "save_weights_atomically", save_while_another_opens)
        with pytest.raises(Crash):
            unlearner.forget(["r1"], mode="iterative", request_id="F")
    assert seen == [["F.json"]]
    again = restart(world, model_dir)
    assert again.store.is_erased("r1") and [r["request_id"] for r in forget_records(again.store)] == ["F"]


@pytest.mark.parametrize("request_id", ["../gradstore", "dsr/2026/42", "", ".hidden", "x" * 129, 7])
def test_request_ids_that_cannot_name_an_object_are_refused(world, request_id):
    unlearner = Unlearner(world.model, world.store, config=LENIENT)
    state = model_hash(world.model)
    with pytest.raises(ForgetError, match="invalid request id"):
        unlearner.forget(["r1"], request_id=request_id)
    assert model_hash(world.model) == state and "r1" in world.store
    assert GradStore.open(world.store.uri).objects.list_dir("forget-journal") == []


def test_one_id_given_as_a_string_is_refused(world):
    with pytest.raises(ForgetError, match="ids must be a list"):
        Unlearner(world.model, world.store, config=LENIENT).forget("r1")


def test_cg_refuses_negative_curvature_instead_of_returning_a_meaningless_answer(world):
    """The trained world's embedding Hessian has negative eigenvalues; a tiny damping does not cover them."""
    from gradstore_unlearn.gradients import InverseHvpError

    unlearner = Unlearner(world.model, world.store)
    sample = list(world.train.values())[10:20]
    with pytest.raises(InverseHvpError, match="not positive definite"):
        unlearner.hvp_influence(world.train["r1"], sample, damping=1e-6, iterations=30)
    with pytest.raises(ForgetError, match="at least 2 tokens"):
        unlearner.hvp_influence([5], sample)


def test_hvp_influence_does_not_depend_on_the_models_training_mode(world):
    for module in world.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    unlearner = Unlearner(world.model, world.store)
    sample = list(world.train.values())[10:14]
    world.model.train()
    first = unlearner.hvp_influence(world.train["r1"], sample, damping=10.0, iterations=5)
    second = unlearner.hvp_influence(world.train["r1"], sample, damping=10.0, iterations=5)
    world.model.eval()
    assert first == second == unlearner.hvp_influence(world.train["r1"], sample, damping=10.0, iterations=5)


def test_bad_text_queries_and_reference_sequences_get_clear_errors(world):
    unlearner = Unlearner(world.model, world.store, tokenizer=SpaceTokenizer())
    with pytest.raises(ForgetError, match="needs at least 3 tokens"):
        unlearner.find("61 39", 0.0, metric="containment")
    with pytest.raises(ForgetError, match="must be a string, got int"):
        unlearner.find(12345)
    with pytest.raises(ForgetError, match="limit must be a positive integer"):
        unlearner.find(" ".join(map(str, world.train["r7"])), limit=0)
    with pytest.raises(InvalidInputError, match=r"holdout sequence 1: token 999 is not in \[0, 96\)"):
        Unlearner(world.model, world.store, holdout=[[1, 2, 3], [1, 999]])
    with pytest.raises(InvalidInputError, match="retain sequence 0: it has fewer than 2 tokens"):
        Unlearner(world.model, world.store, retain=[[4]])


def test_a_record_already_at_its_target_is_erased_without_a_step(world):
    """Its loss already reaches the target (here: the reference set is the record itself, a holdout the engine
    would refuse from a caller): no ascent at all (scale 0), the model unchanged, and the erasure still happens."""
    state = model_hash(world.model)
    save_reference_set(world.store, [world.train["r2"]])
    report = Unlearner(world.model, world.store, config=LENIENT).forget(["r2"])
    assert report.status == "forgotten" and report.scale == 0.0 and world.store.is_erased("r2")
    assert model_hash(world.model) == state


def test_a_huge_initial_scale_is_shrunk_to_where_calibration_from_one_ends(world, tmp_path):
    """From a wild guess (1e30, or one whose learning rates overflow float32 at 1e40) the search used to end
    near scale 0 or raise; it shrinks the guess until admissible and ends where it does from 1."""
    losses = {}
    for initial in (1.0, 1e30, 1e40):
        shutil.copytree(world.store.uri, tmp_path / f"store-{initial:g}")
        unlearner = Unlearner(copy.deepcopy(world.model), GradStore.open(tmp_path / f"store-{initial:g}"),
                              config=ForgetConfig(initial_scale=initial))
        report = unlearner.forget(["r3"])
        losses[initial] = report.forget_loss_after
        assert report.forget_loss_after > 2 * report.forget_loss_before
    assert losses[1e30] == pytest.approx(losses[1.0], rel=0.05) and losses[1e40] == pytest.approx(losses[1.0], rel=0.05)


def test_iterations_count_the_steps_taken(world, monkeypatch):
    """1 for the stored step, plus each fresh step kept: never more fresh steps than fresh gradients computed
    (the count used to be the index of the loop pass that stopped, one more when it stopped at its top)."""
    import gradstore_unlearn.unlearn as engine

    passes = []
    real_iterate, real_gradient = Unlearner._iterate, engine.embedding_gradient

    def iterate(self, *args, **kwargs):
        monkeypatch.setattr(engine, "embedding_gradient", lambda *a, **k: passes.append(1) or real_gradient(*a, **k))
        result = real_iterate(self, *args, **kwargs)
        monkeypatch.setattr(engine, "embedding_gradient", real_gradient)
        passes.append(("kept", result[2]))
        return result

    monkeypatch.setattr(Unlearner, "_iterate", iterate)
    report = Unlearner(world.model, world.store, config=LENIENT).forget(["r1"], mode="iterative")
    (_, kept), gradients = passes[-1], len(passes) - 1
    assert report.status == "forgotten" and 1 <= kept <= gradients and report.iterations == 1 + kept


def test_a_paced_step_may_spend_its_share_of_the_room_left_and_no_more():
    assert paced_limit(1.0, 1.2, 0.25) == pytest.approx(1.05)
    assert paced_limit(1.0, 1.2, 1.0) == paced_limit(1.0, 1.2, 3.0) == pytest.approx(1.2)  # at most all of it
    assert paced_limit(1.3, 1.2, 0.25) == 1.3  # over the limit already: no room, but no pull below where it is


def test_each_step_of_an_iterative_request_spends_at_most_its_share_of_the_guards_room(world, monkeypatch):
    """Every fresh step is accepted only within `step_room` of the room left before it (the stored step within a
    quarter at most), so the room shrinks geometrically and the request takes several small steps, each
    projected anew."""
    import gradstore_unlearn.unlearn as engine

    calls = []
    real = engine.paced_limit
    monkeypatch.setattr(engine, "paced_limit", lambda *args: calls.append(args) or real(*args))
    config = ForgetConfig(retain_tolerance=0.10, step_room=0.3)
    report = Unlearner(world.model, world.store, config=config).forget(["r1"], mode="iterative")
    limit = calls[0][1]
    assert calls[0][2] == 0.25 and all(room == 0.3 for _, _, room in calls[1:])  # the stored step, then fresh
    assert all(bound == limit for _, bound, _ in calls)
    # Each step starts where the last accepted one left the guard: within its room of what was left before it.
    kept = [(a, b, room) for (a, _, room), (b, _, _) in itertools.pairwise(calls) if b != a]
    assert report.iterations >= 3 and len(kept) >= 2
    assert all(b <= a + room * (limit - a) + 1e-9 for a, b, room in kept)
    assert report.retain_loss_after <= limit + 1e-9


@pytest.mark.parametrize(("field", "value", "message"), [
    ("batch_size", 0, "batch_size must be an integer >= 1"),
    ("bisect_steps", "many", "bisect_steps must be an integer >= 0"),
    ("guard", "median", "guard must be 'perplexity' or 'loss'"),
    ("initial_scale", 0.0, "initial_scale must be > 0"),
    ("iterative_step", float("nan"), "iterative_step must be a finite number"),
    ("calibrate", "no", "calibrate must be true or false"),
    ("precondition", "adam", "precondition must be 'none' or 'fisher'"),
    ("fisher_damping", 0.0, "fisher_damping must be > 0"),
    ("projection", "orthogonal", "projection must be 'none' or 'rows'"),
    ("step_room", 0.0, "step_room must be > 0"),
])
def test_every_forget_setting_is_checked_when_the_configuration_is_made(field, value, message):
    with pytest.raises(InvalidInputError, match=message):
        ForgetConfig(**{field: value}).validate()


def test_a_commit_over_weights_another_engine_saved_is_refused(world, tmp_path):
    """Two engines on one model directory each start from the weights they read: the second to commit would
    replace the first one's forget with weights that still know what it erased."""
    from gradstore_unlearn.unlearn import save_weights_atomically

    model_dir = saved(world, tmp_path)
    engine = Unlearner(world.model, world.store, model_dir=model_dir, config=LENIENT)
    elsewhere = copy.deepcopy(world.model)
    with torch.no_grad():
        elsewhere.get_input_embeddings().weight[3] += 1.0
    calibrate = engine._calibrate

    def another_process_commits_meanwhile(*args, **kwargs):
        out = calibrate(*args, **kwargs)
        save_weights_atomically(elsewhere, model_dir)
        record_trained_model(world.store, elsewhere)  # stands for that commit's audit record
        return out

    engine._calibrate = another_process_commits_meanwhile
    before = model_hash(world.model)
    with pytest.raises(ForgetError, match="were replaced since this engine read them"):
        engine.forget(["r1"], mode="iterative")
    assert model_hash(world.model) == before and "r1" in world.store
    assert not world.store.objects.list_dir("forget-journal")
    reloaded = restart(world, model_dir)  # an engine that read the new weights commits
    assert reloaded.forget(["r1"], mode="iterative").status == "forgotten"


def test_a_crash_between_two_shards_is_rolled_forward(world, tmp_path, monkeypatch):
    """Sharded weights are renamed one file at a time: a crash between two leaves a mix, which recovery
    completes from the staging folder (the journal names it and every file's digest)."""
    import functools

    import gradstore_unlearn.unlearn as engine

    model_dir = saved(world, tmp_path)
    unlearner = Unlearner(world.model, world.store, model_dir=model_dir, config=LENIENT)
    monkeypatch.setattr(world.model, "save_pretrained",
                        functools.partial(world.model.save_pretrained, max_shard_size="20KB"))
    renames = []
    real_replace = os.replace

    def replace(src, dst):
        if ".saving-" in str(src):
            renames.append(dst)
            if len(renames) == 2:
                raise Crash
        return real_replace(src, dst)

    monkeypatch.setattr(engine.os, "replace", replace)
    with pytest.raises(Crash):
        unlearner.forget(["r1"], mode="iterative", request_id="S")
    monkeypatch.undo()
    entry = json.loads(world.store.objects.read("forget-journal/S.json"))
    assert len(entry["weights"]) > 2 and (model_dir / entry["staging"]).is_dir()
    again = restart(world, model_dir)
    assert again.store.is_erased("r1") and not any(p.name.startswith(".saving-") for p in model_dir.iterdir())
    assert model_hash(restart(world, model_dir).model) == entry["model_hash_after"]
    assert not (model_dir / "model.safetensors").exists()  # the unsharded file from before: deleted


def test_weight_files_the_new_weights_do_not_name_are_deleted(world, tmp_path):
    """An old `pytorch_model.bin` beside the new weights still holds what the request erased."""
    model_dir = saved(world, tmp_path)
    torch.save(world.model.state_dict(), model_dir / "pytorch_model.bin")
    unlearner = Unlearner(world.model, world.store, model_dir=model_dir, config=LENIENT)
    assert unlearner.forget(["r1"], mode="iterative").status == "forgotten"
    assert sorted(p.name for p in model_dir.iterdir() if p.name.endswith((".bin", ".safetensors"))) == [
        "model.safetensors"]


def test_a_failure_after_the_rename_keeps_the_after_state_in_memory(world, tmp_path, monkeypatch):
    import gradstore_unlearn.unlearn as engine

    model_dir = saved(world, tmp_path)
    unlearner = Unlearner(world.model, world.store, model_dir=model_dir, config=LENIENT)
    real_rmtree = engine.shutil.rmtree
    failed = []

    def rmtree(path, *args, **kwargs):
        if ".saving-" in str(path) and not failed:
            failed.append(path)
            raise OSError(5, "Input/output error")  # cleaning up the staging folder, after every rename
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(engine.shutil, "rmtree", rmtree)
    with pytest.raises(OSError):
        unlearner.forget(["r1"], mode="iterative", request_id="T")
    monkeypatch.undo()
    after = model_hash(world.model)
    assert model_hash(restart(world, model_dir).model) == after  # memory and disk agree: the after-state
    report = unlearner.forget(["r1"], mode="iterative", request_id="T")  # finished, not calibrated again
    assert report.status == "forgotten" and model_hash(world.model) == after
    assert GradStore.open(world.store.uri).is_erased("r1")


def test_an_engine_without_the_model_directory_leaves_its_entries_alone(world, tmp_path, monkeypatch):
    model_dir = saved(world, tmp_path)
    crash_before_erasing(world, model_dir, monkeypatch, "U")
    Unlearner(copy.deepcopy(world.model), GradStore.open(world.store.uri))  # e.g. an influence query
    assert world.store.objects.list_dir("forget-journal") == ["U.json"]
    assert restart(world, model_dir).store.is_erased("r1")


def test_a_crash_right_after_the_erasure_keeps_its_receipt(world, tmp_path, monkeypatch):
    model_dir = saved(world, tmp_path)
    unlearner = Unlearner(world.model, world.store, model_dir=model_dir, config=LENIENT)
    objects = world.store.objects
    real_write = objects.write

    def write(key, data):
        if key.startswith("forget-journal/") and json.loads(data)["report"].get("erasure_receipt"):
            raise Crash  # the erasure returned; its receipt never reached the journal
        return real_write(key, data)

    with monkeypatch.context() as patch:
        patch.setattr(objects, "write", write)
        with pytest.raises(Crash):
            unlearner.forget(["r1"], mode="iterative", request_id="V")
    again = restart(world, model_dir)
    receipt = again.store.tombstone(again.store.id_hash("r1"))["receipt"]
    assert [r["erasure_receipt"] for r in forget_records(again.store) if r["request_id"] == "V"] == [receipt]


def test_a_model_directory_without_a_saved_model_is_refused(world, tmp_path):
    with pytest.raises(InvalidInputError, match="holds no saved model"):
        Unlearner(world.model, world.store, model_dir=tmp_path)


def test_a_dry_run_does_not_wait_for_another_commit(world, tmp_path, monkeypatch):
    """A server runs dry runs beside its own commits (holding its readers' side): waiting there for the commit
    lock would stall every read. A dry run changes nothing, so it skips recovery while the lock is held."""
    import threading

    import gradstore_unlearn.unlearn as engine

    monkeypatch.setattr(engine, "COMMIT_LOCK_TIMEOUT_S", 1.0)
    unlearner = Unlearner(world.model, world.store, config=LENIENT)
    world.store.objects.write("forget-journal/elsewhere.json", json.dumps({
        "format": 2, "request_id": "elsewhere", "model_dir": str(tmp_path / "another-model")}).encode())
    holding, release = threading.Event(), threading.Event()

    def another_commit():
        with GradStore.open(world.store.uri).lock("forget-commit"):
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=another_commit)
    holder.start()
    try:
        assert holding.wait(5)
        assert unlearner.forget(["r1"], dry_run=True).status == "dry_run"
    finally:
        release.set()
        holder.join(10)


def test_a_commit_names_the_uncommitted_changes_it_saves_so_the_hash_chain_stays_whole(world, tmp_path):
    """A request that stops short leaves its change in memory; the next committed request saves it too. Its
    report and audit record name that request and its hashes, so that every saved state is accounted for."""
    model_dir = saved(world, tmp_path)
    trained = model_hash(world.model)
    unlearner = Unlearner(world.model, world.store, model_dir=model_dir,
                          config=ForgetConfig(retain_tolerance=0.002))
    short = unlearner.forget(["r0"], mode="first_epoch", request_id="short")
    assert short.status == "target_not_met" and short.model_hash_before == trained
    assert short.model_hash_after == model_hash(world.model) != trained  # moved toward the target, in memory
    assert short.carries == [] and "r0" in world.store
    unlearner.config = LENIENT
    done = unlearner.forget(["r1"], mode="iterative", request_id="done")
    assert done.status == "forgotten", done.message
    assert done.carries == [{"request_id": "short", "status": "target_not_met",
                             "id_hashes": [world.store.id_hash("r0")], "model_hash_before": trained,
                             "model_hash_after": short.model_hash_after,
                             "forget_loss_before": short.forget_loss_before,
                             "forget_loss_after": short.forget_loss_after,
                             "retain_loss_before": short.retain_loss_before,
                             "retain_loss_after": short.retain_loss_after}]
    assert done.model_hash_before == short.model_hash_after
    (audit,) = forget_records(world.store)
    assert audit["carries"] == done.carries and audit["model_hash_after"] == done.model_hash_after
    assert "short" in done.to_table()
    # The chain: trained -> short (carried) -> done, and the weights on disk are the last link.
    assert model_hash(restart(world, model_dir).model) == done.model_hash_after
    later = unlearner.forget(["r5"], mode="iterative", request_id="later")
    assert later.status == "forgotten" and later.carries == []  # saved once, named once
    chain = verify_audit_chain(world.store, restart(world, model_dir).model)
    assert chain.whole and (chain.commits, chain.carried) == (2, 1), chain.problems
    assert (chain.first_hash, chain.last_hash, chain.model_hash) == (trained, later.model_hash_after,
                                                                     later.model_hash_after)
    # Weights that are not the last commit's, and a record that starts off the chain, are both named.
    stale = verify_audit_chain(world.store, tiny_model())
    assert not stale.whole and "not the ones the last commit saved" in stale.problems[0]
    world.store.append_audit({"kind": "forget", "request_id": "elsewhere", "model_hash_before": "0" * 64,
                              "model_hash_after": "1" * 64})
    broken = verify_audit_chain(world.store)
    assert broken.problems == [f"request elsewhere started from model {'0' * 16}, not "
                               f"{later.model_hash_after[:16]} (the one the change before it left): a change "
                               "between them is not on record"]


def test_a_fixed_step_beyond_the_guard_is_never_built_on_or_saved(world, tmp_path):
    """calibrate=False applies its step as is and leaves it in memory (the ablations evaluate it); a step that
    broke the guard must not become the start, and through a commit the weights on disk, of the next request."""
    model_dir = saved(world, tmp_path)
    trained = copy.deepcopy(world.model.state_dict())
    unlearner = Unlearner(world.model, world.store, model_dir=model_dir,
                          config=ForgetConfig(initial_scale=1e6, calibrate=False))
    fixed = unlearner.forget(["r3"], mode="first_epoch", request_id="fixed")
    assert fixed.status == "target_not_met" and "beyond the guard" in fixed.message
    assert "refuses further requests" in fixed.message
    broken = model_hash(world.model)
    unlearner.config = LENIENT
    with pytest.raises(ForgetError, match="request fixed left beyond the retain guard"):
        unlearner.forget(["r1"], mode="iterative", request_id="next")
    assert model_hash(world.model) == broken and "r1" in world.store and not forget_records(world.store)
    with pytest.raises(ForgetError, match="request fixed left beyond the retain guard"):  # a preview alike
        unlearner.forget(["r1"], dry_run=True)
    with torch.no_grad():
        world.model.load_state_dict(trained)  # loaded again: the broken step is gone, requests run
    done = unlearner.forget(["r1"], mode="iterative", request_id="next")
    assert done.status == "forgotten" and done.carries == []
    assert model_hash(restart(world, model_dir).model) == done.model_hash_after


def test_a_change_dropped_by_reloading_the_weights_is_not_claimed_as_carried(world):
    """A server loads its published weights before each request: what a short request left is gone then."""
    trained = copy.deepcopy(world.model.state_dict())
    unlearner = Unlearner(world.model, world.store, config=ForgetConfig(retain_tolerance=0.002))
    assert unlearner.forget(["r0"], mode="first_epoch").status == "target_not_met"
    with torch.no_grad():
        world.model.load_state_dict(trained)
    unlearner.config = LENIENT
    done = unlearner.forget(["r1"], mode="iterative")
    assert done.status == "forgotten" and done.carries == []
    assert forget_records(world.store)[0]["carries"] == []


def test_the_fisher_preconditioner_divides_by_the_retained_examples_fisher(world):
    """precondition="fisher": each ascent element is divided by the retained pool's diagonal Fisher (plus the
    damping): the elements the retained examples are most sensitive to move least, including on the output side."""
    from gradstore_unlearn.gradients import retain_fisher

    pool = [world.train[k] for k in ("r10", "r11", "r12")]
    fisher = retain_fisher(world.model, pool)
    # Weighted per example (a zero weight leaves a sequence out), and each example adds mass of its own.
    single = retain_fisher(world.model, pool[:1])
    assert torch.equal(retain_fisher(world.model, pool, [1.0, 0.0, 0.0]), single)
    assert bool((fisher >= single).all()) and float(fisher.sum()) > float(single.sum()) > 0
    # Output side included: rows of tokens no pooled sequence contains still have Fisher mass (their logits).
    vocab = world.model.get_input_embeddings().weight.shape[0]
    unused = sorted(set(range(vocab)) - {t for s in pool for t in s})
    assert float(fisher[unused].sum()) > 0
    unlearner = Unlearner(world.model, world.store, config=ForgetConfig(retain_tolerance=0.10, precondition="fisher",
                                                                       fisher_damping=0.5))
    inverse = unlearner._preconditioner(pool)
    expected = 1.0 / (fisher / 3 + 0.5 * float((fisher / 3).mean()))
    assert torch.allclose(inverse, expected / expected.mean(), rtol=1e-5)
    assert Unlearner(world.model, world.store, config=LENIENT)._preconditioner(pool) is None
    report = unlearner.forget(["r1"], mode="iterative")
    assert report.status == "forgotten", report.message
    assert report.retain_loss_after <= report.retain_loss_before * 1.10 + 1e-9


def test_both_kinds_of_step_are_multiplied_by_the_preconditioner(world, monkeypatch):
    """A preconditioner that is zero outside a few rows: the stored step and the fresh steps move those rows only."""
    tokens = sorted(set(world.train["r1"]))[:4]
    weight = world.model.get_input_embeddings().weight
    only = torch.zeros_like(weight, dtype=torch.float32)
    only[tokens] = 1.0
    monkeypatch.setattr(Unlearner, "_preconditioner", lambda self, pool: only)
    before = weight.detach().clone()
    report = Unlearner(world.model, world.store, config=LENIENT).forget(["r1"], mode="iterative")
    assert report.scale > 0 and report.iterations > 1, report  # both kinds of step were taken...
    moved = (weight.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert moved and set(moved) <= set(tokens)  # ...and neither moved a row the preconditioner zeroes


def test_the_projection_drops_only_the_part_of_a_row_that_raises_the_pool_loss():
    """Row by row: a step whose dot product with the pool's gradient is positive keeps its orthogonal part; a
    step that lowers the pool's loss (or meets a zero gradient row) is left as it is."""
    from gradstore_unlearn.unlearn import _without_conflict

    gen = torch.Generator().manual_seed(0)
    step, gradient = torch.randn(64, 7, generator=gen), torch.randn(64, 7, generator=gen)
    gradient[:5] = 0.0
    projected = _without_conflict(step, gradient)
    conflicting = (step * gradient).sum(dim=1) > 0
    assert 10 < int(conflicting.sum()) < 54  # both kinds of row are there
    assert torch.allclose((projected * gradient).sum(dim=1)[conflicting], torch.zeros(int(conflicting.sum())),
                          atol=1e-5)
    assert torch.equal(projected[~conflicting], step[~conflicting])
    # What is dropped lies along the gradient: the orthogonal part is untouched.
    removed = step - projected
    assert torch.allclose(removed, gradient * ((removed * gradient).sum(1, keepdim=True)
                                               / gradient.square().sum(1, keepdim=True).clamp_min(1e-30)), atol=1e-6)


def test_the_stored_step_is_projected_as_the_sum_the_kernel_makes():
    """The kernel adds every example's row of a token into one row of W: it is that lr-weighted sum that is
    projected (exactly), not each example's row alone (which would also drop what cancels between examples)."""
    from gradstore_unlearn.unlearn import _project_stored_rows, _without_conflict

    gen = torch.Generator().manual_seed(2)
    vocab, width = 9, 5
    offsets = torch.tensor([0, 4, 6, 11], dtype=torch.int64)  # three examples of 4, 2 and 5 rows
    tokens = torch.tensor([0, 1, 2, 3, 1, 4, 1, 2, 5, 6, 7], dtype=torch.int32)
    rows, gradient = torch.randn(11, width, generator=gen), torch.randn(vocab, width, generator=gen)
    lrs = torch.tensor([0.5, 2.0, 0.0])  # the third example's rows move nothing, projected or not

    def kernel_sum(r):
        rate = torch.repeat_interleave(lrs, offsets[1:] - offsets[:-1])
        return torch.zeros(vocab, width).index_add_(0, tokens.long(), r * rate[:, None])

    projected = _project_stored_rows(rows, offsets, tokens, lrs, gradient)
    assert torch.allclose(kernel_sum(projected), _without_conflict(kernel_sum(rows), gradient), atol=1e-5)
    assert torch.equal(projected[8:], rows[8:])  # tokens only a zero-lr example holds: nothing to correct
    # Each entry of a token is corrected alike, along that token's gradient row.
    moved = (projected - rows)[tokens.long() == 1]
    assert float(moved.abs().sum()) > 0 and torch.allclose(moved, moved[:1].expand_as(moved), atol=1e-6)
    assert torch.allclose(moved[0] / moved[0].norm(), -gradient[1] / gradient[1].norm(), atol=1e-5)


def test_the_examples_of_carried_changes_stay_out_of_the_pool_and_the_guard(world, monkeypatch):
    """A stopped-short request's examples are being forgotten too (the next commit saves that change): the next
    request's pool must not hold their loss down, nor its guard count their rise as damage."""
    drawn = []
    original = Unlearner._retain_samples

    def keep(self, *args, **kwargs):
        pool, guard = original(self, *args, **kwargs)
        drawn.append([tuple(s) for s in pool + guard.sequences])
        return pool, guard

    monkeypatch.setattr(Unlearner, "_retain_samples", keep)
    unlearner = Unlearner(world.model, world.store, config=ForgetConfig(retain_tolerance=0.002, retain_sample=200))
    short = unlearner.forget(["r0"], mode="first_epoch", request_id="short")
    assert short.status == "target_not_met"
    unlearner.forget(["r1"], mode="first_epoch", request_id="next")
    r0, r1 = tuple(world.train["r0"]), tuple(world.train["r1"])
    assert r1 in drawn[0] and r0 not in drawn[0]  # the first request's sample: every other example
    assert r0 not in drawn[1] and r1 not in drawn[1] and len(drawn[1]) == len(drawn[0]) - 1


def test_the_pool_gradient_is_of_the_whole_tied_matrix(world):
    """matrix_gradient: the gradient of the pool's mean loss w.r.t. the tied matrix, so output-side rows count."""
    from gradstore_unlearn.gradients import matrix_gradient, own_mean_losses

    pool = [world.train[k] for k in ("r10", "r11", "r12")]
    weight = world.model.get_input_embeddings().weight
    gradient = matrix_gradient(world.model, pool, batch_size=2)
    world.model.eval()
    expected = torch.zeros_like(gradient)
    for sequence in pool:
        ids = torch.tensor([sequence])
        (g,) = torch.autograd.grad(own_mean_losses(world.model, ids, torch.ones_like(ids)).sum() / 3, [weight])
        expected += g
    assert torch.allclose(gradient, expected, atol=1e-6)
    unused = sorted(set(range(weight.shape[0])) - {t for s in pool for t in s})
    assert float(gradient[unused].abs().sum()) > 0  # rows of tokens no pooled sequence contains: their logits


@pytest.mark.parametrize("projection", ["rows", "none"])
@pytest.mark.parametrize("mode", ["first_epoch", "iterative"])
def test_both_kinds_of_step_are_projected_against_the_pool_and_not_the_guard(world, monkeypatch, mode, projection):
    """With a fixed pool gradient, no row of the whole change raises the pool's loss to first order: the stored
    step and every fresh step were projected. The gradient is read on the pool, never on the guard. Unprojected
    (projection="none"), the same change does raise it along some rows, and no pool gradient is read."""
    import gradstore_unlearn.unlearn as engine

    weight = world.model.get_input_embeddings().weight
    fixed = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    pools, guards = [], []

    def pool_gradient(model, sequences, **kwargs):
        pools.append([list(s) for s in sequences])
        return fixed

    original = Unlearner._retain_samples

    def keep_guard(self, *args, **kwargs):
        pool, guard = original(self, *args, **kwargs)
        guards.append(guard.sequences)
        return pool, guard

    monkeypatch.setattr(engine, "matrix_gradient", pool_gradient)
    monkeypatch.setattr(Unlearner, "_retain_samples", keep_guard)
    before = weight.detach().clone()
    config = ForgetConfig(retain_tolerance=0.10, projection=projection)
    report = Unlearner(world.model, world.store, config=config).forget(["r1"], mode=mode)
    assert report.scale > 0 and (report.iterations > 1) == (mode == "iterative"), report
    change = weight.detach() - before
    raised = float((change * fixed).sum(dim=1).max())
    if projection == "none":
        assert raised > 1e-3 * float(change.norm()) and not pools
        return
    assert raised <= 1e-6 * float(change.norm())
    assert pools and all(p == pools[0] for p in pools) and len(pools) >= report.iterations  # one per step
    assert not {tuple(s) for s in pools[0]} & {tuple(s) for s in guards[0]}
    assert world.train["r1"] not in pools[0]  # never the example being forgotten


def test_a_fisher_that_is_not_finite_is_refused_and_changes_nothing(world, monkeypatch):
    import gradstore_unlearn.unlearn as engine

    monkeypatch.setattr(engine, "retain_fisher", lambda model, pool, **kw: torch.full_like(
        model.get_input_embeddings().weight, float("nan")))
    before = model_hash(world.model)
    unlearner = Unlearner(world.model, world.store, config=ForgetConfig(precondition="fisher"))
    with pytest.raises(ForgetError, match="Fisher is not finite"):
        unlearner.forget(["r1"], mode="iterative")
    assert model_hash(world.model) == before and "r1" in world.store


def test_a_retain_pool_of_one_example_only_judges(world):
    """With one retained example there is nothing to split: it is the guard, and repairs and weighs nothing."""
    unlearner = Unlearner(world.model, world.store, retain=[world.train["r9"]], config=LENIENT)
    ownership = unlearner._ownership([world.train["r1"]])
    pool, guard = unlearner._retain_samples({"r1"}, ownership, pooling=True)
    assert pool == [] and guard.sequences == [world.train["r9"]]


def test_a_drift_budget_does_not_change_which_examples_are_pooled(world):
    """The budget's panel is a random sample of the retained examples, pooled ones among them in their share: it
    reads their mean loss without bias. Kept out of the pool, it would sample the unprotected examples only, which
    read higher than the mean over all of them (benchmarks/results/sequential_requests_cpu_panel-kept-out-of-pool.json)."""
    unlearner = Unlearner(world.model, world.store)
    ownership = unlearner._ownership([world.train["r1"]])
    pool = unlearner._retain_samples({"r1"}, ownership, True)[0]
    unlearner.set_drift_budget(0.05, panel=20)
    assert unlearner._retain_samples({"r1"}, ownership, True)[0] == pool


def test_retain_sequences_of_examples_being_forgotten_are_left_out(world, caplog):
    """A caller who passes every training sequence as `retain` would otherwise have the guard and the pool hold
    the forgotten examples' loss down: sequences equal to an example being forgotten (this request's, or a
    carried change's) are dropped, and the log says how many."""
    retain = [world.train[k] for k in ("r0", "r1", "r2", "r3", "r4", "r5")]
    unlearner = Unlearner(world.model, world.store, retain=retain)
    ownership = unlearner._ownership([world.train["r1"]])
    with caplog.at_level("WARNING", logger="gradstore_unlearn"):
        pool, guard = unlearner._retain_samples({"r1"}, ownership, True)
    assert world.train["r1"] not in pool + guard.sequences and len(pool + guard.sequences) == 5
    assert "1 of the 6 retain sequences" in caplog.text
    unlearner._uncommitted.append({"request_id": "short", "id_hashes": [world.store.id_hash("r0")]})
    pool, guard = unlearner._retain_samples({"r1"}, ownership, True)
    assert pool and guard and all(s in retain[2:] for s in pool + guard.sequences)


def assert_one_positive_factor(original: dict, moved: dict, names: list[str], grads: list) -> None:
    """Each named parameter moved by its gradient times one factor shared by all of them (a joint step)."""
    factors = []
    for name, grad in zip(names, grads, strict=True):
        if float(grad.norm()) > 1e-6 * float(original[name].detach().norm()):
            delta = (moved[name] - original[name]).detach()
            factors.append(float((delta * grad).sum() / (grad * grad).sum()))
            assert torch.allclose(delta, factors[-1] * grad, atol=1e-6, rtol=1e-3), name
    assert len(factors) > 4 and max(factors) == pytest.approx(min(factors), rel=1e-3) and min(factors) > 0


def test_the_layers_ablation_takes_one_joint_gradient_step_on_the_chosen_blocks(world):
    """layers="last2": the embedding and the last two blocks move, nothing else; the blocks by plain gradient
    ascent on their fresh gradients with one common factor (one joint step, not one normalised step per tensor)."""
    from gradstore_unlearn.gradients import embedding_gradient

    original = copy.deepcopy(world.model)
    names = dict(original.named_parameters())
    blocks = [n for n in names if ".h." in n]  # this model has one block: "the last two" are all of them
    _, grads = embedding_gradient(original, [world.train["r1"]], params=[names[n] for n in blocks])
    report = Unlearner(world.model, world.store, config=ForgetConfig(retain_tolerance=0.10, layers="last2")
                       ).forget(["r1"], mode="first_epoch")
    assert report.scale > 0 and report.forget_loss_after > report.forget_loss_before
    moved = dict(world.model.named_parameters())
    for name, param in names.items():
        if name not in blocks and "wte" not in name:
            assert torch.equal(moved[name], param), name  # outside the chosen layers: untouched
    assert_one_positive_factor(names, moved, blocks, grads)


def test_the_commit_lock_is_reentrant_for_its_thread_only(world):
    import threading
    import time

    unlearner = Unlearner(world.model, world.store, config=LENIENT)
    entered = threading.Event()

    def other_thread() -> None:
        with unlearner.commit_lock():
            entered.set()

    with unlearner.commit_lock():
        with unlearner.commit_lock():  # the same thread: no second acquisition, no deadlock
            pass
        waiter = threading.Thread(target=other_thread)
        waiter.start()
        time.sleep(0.5)
        assert not entered.is_set()  # another thread (a second job on the same engine) waits for the lock
    waiter.join(timeout=30)
    assert entered.is_set()


def test_the_fresh_steps_of_the_layers_ablation_are_joint_gradient_steps(world, monkeypatch):
    """One fresh step (no stored step): the blocks move by their fresh gradient times one common factor."""
    from gradstore_unlearn.gradients import embedding_gradient

    original = copy.deepcopy(world.model)
    names = dict(original.named_parameters())
    blocks = [n for n in names if ".h." in n]
    _, grads = embedding_gradient(original, [world.train["r1"]], params=[names[n] for n in blocks])
    monkeypatch.setattr(Unlearner, "_search", lambda self, apply, target, admissible, initial: (0.0, apply(0.0)))
    config = ForgetConfig(retain_tolerance=0.10, layers="last2", max_iterations=1, iterative_step=0.002)
    report = Unlearner(world.model, world.store, config=config).forget(["r1"], mode="iterative")
    assert report.scale == 0 and report.iterations == 2, report  # the stored step took none, one fresh step kept
    moved = dict(world.model.named_parameters())
    assert_one_positive_factor(names, moved, blocks, grads)


def test_a_commit_between_its_weights_and_its_audit_record_is_a_pending_link(world, tmp_path, monkeypatch):
    """The weights of a commit that died before its audit record (or is writing it now) are on record in the
    forget journal: the chain is whole, with that request pending, until an engine finishes it."""
    from gradstore_unlearn.train import load_model

    model_dir = saved(world, tmp_path)
    crash_before_erasing(world, model_dir, monkeypatch, "P")
    read_only = GradStore.open(world.store.uri, read_only=True)
    chain = verify_audit_chain(read_only, load_model(model_dir)[0])
    assert chain.whole and chain.pending == ["P"] and chain.commits == 0, chain.problems
    restart(world, model_dir)  # recovery finishes it: an audit record, nothing pending
    chain = verify_audit_chain(read_only, load_model(model_dir)[0])
    assert chain.whole and chain.pending == [] and chain.commits == 1


def test_recovery_inside_the_threads_own_commit_lock_does_not_wait_on_itself(world, tmp_path, monkeypatch):
    import gradstore_unlearn.unlearn as engine

    model_dir = saved(world, tmp_path)
    again = restart(world, model_dir)  # nothing to recover yet
    crash_before_erasing(world, model_dir, monkeypatch, "Q")  # another engine dies in the middle of a commit
    monkeypatch.setattr(engine, "COMMIT_LOCK_TIMEOUT_S", 2.0)  # a self-deadlock fails fast instead of hanging
    with again.commit_lock():
        assert again.recover() == ["Q"]  # (a forget in here recovers first, the same way)
    assert not again.store.objects.list_dir("forget-journal")


def test_a_huge_but_finite_fisher_still_gives_a_usable_preconditioner(world, monkeypatch):
    import gradstore_unlearn.unlearn as engine

    monkeypatch.setattr(engine, "retain_fisher", lambda model, pool, **kw: torch.full_like(
        model.get_input_embeddings().weight, 3e38))
    unlearner = Unlearner(world.model, world.store, config=ForgetConfig(precondition="fisher"))
    inverse = unlearner._preconditioner([world.train["r9"], world.train["r8"]])
    assert inverse.dtype == torch.float32 and torch.equal(inverse, torch.ones_like(inverse))


def test_reloading_an_earlier_uncommitted_state_keeps_the_changes_before_it(world, tmp_path):
    model_dir = saved(world, tmp_path)
    unlearner = Unlearner(world.model, world.store, model_dir=model_dir,
                          config=ForgetConfig(retain_tolerance=0.002))
    first = unlearner.forget(["r0"], mode="first_epoch", request_id="first")
    kept = copy.deepcopy(world.model.state_dict())
    second = unlearner.forget(["r2"], mode="first_epoch", request_id="second")
    assert first.status == second.status == "target_not_met" and second.model_hash_after != first.model_hash_after
    with torch.no_grad():
        world.model.load_state_dict(kept)  # back to what the first one left: the second's change is gone
    unlearner.config = LENIENT
    done = unlearner.forget(["r1"], mode="iterative", request_id="done")
    assert done.status == "forgotten" and [c["request_id"] for c in done.carries] == ["first"]
    assert verify_audit_chain(world.store, restart(world, model_dir).model).whole


def test_the_audit_chain_starts_at_the_model_training_recorded(world, built, tmp_path):
    (trained,) = [r for r in world.store.audit_log() if r["kind"] == "trained"]
    assert trained["model_hash"] == model_hash(world.model)  # train_model recorded it as training ended
    chain = verify_audit_chain(world.store, world.model)
    assert chain.whole and chain.trained_hash == chain.first_hash == trained["model_hash"] and chain.last_hash is None
    # Weights changed with no forget on record: the break is named against the trained model.
    other = tiny_model(seed=3)
    assert f"are not the trained model's ({trained['model_hash'][:16]})" in verify_audit_chain(
        world.store, other).problems[0]
    # A first forget that started elsewhere (say from weights tuned after training) breaks the chain too.
    world.store.append_audit({"kind": "forget", "request_id": "x", "id_hashes": [], "model_hash_before": "0" * 64,
                              "model_hash_after": "1" * 64})
    (problem,) = verify_audit_chain(world.store).problems
    assert "request x started from model 0000000000000000" in problem and "(the trained model)" in problem
    # Training again into the store starts the chain again from the model it ended with.
    train_model(other, [record(100 + i) for i in range(4)], [f"late{i}" for i in range(4)],
                TrainConfig(epochs=1, batch_size=4, pad_token_id=0), store=world.store, progress=False)
    again = verify_audit_chain(world.store, other)
    assert again.trained_hash == again.first_hash == model_hash(other) and again.problems == [problem]
    assert again.commits == 0 and again.last_hash is None  # counted from the newest training


def test_the_trained_model_is_recorded_through_its_wrapper(world):
    from gradstore_unlearn.unlearn import record_trained_model

    class Wrapped(torch.nn.Module):  # as DDP wraps a model: its parameter names gain a "module." prefix
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert model_hash(Wrapped(world.model)) != model_hash(world.model)
    assert record_trained_model(world.store, Wrapped(world.model)) == model_hash(world.model)
    assert world.store.audit_log()[-1]["model_hash"] == model_hash(world.model)


def test_a_model_the_store_was_not_captured_from_is_never_recorded_or_adopted(world):
    """The audit chain must not start (or go on) at a model no forget on this store could act on."""
    from gradstore_unlearn.unlearn import adopt_model, record_trained_model

    wider = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=48,
                                                                 n_layer=1, n_head=2))
    before = world.store.audit_log()
    for write in (record_trained_model, adopt_model):
        with pytest.raises(InvalidInputError, match=r"dim 32, vocab 96\) was not captured from this model \(embedding \(96, 48\)"):
            write(world.store, wider)
    assert world.store.audit_log() == before


def test_a_model_that_is_not_where_the_audit_log_ends_is_refused_until_adopted(world, tmp_path):
    """An older copy of the model (here: the trained one, after a committed forget) must not forget: its commit
    would erase the rows, and the model on record, which still knows those examples, could never forget them."""
    from gradstore_unlearn.unlearn import adopt_model, audit_head

    old_copy = copy.deepcopy(world.model)
    model_dir = saved(world, tmp_path)
    first = Unlearner(world.model, world.store, model_dir=model_dir, config=LENIENT).forget(["r1"], mode="iterative")
    assert first.status == "forgotten" and audit_head(world.store) == first.model_hash_after
    stale = Unlearner(old_copy, world.store, config=LENIENT)
    for dry_run in (False, True):  # a preview is refused alike
        with pytest.raises(ForgetError, match="is not the one the store's audit log ends at"):
            stale.forget(["r2"], mode="iterative", dry_run=dry_run)
    assert "r2" in world.store and not world.store.is_erased("r2")
    # The old copy is an earlier state on the record: it still knows r1, and cannot be adopted.
    with pytest.raises(ForgetError, match="is an earlier state on the store's audit record"):
        adopt_model(world.store, old_copy)
    # A model changed off the record from where the log ends (fine-tuned, say) is adopted, and the audit says so.
    tuned = copy.deepcopy(world.model)
    with torch.no_grad():
        tuned.get_input_embeddings().weight[3] += 0.01
    with pytest.raises(ForgetError, match="is not the one the store's audit log ends at"):
        Unlearner(tuned, world.store, config=LENIENT).forget(["r2"], mode="iterative", dry_run=True)
    adopted = adopt_model(world.store, tuned)
    assert adopt_model(world.store, tuned) == adopted == audit_head(world.store)  # once
    assert Unlearner(tuned, world.store, config=LENIENT).forget(["r2"], mode="iterative").status in (
        "forgotten", "target_not_met")  # not refused
    chain = verify_audit_chain(world.store)
    assert chain.whole and chain.adopted == [{"model_hash": adopted, "previous_head": first.model_hash_after}]
    assert f"adopted model {adopted[:16]}, changed off the record from {first.model_hash_after[:16]}" in chain.summary()


def test_a_holdout_of_trained_sequences_is_refused(world):
    """A caller's holdout holding a stored example's sequence would make a target the forgotten examples already
    meet: the request would erase them without forgetting anything."""
    holdout = [world.holdout[0], world.train["r3"]]
    unlearner = Unlearner(world.model, world.store, holdout=holdout, config=LENIENT)
    state = model_hash(world.model)
    for dry_run in (True, False):
        with pytest.raises(ForgetError, match=r"holdout sequence 1 .* is the token sequence of a stored example"):
            unlearner.forget(["r1"], dry_run=dry_run)
    assert "r1" in world.store and model_hash(world.model) == state
    fine = Unlearner(world.model, world.store, holdout=world.holdout, config=LENIENT)
    assert fine.forget(["r1"], dry_run=True).status == "dry_run"


def test_a_report_that_stopped_short_does_not_call_its_examples_forgotten():
    report = ForgetReport("q", "target_not_met", "first_epoch", ids=["a"], model_hash_before="0" * 64,
                          model_hash_after="1" * 64)
    table = report.to_table()
    assert "examples not forgotten (target not met)" in table and "examples forgotten" not in table
    assert "in memory only: nothing saved or erased" in table
    assert "examples it would forget" in ForgetReport("q", "dry_run", "first_epoch", ids=["a"]).to_table()


def test_adoption_refuses_states_a_commit_came_after_and_allows_a_rollback_before_any(world, tmp_path):
    from gradstore_unlearn.unlearn import FORGET_JOURNAL, adopt_model, audit_head, on_audit_record

    trained = model_hash(world.model)

    def tuned(model, row):
        out = copy.deepcopy(model)
        with torch.no_grad():
            out.get_input_embeddings().weight[row] += 0.01
        return out

    # No commit yet: adopting a tuned model and then rolling back to the trained one are both fine.
    first = tuned(world.model, 3)
    adopt_model(world.store, first)
    assert adopt_model(world.store, world.model) == trained == audit_head(world.store)
    # A commit, then another adoption and another commit: the state the first commit left is stale now.
    engine = Unlearner(world.model, world.store, config=LENIENT)
    after_r1 = engine.forget(["r1"], mode="iterative")
    assert after_r1.status == "forgotten"
    second = tuned(world.model, 4)
    adopt_model(world.store, second)
    assert Unlearner(second, world.store, config=LENIENT).forget(["r3"], mode="iterative").status == "forgotten"
    for stale in (world.model, first):  # before r3's commit (the first adopted one: before r1's as well)
        with pytest.raises(ForgetError, match="forgets were committed after it"):
            adopt_model(world.store, stale)
    # A commit pending in the forget journal: its after-state counts as on record, and adoption waits for it.
    head = audit_head(world.store)
    world.store.objects.write(f"{FORGET_JOURNAL}/p.json", json.dumps(
        {"request_id": "p", "model_hash_before": head, "model_hash_after": "9" * 64, "report": {}}).encode())
    assert on_audit_record(world.store, "9" * 64) and on_audit_record(world.store, head)
    assert not on_audit_record(world.store, trained)
    with pytest.raises(ForgetError, match="a forget commit is pending"):
        adopt_model(world.store, tuned(second, 5))
