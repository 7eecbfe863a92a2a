"""Job journal recovery, from states a crash leaves behind (built here in-process; the SIGKILL test is
`test_crash.py`): every pending job completes or is rolled back, the model on disk is the before- or the
after-state, and the store agrees with it."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from fastapi.testclient import TestClient
from server_support import API_KEY, COMMIT_FORGET, wait_job

from gradstore import GradStore
from gradstore_server import create_app
from gradstore_unlearn import unlearn
from gradstore_unlearn.train import load_model
from gradstore_unlearn.unlearn import ForgetConfig, Unlearner, model_hash


def pending_record(store: GradStore, ids: list, *, status: str, attempts: int, request_id: str | None = None) -> dict:
    """A job record as the server journals it, left `queued` or `running` by a crash."""
    job_id = uuid.uuid4().hex
    record = {"job_id": job_id, "request_id": request_id or job_id, "kind": "forget", "mode": "first_epoch",
              "dry_run": False, "source": "ids", "n_ids": len(ids), "id_hashes": [store.id_hash(i) for i in ids],
              "fingerprint": "x", "attempts": attempts, "submitted_at": time.time(),
              "started_at": time.time() if status == "running" else None, "finished_at": None, "result": None,
              "error": None, "status": status, "pending_ids": ids}
    store.objects.write(f"jobs/{job_id}.json", json.dumps(record).encode())
    store.objects.write(f"jobs/by-request/{record['request_id']}.json", json.dumps({"job_id": job_id}).encode())
    return record


def disk_hash(workspace) -> str:
    model, _ = load_model(workspace.model)
    return model_hash(model)


def serve(workspace, **settings):
    return TestClient(create_app(workspace.settings(**settings)), headers={"X-API-Key": API_KEY})


@pytest.mark.parametrize(("status", "attempts"), [("queued", 0), ("running", 1)])
def test_pending_jobs_run_after_a_restart(workspace, status, attempts):
    store = GradStore.open(workspace.store)
    record = pending_record(store, [20, "rec-0"], status=status, attempts=attempts)
    before = disk_hash(workspace)
    with serve(workspace) as client:
        job = wait_job(client, record["job_id"])
        assert job["status"] == "completed" and job["attempts"] == attempts + 1
        assert job["result"]["model_hash_before"] == before
        assert job["result"]["status"] == "forgotten"
        assert disk_hash(workspace) == job["result"]["model_hash_after"]
        assert client.get("/v1/stats").json()["model"]["hash"] == disk_hash(workspace)


def test_a_job_that_keeps_crashing_is_rolled_back(workspace):
    store = GradStore.open(workspace.store)
    record = pending_record(store, [21], status="running", attempts=2)
    before = disk_hash(workspace)
    with serve(workspace, job_max_attempts=2) as client:
        job = client.get(f"/v1/jobs/{record['job_id']}").json()
        assert job["status"] == "rolled_back" and job["error"]["code"] == "interrupted"
        assert job["result"] is None and job["ids"] is None
        assert client.get("/v1/examples/21").status_code == 200  # nothing was erased
    assert disk_hash(workspace) == before
    assert "pending_ids" not in json.loads(store.objects.read(f"jobs/{record['job_id']}.json"))


def test_a_job_the_library_committed_is_completed_from_its_record(workspace):
    # The crash came after the library wrote requests/<id>.json but before the job record was updated.
    model, tokenizer = load_model(workspace.model)
    store = GradStore.open(workspace.store)
    report = Unlearner(model, store, tokenizer=tokenizer, model_dir=workspace.model,
                       config=ForgetConfig(**COMMIT_FORGET)).forget([22], request_id="r-22")
    assert report.status == "forgotten"
    record = pending_record(store, [22], status="running", attempts=1, request_id="r-22")
    with serve(workspace) as client:
        job = client.get(f"/v1/jobs/{record['job_id']}").json()
        assert job["status"] == "completed" and job["attempts"] == 1
        assert job["result"]["model_hash_after"] == report.model_hash_after == disk_hash(workspace)
        assert client.get("/v1/examples/22").status_code == 409


class Crash(BaseException):
    """Stands in for the process dying (BaseException: nothing in the library catches it)."""


@pytest.mark.parametrize("where", ["before_save", "after_save"])
def test_crash_inside_the_commit(workspace, monkeypatch, where):
    """The commit is the one window where the weights on disk change: die just before or just after."""
    model, tokenizer = load_model(workspace.model)
    store = GradStore.open(workspace.store)
    before = model_hash(model)
    record = pending_record(store, [23, "rec-1"], status="running", attempts=1)
    target = "save_weights_atomically" if where == "before_save" else "_finish"

    def die(*args, **kwargs):
        raise Crash

    with monkeypatch.context() as patch:
        if where == "before_save":
            patch.setattr(unlearn, target, die)
        else:
            patch.setattr(Unlearner, target, die)
        unlearner = Unlearner(model, store, tokenizer=tokenizer, model_dir=workspace.model,
                              config=ForgetConfig(**COMMIT_FORGET))
        with pytest.raises(Crash):
            unlearner.forget([23, "rec-1"], request_id=record["request_id"])
    assert store.objects.list_dir("forget-journal")  # the library's own journal entry is left behind
    after = model_hash(model)
    assert disk_hash(workspace) == (before if where == "before_save" else after)
    with serve(workspace) as client:
        job = wait_job(client, record["job_id"])
        assert job["status"] == "completed"
        served = client.get("/v1/stats").json()
        assert served["model"]["hash"] == disk_hash(workspace)
        if where == "after_save":  # the library's recovery finished it: erased, and no second run
            assert job["attempts"] == 1 and job["result"]["model_hash_after"] == after
            assert served["store"]["examples"] == len(workspace.template.ids) - 2
            assert client.get("/v1/examples/23").status_code == 409
        else:  # nothing had happened: the job ran again from the before-state
            assert job["attempts"] == 2 and job["result"]["model_hash_before"] == before
    assert not GradStore.open(workspace.store).objects.list_dir("forget-journal")


def test_one_server_per_model_directory(workspace):
    with serve(workspace) as client:
        assert client.get("/healthz").status_code == 200
        with pytest.raises(RuntimeError, match="another gradstore server"), serve(workspace):
            pass
    with serve(workspace) as client:  # released on shutdown
        assert client.get("/healthz").status_code == 200


def test_a_failed_commit_degrades_until_restart(workspace, monkeypatch):
    """If saving the weights fails mid-commit, the server stops taking forgets (reads go on) until a restart
    lets recovery compare the weights on disk with the journal."""
    before = disk_hash(workspace)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with serve(workspace) as client:
        with monkeypatch.context() as patch:
            patch.setattr(unlearn, "save_weights_atomically", disk_full)
            job = wait_job(client, client.post("/v1/forget", json={"ids": [27]}).json()["job_id"])
        assert job["status"] == "failed" and job["error"]["code"] == "internal_error"
        refused = client.post("/v1/forget", json={"ids": [28]})
        assert refused.status_code == 503 and refused.json()["code"] == "degraded"
        assert client.get("/v1/examples/27").status_code == 200  # reads still served, from the old state
        assert client.get("/v1/stats").json()["model"]["hash"] == before
    assert disk_hash(workspace) == before
    with serve(workspace) as client:  # recovery dropped the journal entry: the model never changed
        assert not GradStore.open(workspace.store).objects.list_dir("forget-journal")
        job = wait_job(client, client.post("/v1/forget", json={"ids": [27]}).json()["job_id"])
        assert job["status"] == "completed" and job["result"]["model_hash_before"] == before
