"""Job journal recovery, from states a crash leaves behind (built here in-process; the SIGKILL test is
`test_crash.py`): every pending job completes or is rolled back, the model on disk is the before- or the
after-state, and the store agrees with it."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import torch
from fastapi.testclient import TestClient
from server_support import API_KEY, COMMIT_FORGET, SLOW_FORGET, wait_job

from gradstore import GradStore
from gradstore_server import create_app
from gradstore_server import engine as engine_module
from gradstore_server.engine import Engine
from gradstore_server.errors import ApiError
from gradstore_unlearn import cli, unlearn
from gradstore_unlearn.train import load_model
from gradstore_unlearn.unlearn import ForgetConfig, Unlearner, adopt_model, model_hash


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
    lock = workspace.model / ".gradstore-server.lock"
    with serve(workspace) as client:
        assert client.get("/healthz").status_code == 200 and lock.exists()
        with pytest.raises(RuntimeError, match="in use by another gradstore process"), serve(workspace):
            pass
        assert lock.exists()  # the refused server leaves the holder's lock alone
    assert not lock.exists()  # released, and removed, on shutdown
    with serve(workspace) as client:
        assert client.get("/healthz").status_code == 200


def test_the_command_line_cannot_forget_a_model_the_server_serves(workspace, capsys):
    """A `gradstore forget` beside the server would be undone by the server's next forget (which starts from
    the weights the server loaded): it is refused, and changes nothing."""
    before = disk_hash(workspace)
    argv = ["forget", "--store", str(workspace.store), "--model", str(workspace.model), "--ids", "5",
            "--id-type", "int", "--request-id", "cli-A"]
    with serve(workspace) as client:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "in use by another gradstore process" in err
        assert "POST /v1/forget" in err
        assert disk_hash(workspace) == before and client.get("/v1/examples/5").status_code == 200
        # A dry run changes nothing: it may run beside the server.
        assert cli.main([*argv, "--dry-run"]) == 0
    assert disk_hash(workspace) == before


def test_weights_replaced_on_disk_stop_forgets_until_a_restart(workspace):
    """Weights another process saved under the server (without its lock) are never overwritten with a forget
    that started from the old ones: the job stays queued, forgets are refused, and after the restart the job
    runs on the new weights."""
    with serve(workspace) as client:
        served = client.get("/v1/stats").json()["model"]["hash"]
        model, _ = load_model(workspace.model)
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(1.01)
        unlearn.save_weights_atomically(model, workspace.model)
        replaced = disk_hash(workspace)
        job = client.post("/v1/forget", json={"ids": [20], "request_id": "after-replace"}).json()
        deadline = time.monotonic() + 60
        while client.app.state.engine.degraded is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "changed since the server loaded" in client.app.state.engine.degraded
        while (pending := client.get(f"/v1/jobs/{job['job_id']}").json())["status"] != "queued":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # Not journaled, but shown: why the job waits, and (in the stats) why forgets are refused.
        assert pending["attempts"] == 0 and pending["error"]["code"] == "degraded"
        assert "restart" in pending["error"]["message"]
        assert "changed since the server loaded" in client.get("/v1/stats").json()["degraded"]
        refused = client.post("/v1/forget", json={"ids": [21]})
        assert refused.status_code == 503 and refused.json()["code"] == "degraded"
        # The weights served are still on the record: a preview is answered.
        assert client.post("/v1/forget", json={"ids": [21], "dry_run": True}).json()["status"] == "completed"
        assert client.get("/v1/stats").json()["model"]["hash"] == served
    assert disk_hash(workspace) == replaced  # not overwritten
    # Weights changed off the record are only forgotten on once adopted: until then the restarted server is
    # degraded and says why, and the job waits in the queue (its request id is not used up).
    with serve(workspace) as client:
        time.sleep(0.5)
        assert "not where the store's audit log ends" in client.get("/v1/stats").json()["degraded"]
        waiting = client.get(f"/v1/jobs/{job['job_id']}").json()
        assert waiting["status"] == "queued" and waiting["error"]["code"] == "degraded"
        assert client.post("/v1/forget", json={"ids": [21]}).status_code == 503
        # Served off the record, a preview is refused as the request itself is: 503, not a 422 that blames it.
        preview = client.post("/v1/forget", json={"ids": [21], "dry_run": True})
        assert preview.status_code == 503 and preview.json()["code"] == "degraded"
    adopt_model(GradStore.open(workspace.store), load_model(workspace.model)[0])  # `gradstore audit --adopt`
    with serve(workspace) as client:
        done = wait_job(client, job["job_id"])
        assert done["status"] == "completed" and done["result"]["model_hash_before"] == replaced
        assert done["error"] is None and client.get("/v1/stats").json()["degraded"] is None


def test_a_failed_commit_degrades_until_restart(workspace, monkeypatch):
    """If saving the weights fails mid-commit, the server stops taking forgets (reads go on) until a restart
    lets recovery compare the weights on disk with the journal; the job is settled then."""
    before = disk_hash(workspace)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with serve(workspace) as client:
        with monkeypatch.context() as patch:
            patch.setattr(unlearn, "save_weights_atomically", disk_full)
            job = wait_job(client, client.post("/v1/forget", json={"ids": [27]}).json()["job_id"])
        assert job["status"] == "interrupted" and job["error"]["code"] == "commit_failed"
        assert job["ids"] == [27]  # still pending: the record keeps the IDs it will forget
        refused = client.post("/v1/forget", json={"ids": [28]})
        assert refused.status_code == 503 and refused.json()["code"] == "degraded"
        assert client.get("/v1/examples/27").status_code == 200  # reads still served, from the old state
        assert client.get("/v1/stats").json()["model"]["hash"] == before
    assert disk_hash(workspace) == before
    with serve(workspace) as client:  # recovery dropped the journal entry (the model never changed): it runs
        assert not GradStore.open(workspace.store).objects.list_dir("forget-journal")
        job = wait_job(client, job["job_id"])
        assert job["status"] == "completed" and job["result"]["model_hash_before"] == before
        assert job["attempts"] == 2 and job["error"] is None


def failing_once(method):
    """`method`, but its first call raises an I/O error (a disk or an object store failing once)."""
    calls = []

    def fails_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        return method(self, *args, **kwargs)

    return fails_once


def test_a_job_whose_erasure_failed_is_completed_at_restart(workspace, monkeypatch):
    """The weights were saved, then the erasure failed: the restart's recovery finishes the forget, and the
    job is completed with it (not `failed` for good while its forget took effect)."""
    erase_fails_once = failing_once(GradStore.erase)

    with serve(workspace) as client:
        with monkeypatch.context() as patch:
            patch.setattr(GradStore, "erase", erase_fails_once)
            submitted = client.post("/v1/forget", json={"ids": [7], "request_id": "dsr-7"}).json()
            job = wait_job(client, submitted["job_id"])
        assert job["status"] == "interrupted" and job["error"]["code"] == "commit_failed"
        # The weights served are the old ones, the disk holds the new: the chain is neither whole nor broken.
        unsettled = client.get("/v1/audit/chain")
        assert unsettled.status_code == 503 and unsettled.json()["code"] == "degraded"
    with serve(workspace) as client:
        done = client.get(f"/v1/jobs/{job['job_id']}").json()
        assert done["status"] == "completed" and done["attempts"] == 1 and done["error"] is None
        assert done["result"]["model_hash_after"] == disk_hash(workspace)
        assert client.get("/v1/examples/7").json()["code"] == "erased"
        assert [r.get("request_id") for r in client.get("/v1/audit").json()["items"]] == [None, "dsr-7"]  # trained, then it
        chain = client.get("/v1/audit/chain").json()  # settled by the restart
        assert chain["whole"] and chain["commits"] == 1 and chain["model_hash"] == disk_hash(workspace)
        again = client.post("/v1/forget", json={"ids": [7], "request_id": "dsr-7"})
        assert again.status_code == 200 and again.json()["job_id"] == job["job_id"]


def test_a_degraded_server_leaves_queued_jobs_queued(workspace, monkeypatch):
    """Jobs queued behind a failed commit are not failed for good: they run after the restart."""
    erase_fails_once = failing_once(GradStore.erase)

    with serve(workspace, forget_config=SLOW_FORGET) as client:
        with monkeypatch.context() as patch:
            patch.setattr(GradStore, "erase", erase_fails_once)
            first = client.post("/v1/forget", json={"ids": [15], "request_id": "A"}).json()
            second = client.post("/v1/forget", json={"ids": [16], "request_id": "B"}).json()
            assert wait_job(client, first["job_id"], 300)["status"] == "interrupted"
            time.sleep(0.5)
        assert client.get(f"/v1/jobs/{second['job_id']}").json()["status"] == "queued"
        assert client.get("/v1/stats").json()["jobs"] == {"queued": 1, "running": 0}
    with serve(workspace) as client:
        assert wait_job(client, first["job_id"])["status"] == "completed"
        later = wait_job(client, second["job_id"])
        assert later["status"] == "completed" and later["attempts"] == 1
        assert client.get("/v1/examples/16").status_code == 409


def test_a_failure_while_publishing_leaves_no_unpublished_commit(workspace, monkeypatch):
    """Whatever fails between calibrating and publishing, the model served is the model on disk: a failure
    before the commit commits nothing, and one after it degrades the server (else the next forget would
    start from the published weights and undo the first one on disk)."""
    before = disk_hash(workspace)
    with serve(workspace) as client:
        with monkeypatch.context() as patch:
            def snapshot_fails(*args, **kwargs):
                raise OSError(5, "Input/output error")

            patch.setattr(Engine, "_new_snapshot", snapshot_fails)
            job = wait_job(client, client.post("/v1/forget", json={"ids": [8]}).json()["job_id"])
        assert job["status"] == "failed"
        assert disk_hash(workspace) == before == client.get("/v1/stats").json()["model"]["hash"]
        assert client.get("/v1/examples/8").status_code == 200 and client.app.state.engine.degraded is None
        job = wait_job(client, client.post("/v1/forget", json={"ids": [9]}).json()["job_id"])
        assert job["status"] == "completed" and job["result"]["model_hash_before"] == before

        committed = []
        real_commit = Unlearner._commit
        real_fingerprint = engine_module.weights_fingerprint

        def commit(self, *args, **kwargs):
            real_commit(self, *args, **kwargs)
            committed.append(1)

        def fingerprint_fails_after_the_commit(model_dir):
            if committed:
                raise OSError(5, "Input/output error")
            return real_fingerprint(model_dir)

        with monkeypatch.context() as patch:
            patch.setattr(Unlearner, "_commit", commit)
            patch.setattr(engine_module, "weights_fingerprint", fingerprint_fails_after_the_commit)
            job = wait_job(client, client.post("/v1/forget", json={"ids": [10]}).json()["job_id"])
        assert job["status"] == "interrupted" and client.app.state.engine.degraded
        assert client.post("/v1/forget", json={"ids": [11]}).status_code == 503
    with serve(workspace) as client:
        done = client.get(f"/v1/jobs/{job['job_id']}").json()
        assert done["status"] == "completed" and done["result"]["model_hash_after"] == disk_hash(workspace)
        assert client.get("/v1/stats").json()["model"]["hash"] == disk_hash(workspace)


def test_an_application_started_twice_takes_the_model_and_runs_jobs_again(workspace):
    app = create_app(workspace.settings())
    with TestClient(app, headers={"X-API-Key": API_KEY}):
        pass
    assert not (workspace.model / ".gradstore-server.lock").exists()
    with TestClient(app, headers={"X-API-Key": API_KEY}) as client:
        assert (workspace.model / ".gradstore-server.lock").exists()
        with pytest.raises(RuntimeError, match="in use"), serve(workspace):
            pass
        job = wait_job(client, client.post("/v1/forget", json={"ids": [14]}).json()["job_id"])
        assert job["status"] == "completed"


def complete_outside_the_server(workspace, ids: list, request_id: str) -> unlearn.ForgetReport:
    """What `gradstore forget --request-id R` does: the library forgets and records request R in the store."""
    model, tokenizer = load_model(workspace.model)
    engine = Unlearner(model, GradStore.open(workspace.store), tokenizer=tokenizer, model_dir=workspace.model,
                       config=ForgetConfig(**COMMIT_FORGET))
    report = engine.forget(ids, request_id=request_id)
    assert report.status == "forgotten"
    return report


def test_a_request_id_the_command_line_completed(workspace):
    """The server's journal has no claim on a request id the command line used; the library's record does.
    Other IDs under it are the documented conflict (never a "completed" job that forgot nothing); the same
    IDs replay the command line's report."""
    report = complete_outside_the_server(workspace, [17], "cli-1")
    with serve(workspace) as client:
        for body in ({"ids": [18], "request_id": "cli-1"}, {"ids": [17, 18], "request_id": "cli-1"},
                     {"ids": [18], "request_id": "cli-1", "dry_run": True},
                     {"ids": [17], "request_id": "cli-1", "mode": "iterative"}):  # the same IDs in another mode
            refused = client.post("/v1/forget", json=body)
            assert refused.status_code == 409 and refused.json()["code"] == "request_id_conflict", body
            assert "cli-1" in refused.json()["message"]
        assert client.get("/v1/examples/18").status_code == 200
        replay = client.post("/v1/forget", json={"ids": [17], "request_id": "cli-1"})
        assert replay.status_code == 202, replay.text
        job = wait_job(client, replay.json()["job_id"])
        assert job["status"] == "completed" and job["result"]["status"] == "forgotten"
        assert job["result"]["model_hash_after"] == report.model_hash_after
        # The check runs again when a job runs (the command line may complete the id after the submission).
        with pytest.raises(ApiError, match="different set of examples") as refused_at_run:
            client.app.state.engine.forget([19], "first_epoch", "cli-1")
        assert refused_at_run.value.code == "request_id_conflict"
        assert client.get("/v1/examples/19").status_code == 200


def test_a_pending_job_whose_request_id_the_command_line_completed_fails(workspace):
    store = GradStore.open(workspace.store)
    record = pending_record(store, [24], status="queued", attempts=0, request_id="cli-2")
    complete_outside_the_server(workspace, [25], "cli-2")  # while the server was down
    with serve(workspace) as client:
        job = wait_job(client, record["job_id"])
        assert job["status"] == "failed" and job["error"]["code"] == "request_id_conflict"
        assert client.get("/v1/examples/24").status_code == 200


def test_a_start_after_a_stop_that_left_the_runner_busy_runs_later_jobs(tmp_path):
    """stop() gives up waiting for a long job; a second start() in the same process waits for that job, then
    runs a new runner (the busy one stops after its job)."""
    import json
    import threading
    import time
    import uuid
    from types import SimpleNamespace

    from gradstore._objects import LocalObjects
    from gradstore_server.jobs import JobManager

    objects = LocalObjects(tmp_path / "store")
    release = threading.Event()

    class SlowEngine:
        degraded = None
        store = SimpleNamespace(objects=objects)

        def forget(self, ids, mode, request_id):
            if request_id == "slow":
                release.wait(10)
            return unlearn.ForgetReport(request_id, "forgotten", mode, ids=list(ids))

    def queued(request_id):
        job_id = uuid.uuid4().hex
        objects.write(f"jobs/{job_id}.json", json.dumps({
            "job_id": job_id, "request_id": request_id, "kind": "forget", "status": "queued",
            "mode": "first_epoch", "pending_ids": ["x"], "submitted_at": time.time()}).encode())
        return job_id

    manager = JobManager(SlowEngine(), SimpleNamespace(job_max_attempts=3))
    slow = queued("slow")
    manager.start()
    time.sleep(0.2)
    manager.stop(timeout=0.1)  # the lifespan ends while the job runs
    threading.Timer(0.3, release.set).start()
    manager.start()  # the lifespan starts again: waits for the busy job
    later = queued("later")
    manager._enqueue(later)
    deadline = time.monotonic() + 10
    while manager.load(later)["status"] != "completed" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert manager.load(slow)["status"] == "completed" and manager.load(later)["status"] == "completed"
    manager.stop()


def test_readers_are_served_while_a_commit_waits_for_another_process(workspace, monkeypatch):
    """Another process holds the store's commit lock (its own commit or recovery): the server's forget waits
    for it before stopping its readers, not after."""
    import contextlib
    import threading

    waiting = threading.Event()
    real_commit_lock = Unlearner.commit_lock

    @contextlib.contextmanager
    def commit_lock(self):
        waiting.set()
        with real_commit_lock(self):
            yield

    monkeypatch.setattr(Unlearner, "commit_lock", commit_lock)
    with serve(workspace) as client:
        other = GradStore.open(workspace.store)
        holding, release = threading.Event(), threading.Event()

        def other_process_commits():
            with other.lock("forget-commit"):
                holding.set()
                release.wait(30)

        holder = threading.Thread(target=other_process_commits)
        holder.start()
        holding.wait(5)
        job_id = client.post("/v1/forget", json={"ids": [12]}).json()["job_id"]
        assert waiting.wait(30)
        time.sleep(0.3)  # the commit is waiting for the lock now
        threading.Timer(10, release.set).start()  # (so that a server that blocked its readers still ends)
        started = time.monotonic()
        assert client.get("/v1/examples/13").status_code == 200 and time.monotonic() - started < 5
        release.set()
        holder.join(10)
        assert wait_job(client, job_id)["status"] == "completed"
