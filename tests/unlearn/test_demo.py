"""The main job, `gradstore demo`, end to end on a corpus small enough for seconds, and its pass/fail checks."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
from forget_setup import forget_records

from gradstore import GradStore
from gradstore_unlearn import data, demo
from gradstore_unlearn.train import load_model
from gradstore_unlearn.unlearn import model_hash


@pytest.fixture
def micro(monkeypatch):
    # The demo's own code path at a size that trains in seconds: the numbers mean nothing, the plumbing does.
    # (max_tokens 192 as in "tiny": every record fits, its canary included.)
    spec = demo.DemoSize(data.CorpusSize(12, 40, 200, 400, 192), "tiny", 2, 5e-3, 8, 2)
    monkeypatch.setitem(demo.DEMO_SIZES, "micro", spec)
    return "micro"


def test_the_demo_runs_end_to_end_and_reports_what_it_measured(micro, tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="gradstore_unlearn"):
        report = demo.run_demo(tmp_path / "out", micro, device="cpu", progress=False)
    assert "canary prefix" not in caplog.text  # every canary is scored on its whole prefix
    out = tmp_path / "out"
    assert json.loads((out / "report.json").read_text())["checks"] == report["checks"]
    assert (out / "model" / "model.safetensors").exists()
    assert [c["check"].split(" ")[0] for c in report["checks"]] == ["forgotten", "forgotten", "retain", "membership"]
    requests = report["requests"]
    assert requests[0]["request_id"] == "demo-by-id"
    for request in requests:
        assert request["status"] in ("forgotten", "target_not_met")
        assert len(request["examples"]) == len(request["ids"])
    # What was committed is gone from the store; what was not is still there.
    store = GradStore.open(out / "store")
    for request in requests:
        for key in request["ids"]:
            assert (key in store) == (request["status"] != "forgotten")
    # The audit chain: from the trained model, through every committed request (and the uncommitted changes each
    # commit carried), to the weights on disk.
    (trained,) = [r for r in store.audit_log() if r["kind"] == "trained"]  # recorded as training ended
    chain = trained["model_hash"]
    assert requests[0]["model_hash_before"] == chain == report["audit_chain"]["trained_hash"]
    for record in forget_records(store):
        for link in [*record["carries"], record]:
            assert link["model_hash_before"] == chain
            chain = link["model_hash_after"]
    assert model_hash(load_model(out / "model")[0]) == chain
    assert report["audit_chain"]["whole"] and report["audit_chain"]["last_hash"] in (chain, None)
    printed = capsys.readouterr().out
    assert "Does it forget?" in printed and "below own target" in printed
    with pytest.raises(FileExistsError):  # a second run never mixes into the first one's store
        demo.run_demo(out, micro, device="cpu", progress=False)


def _evaluation(mia_auc: float, retain_ppl: float = 10.0) -> SimpleNamespace:
    return SimpleNamespace(holdout_exposure_median=1.0, holdout_exposures=[0.5, 1.0, 1.5, 2.0],
                           forget_exposure_mean=1.0, retain_ppl=retain_ppl, mia_auc_loss=mia_auc)


@pytest.mark.parametrize(("auc", "passed"), [(0.5, True), (0.74, True), (0.9, False), (0.26, True), (0.1, False)])
def test_the_membership_check_is_two_sided(auc, passed):
    # Forgotten records that look *less* like members than never-seen ones give themselves away as well.
    checks = demo._checks(_evaluation(1.0), _evaluation(auc), ks_pvalue=0.5)
    (membership,) = [c for c in checks if c["check"].startswith("membership")]
    assert membership["passed"] is passed


def test_the_retain_check_reads_the_perplexity_change_both_ways():
    checks = demo._checks(_evaluation(0.5, 10.0), _evaluation(0.5, 10.3), ks_pvalue=0.5)
    (retain,) = [c for c in checks if c["check"].startswith("retain")]
    assert retain["value"] == "+3.00%" and retain["passed"] is False
    checks = demo._checks(_evaluation(0.5, 10.0), _evaluation(0.5, 9.9), ks_pvalue=0.5)
    assert next(c for c in checks if c["check"].startswith("retain"))["passed"] is True
    checks = demo._checks(_evaluation(0.5, 10.0), _evaluation(0.5, 9.7), ks_pvalue=0.5)
    assert next(c for c in checks if c["check"].startswith("retain"))["passed"] is False
