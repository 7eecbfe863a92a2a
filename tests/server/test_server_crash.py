"""A real `python -m gradstore_server` process, killed with SIGKILL during a forget job, then restarted.

After the restart the job completes or is rolled back, the weights on disk hash to the job's before- or
after-state (and are the weights served), and the store agrees with them: the forgotten examples are erased
exactly when the weights moved, every other example is intact, and no journal entry is left over.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from server_support import API_KEY, SLOW_FORGET, forget_records

from gradstore import GradStore
from gradstore_unlearn.train import load_model
from gradstore_unlearn.unlearn import model_hash

FORGET = [*range(20, 30), "rec-2"]


@contextmanager
def server_process(workspace, log: Path):
    """Start `python -m gradstore_server --port 0`; yields (process, base URL) once /healthz answers."""
    env = dict(os.environ, GRADSTORE_API_KEYS=API_KEY, GRADSTORE_FORGET_CONFIG=json.dumps(SLOW_FORGET))
    with open(log, "ab") as err:
        proc = subprocess.Popen([sys.executable, "-m", "gradstore_server", "--store", str(workspace.store),
                                 "--model", str(workspace.model), "--port", "0", "--log-level", "warning"],
                                stdout=subprocess.PIPE, stderr=err, env=env)
    try:
        line = proc.stdout.readline().decode()
        match = re.search(r"listening on (http://\S+)", line)
        assert match, f"no address printed: {line!r}; log: {log.read_text()[-2000:]}"
        url = match.group(1)
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"server exited {proc.returncode}: {log.read_text()[-2000:]}"
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def api(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"X-API-Key": API_KEY}, timeout=60)


def disk_hash(workspace) -> str:
    model, _ = load_model(workspace.model)
    return model_hash(model)


def kill_during_forget(workspace, tmp_path: Path, delay: float) -> dict:
    """Submit a forget, SIGKILL the server `delay` s after the job starts running, restart, check everything."""
    template = GradStore.open(workspace.template.store, read_only=True)
    log = tmp_path / "server.log"
    before = disk_hash(workspace)
    with server_process(workspace, log) as (proc, url), api(url) as client:
        assert client.get("/v1/stats").json()["model"]["hash"] == before
        response = client.post("/v1/forget", json={"ids": FORGET, "mode": "iterative", "request_id": "crash-1"})
        assert response.status_code == 202, response.text
        job_id = response.json()["job_id"]
        while (status := client.get(f"/v1/jobs/{job_id}").json()["status"]) == "queued":
            time.sleep(0.01)
        assert status == "running"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    interrupted = disk_hash(workspace)

    with server_process(workspace, log) as (_, url), api(url) as client:
        deadline = time.monotonic() + 120
        while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, "the job did not finish after the restart"
            time.sleep(0.05)
        stats = client.get("/v1/stats").json()
        again = client.post("/v1/forget", json={"ids": FORGET, "mode": "iterative", "request_id": "crash-1"})
        assert again.status_code == 200 and again.json()["job_id"] == job_id  # the original job

    assert job["status"] in ("completed", "rolled_back"), job
    after = job["result"]["model_hash_after"] if job["status"] == "completed" else None
    final = disk_hash(workspace)
    # The weights were never between states: at the kill, and after recovery.
    assert interrupted in (before, after), "the kill left weights that are neither before nor after"
    assert final in (before, after) and stats["model"]["hash"] == final
    moved = final != before
    assert moved == (job["status"] == "completed" and job["result"]["status"] == "forgotten")

    store = GradStore.open(workspace.store, read_only=True)
    assert not store.objects.list_dir("journal") and not store.objects.list_dir("forget-journal")
    for example_id in workspace.template.ids:
        if example_id in FORGET and moved:
            assert example_id not in store and store.is_erased(example_id)
        else:
            got, expected = store.get(example_id), template.get(example_id)
            assert torch.equal(got.rows, expected.rows) and torch.equal(got.token_ids, expected.token_ids)
    assert len(store) == len(workspace.template.ids) - (len(FORGET) if moved else 0)
    audit = forget_records(store)
    assert [r["request_id"] for r in audit] == (["crash-1"] if moved else [])
    record = json.loads(store.objects.read(f"jobs/{job_id}.json"))
    assert "pending_ids" not in record
    return job


def test_sigkill_during_a_forget_then_restart(workspace, tmp_path):
    # Killed as soon as the job is seen running: calibration (dozens of loss evaluations) is still going, so
    # nothing was committed; after the restart the job runs again and completes.
    job = kill_during_forget(workspace, tmp_path, delay=0.0)
    assert job["status"] == "completed" and job["attempts"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.25, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0])
def test_sigkill_at_many_points(workspace, tmp_path, delay):
    """Sweeps the kill across the job, so that some kills land in the commit (save, erase, audit)."""
    kill_during_forget(workspace, tmp_path, delay)
