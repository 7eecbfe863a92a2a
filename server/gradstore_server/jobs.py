"""Forget jobs: a journal inside the store, one runner thread, and recovery after a crash or restart.

Layout, next to the store's own records (written through `store.objects`, atomic replace / create-only):

    jobs/<job id>.json                 the job record, rewritten at each state change
    jobs/by-request/<request id>.json  {"job_id": ...}, created once (create-only): repeating a request id
                                       returns the original job

A job goes `queued` -> `running` -> `completed` | `failed`, or, after crashes, `rolled_back`. A job whose
commit failed (the engine is then degraded) is `interrupted`: like a crash in the commit, whether it took
effect is for the next start to settle. The record of a pending job holds the IDs it will forget (it must, to
run after a restart); a finished record keeps only their salted hashes (`store.id_hash`, as tombstones and
the audit do), so no erased ID survives in the store. Texts are never written: a text request is matched at
submission and journaled as the IDs it matched.

Recovery (`JobManager.start`, after `Engine.start` has let the library settle the model and the store):

- the library journals each forget between "weights saved" and "examples erased" and, on open, finishes
  it (weights on disk are the after-state) or drops it (before-state), writing `requests/<request id>.json`
  when it finishes. So a job whose request has that record is `completed` with the library's report (or
  `failed` with `request_id_conflict` if that record is of other examples: the command line used the id);
- any other `running` or `interrupted` job changed nothing on disk (its weights never replaced the old
  ones). It runs again, unless it has already been started `job_max_attempts` times — a job that keeps
  killing the server is `rolled_back` (before-state, nothing erased) and must be resubmitted;
- `queued` jobs run again, in submission order (a degraded server stops its runner and leaves them queued).

The model on disk is therefore always exactly the before- or the after-state of every job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import re
import threading
import time
import uuid
from typing import Any

from gradstore_unlearn.tables import json_safe
from gradstore_unlearn.unlearn import REQUESTS, ForgetReport

from .engine import CommitFailed, Engine, NotWritable
from .errors import ApiError, library_error
from .settings import Settings

log = logging.getLogger("gradstore_server")

JOBS = "jobs"
BY_REQUEST = f"{JOBS}/by-request"
JOB_ID = re.compile(r"[0-9a-f]{32}")
PENDING = ("queued", "running", "interrupted")  # the job may still change the model: its record holds its IDs
TERMINAL = ("completed", "failed", "rolled_back")
RESULT_FIELDS = ("status", "target_loss", "forget_loss_before", "forget_loss_after", "retain_loss_before",
                 "retain_loss_after", "retain_change", "scale", "iterations", "evaluations", "model_hash_before",
                 "model_hash_after", "drift", "erasure_receipt", "seconds", "message", "examples")


def result_of(report: ForgetReport) -> dict[str, Any]:
    """The persisted, ID-free result of a forget report (counts instead of ID lists)."""
    doc = report.to_dict()
    out = {name: doc.get(name) for name in RESULT_FIELDS}
    out["n_ids"] = len(doc.get("ids") or [])
    out["n_already_forgotten"] = len(doc.get("already_forgotten") or [])
    return json_safe(out)


def public(record: dict[str, Any]) -> dict[str, Any]:
    """The API's view of a job record (the `Job` schema)."""
    out = {k: record.get(k) for k in ("job_id", "request_id", "kind", "status", "mode", "dry_run", "source",
                                      "n_ids", "id_hashes", "attempts", "submitted_at", "started_at",
                                      "finished_at", "result", "error")}
    out["ids"] = record.get("pending_ids") if record.get("status") in PENDING else None
    out["matches"] = None
    return out


class JobManager:
    """Accepts forget requests, journals them, runs them one at a time, and answers for them."""

    def __init__(self, engine: Engine, settings: Settings):
        self.engine = engine
        self.settings = settings
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._submit_lock = threading.Lock()
        self._counts_lock = threading.Lock()
        self._queued: set[str] = set()
        self._running: str | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def objects(self) -> Any:
        return self.engine.store.objects

    # ------------------------------------------------------------------------------------------ journal
    def _save(self, record: dict[str, Any]) -> None:
        self.objects.write(f"{JOBS}/{record['job_id']}.json", json.dumps(record, sort_keys=True).encode())

    def load(self, job_id: str) -> dict[str, Any] | None:
        if not JOB_ID.fullmatch(job_id):  # never let a path segment become an object key it does not name
            return None
        try:
            return json.loads(self.objects.read(f"{JOBS}/{job_id}.json"))
        except FileNotFoundError:
            return None

    def _job_for_request(self, request_id: str) -> dict[str, Any] | None:
        try:
            claim = json.loads(self.objects.read(f"{BY_REQUEST}/{request_id}.json"))
        except FileNotFoundError:
            return None
        return self.load(claim["job_id"])

    def counts(self) -> dict[str, int]:
        with self._counts_lock:
            return {"queued": len(self._queued), "running": int(self._running is not None)}

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> list[str]:
        """Settle the journal (see the module docstring), then start the runner. Returns re-queued job ids.

        Idempotent (see `Engine.start`): a second call returns []. After a `stop` that left the runner busy
        (its join timed out), it first waits for that runner's job to end: that runner stops after it."""
        if self._thread is not None:
            if not self._stopping.is_set():
                return []
            self._thread.join()
            self._reset()
        records = []
        for name in self.objects.list_dir(JOBS):
            if name.endswith(".json") and JOB_ID.fullmatch(name[: -len(".json")]):
                record = self.load(name[: -len(".json")])
                if record is not None and record.get("status") in PENDING:
                    records.append(record)
        requeued = []
        for record in sorted(records, key=lambda r: (r.get("submitted_at") or 0, r["job_id"])):
            if self._settle(record):
                requeued.append(record["job_id"])
        self._thread = threading.Thread(target=self._run, name="gradstore-forget-runner", daemon=True)
        self._thread.start()
        for job_id in requeued:
            self._enqueue(job_id)
        return requeued

    def _settle(self, record: dict[str, Any]) -> bool:
        """Decide a pending job found at startup; True if it must run (again)."""
        try:
            doc = json.loads(self.objects.read(f"{REQUESTS}/{record['request_id']}.json"))
        except FileNotFoundError:
            doc = None
        if doc is not None:  # the library committed it (possibly in its own recovery just now)...
            try:  # ...unless someone else (the command line) completed this request id for other examples
                self.engine.check_request_id(record["request_id"], record.get("pending_ids") or [], record["mode"])
            except ApiError as err:
                self._finish(record, "failed", error={"code": err.code, "message": err.message})
                log.warning("job %s: %s", record["job_id"], err.message)
                return False
            self._finish(record, "completed", result=result_of(ForgetReport.from_dict(doc)))
            log.info("job %s: completed before the restart", record["job_id"])
            return False
        started = record["status"] in ("running", "interrupted")
        if started and record.get("attempts", 0) >= self.settings.job_max_attempts:
            self._finish(record, "rolled_back", error={
                "code": "interrupted",
                "message": f"the server stopped {record.get('attempts', 0)} times while running this job; it was "
                           "rolled back: the model and the store are as before it, nothing was erased. Submit "
                           "it again (with a new request_id) to retry."})
            log.warning("job %s: rolled back after %s interrupted runs", record["job_id"], record.get("attempts"))
            return False
        if started:
            log.info("job %s: interrupted (model on disk is the before-state); running it again", record["job_id"])
            record.update(status="queued", error=None)
            self._save(record)
        return True

    def stop(self, timeout: float = 60.0) -> None:
        """Stop after the current job (a job still running at exit is recovered like after a crash)."""
        self._stopping.set()
        self._queue.put(None)
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the forget runner is still busy after %.0f s; its job is recovered at the next "
                        "start", timeout)
            return
        self._reset()

    def _reset(self) -> None:
        # Ready to start again (an application whose lifespan runs twice): `start` re-reads the journal, which
        # holds every job that was still queued here.
        self._thread = None
        self._stopping.clear()
        self._queue = queue.Queue()
        with self._counts_lock:
            self._queued.clear()

    # --------------------------------------------------------------------------------------- submission
    def submit(self, request: Any) -> tuple[dict[str, Any], bool]:
        """(the job, True if created now) for a `ForgetByIds` / `ForgetByText` request body."""
        with self._submit_lock:  # one submission at a time: a request id can never start two jobs
            fingerprint = self._fingerprint(request)
            if request.request_id is not None:
                existing = self._job_for_request(request.request_id)
                if existing is not None:
                    if existing.get("fingerprint") != fingerprint:
                        raise self._conflict(request.request_id, existing)
                    if not request.dry_run:
                        return public(existing), False
                    # A dry run of the same request is answered afresh below: it never stands for the job.
            if self.engine.degraded and not request.dry_run:
                raise ApiError(503, "degraded", self.engine.degraded)
            with self._counts_lock:
                if not request.dry_run and len(self._queued) >= self.settings.max_queued_jobs:
                    raise ApiError(503, "queue_full", f"{len(self._queued)} forget jobs are waiting; retry later",
                                   headers={"Retry-After": "30"})
            source = "text" if hasattr(request, "text") else "ids"
            matches = None
            if source == "text":
                found = self.engine.plan_text(request.text, request.threshold, request.metric)
                if not found:
                    raise ApiError(404, "no_match", f"no stored example matches the text at {request.metric} >= "
                                   f"{request.threshold}")
                ids = [m.id for m in found]
                matches = [{"id": m.id, "jaccard": m.jaccard, "containment": m.containment} for m in found]
                already = []
            else:
                ids, already = self.engine.plan_ids(request.ids)
            mode = request.mode or self.settings.default_mode
            replay = self._completed_elsewhere(request.request_id, ids, mode)
            if len(already) == len(ids) and not replay:
                raise ApiError(409, "already_erased", "every requested ID was already erased: "
                               + ", ".join(repr(i) for i in already[:10]) + ("..." if len(already) > 10 else ""),
                               ids=already)
            job_id = uuid.uuid4().hex
            now = time.time()
            record: dict[str, Any] = {
                "job_id": job_id, "request_id": request.request_id or job_id, "kind": "forget", "mode": mode,
                "dry_run": request.dry_run, "source": source, "n_ids": len(ids),
                "id_hashes": [self.engine.id_hash(i) for i in ids], "fingerprint": fingerprint,
                "attempts": 0, "submitted_at": now, "started_at": None, "finished_at": None, "result": None,
                "error": None, "status": "queued", "pending_ids": ids,
            }
            if request.dry_run:
                # A dry run reads only (which IDs would be forgotten): it is answered at once, never queued and
                # never journaled (previews would otherwise pile up in the store), and it claims no request id:
                # the request it previews may still be sent under that id.
                report = self.engine.dry_run(ids, mode, record["request_id"])
                record.update(status="completed", started_at=now, finished_at=time.time(), attempts=1,
                              result=result_of(report))
                record.pop("pending_ids")
                out = public(record)
                out["ids"] = ids  # this response alone names them
                out["matches"] = matches
                return out, False
            self._save(record)
            if not self.objects.write_new(f"{BY_REQUEST}/{record['request_id']}.json",
                                          json.dumps({"job_id": job_id}).encode()):
                # Another server on this store claimed the id since we looked: its job stands, ours never
                # runs.
                self.objects.delete(f"{JOBS}/{job_id}.json")
                existing = self._job_for_request(record["request_id"])
                if existing is None or existing.get("fingerprint") != fingerprint:
                    raise self._conflict(record["request_id"], existing)
                return public(existing), False
            self._enqueue(job_id)
            out = public(record)
            out["matches"] = matches
            return out, True

    @staticmethod
    def _conflict(request_id: str, existing: dict[str, Any] | None) -> ApiError:
        job = f" (job {existing['job_id']})" if existing is not None else ""
        return ApiError(409, "request_id_conflict", f"request_id {request_id!r} was used for a different "
                        f"request{job}")

    def _completed_elsewhere(self, request_id: str | None, ids: list[Any], mode: str) -> bool:
        """True if the library completed `request_id` for exactly these IDs without a job of ours (the command
        line's `gradstore forget --request-id`): the job replays that report. For other IDs, or another mode, that is
        the same conflict as a request id reused here: 409 `request_id_conflict`."""
        return request_id is not None and self.engine.check_request_id(request_id, ids, mode)

    def _fingerprint(self, request: Any) -> str:
        """What makes two submissions under one request id the same request: the set of IDs (as the library
        reads a request: order and repeats do not matter) or the text query, and the mode. Not `dry_run`:
        a preview of a request is that request. Salted (the store's ID hash), so that a text's fingerprint
        cannot be recomputed from a guess."""
        body = request.model_dump(mode="json", exclude={"request_id", "dry_run"})
        if body.get("mode") is None:
            body["mode"] = self.settings.default_mode
        if "ids" in body:  # as JSON texts, so that the integer 3 and the string "3" stay apart
            body["ids"] = sorted({json.dumps(i, ensure_ascii=True) for i in body["ids"]})
        canonical = json.dumps(body, sort_keys=True, ensure_ascii=True)
        return self.engine.id_hash(hashlib.sha256(canonical.encode()).hexdigest())

    def get(self, job_id: str) -> dict[str, Any]:
        record = self.load(job_id)
        if record is None:
            raise ApiError(404, "unknown_job", f"unknown job {job_id[:64]!r}")
        out = public(record)
        if record.get("status") == "queued" and self.engine.degraded and out["error"] is None:
            # Not journaled: it says why the job waits now, and a restart settles that.
            out["error"] = {"code": "degraded", "message": f"waiting for the server's restart: {self.engine.degraded}"}
        return out

    # -------------------------------------------------------------------------------------------- runner
    def _enqueue(self, job_id: str) -> None:
        with self._counts_lock:
            self._queued.add(job_id)
        self._queue.put(job_id)

    def _finish(self, record: dict[str, Any], status: str, *, result: dict[str, Any] | None = None,
                error: dict[str, Any] | None = None) -> None:
        record.update(status=status, result=result, error=error, finished_at=time.time())
        record.pop("pending_ids", None)  # the IDs leave the journal with the job
        self._save(record)

    def _run(self) -> None:
        while not self._stopping.is_set():
            job_id = self._queue.get()
            if job_id is None:
                break
            with self._counts_lock:
                self._queued.discard(job_id)
                self._running = job_id
            try:
                self._execute(job_id)
            except Exception:  # the runner must outlive any one job
                log.exception("job %s: the runner failed to record its outcome", job_id)
            finally:
                with self._counts_lock:
                    self._running = None
            if self.engine.degraded:
                # Every later job would be refused too: they stay queued in the journal and run after the
                # restart the degraded state asks for, instead of each failing for good.
                log.error("forget jobs stopped until a restart: %s", self.engine.degraded)
                break

    def _execute(self, job_id: str) -> None:
        record = self.load(job_id)
        if record is None or record.get("status") not in ("queued", "running"):
            return
        before = dict(record)
        record.update(status="running", started_at=time.time(), attempts=record.get("attempts", 0) + 1)
        self._save(record)
        try:
            report = self.engine.forget(record["pending_ids"], record["mode"], record["request_id"])
        except NotWritable as err:
            # Refused before anything changed: back to the queue as it was, for the restart to run it.
            self._save(before)
            with self._counts_lock:
                self._queued.add(job_id)
            log.warning("job %s left queued: %s", job_id, err.message)
        except CommitFailed as err:
            # Not final: whether the weights reached the disk is settled by the next start's recovery (the
            # job is then completed from the library's record of the request, or runs again).
            record.update(status="interrupted", error={"code": "commit_failed", "message": str(err)})
            self._save(record)
        except ApiError as err:
            self._finish(record, "failed", error={"code": err.code, "message": err.message})
        except Exception as err:
            mapped = library_error(err)
            if mapped is None:
                log.exception("job %s failed", job_id)
                self._finish(record, "failed", error={"code": "internal_error",
                                                      "message": f"the forget failed: {type(err).__name__}"})
            else:
                self._finish(record, "failed", error={"code": mapped.code, "message": mapped.message})
        else:
            self._finish(record, "completed", result=result_of(report))
            log.info("job %s: %s (%d IDs, %.2f s)", job_id, report.status, len(report.ids), report.seconds)
