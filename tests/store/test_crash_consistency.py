"""Crash consistency: SIGKILL a writer at random moments; interrupt erasures at every step."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gradstore import ErasedError, GradStore

sys.path.insert(0, str(Path(__file__).parent))
from crash_writer import DIM, VOCAB, example

HERE = Path(__file__).parent


def run_and_kill(uri: str, start: int, rng: random.Random) -> set[int]:
    """Start a writer, kill it with SIGKILL after a random delay, return the IDs whose append returned."""
    proc = subprocess.Popen([sys.executable, str(HERE / "crash_writer.py"), uri, str(start), str(rng.randint(1, 6))],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(rng.uniform(0.0, 0.6))
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    return {int(x) for line in out.splitlines() for x in line.split()}


def check_store(uri: str, committed: set[int]) -> None:
    store = GradStore.open(uri)
    visible = set(store.ids())
    assert committed <= visible, f"lost returned appends: {sorted(committed - visible)[:10]}"
    batch = store.get_many(sorted(visible))  # everything visible is complete and exact
    for j, i in enumerate(batch.ids):
        tokens, rows = example(i)
        ex = batch.example(j)
        assert ex.token_ids.tolist() == tokens.tolist()
        assert torch.equal(ex.rows, rows)


def crash_trials(tmp_path: Path, trials: int, seed: int) -> None:
    uri = str(tmp_path / "store")
    GradStore.create(uri, dim=DIM, vocab_size=VOCAB, dtype="float32")
    rng = random.Random(seed)
    committed: set[int] = set()
    for trial in range(trials):
        committed |= run_and_kill(uri, start=trial * 100_000, rng=rng)
        check_store(uri, committed)
    # After all the crashes a new writer continues, and compaction cleans up.
    store = GradStore.open(uri)
    tokens, rows = example(10**9)
    with store.writer() as w:
        w.append([10**9], [tokens], [rows])
    store.compact()
    check_store(uri, committed | {10**9})


def test_sigkill_during_appends(tmp_path):
    crash_trials(tmp_path, trials=3, seed=0)


@pytest.mark.slow
def test_sigkill_during_appends_many_trials(tmp_path):
    crash_trials(tmp_path, trials=24, seed=1)


class Crash(Exception):
    pass


@pytest.mark.parametrize("step", ["after_journal", "after_tombstones", "after_new_manifest", "after_old_manifest"])
def test_interrupted_erasure_is_finished_on_open(tmp_path, monkeypatch, step):
    uri = str(tmp_path / "store")
    store = GradStore.create(uri, dim=DIM, vocab_size=VOCAB, dtype="float32")
    with store.writer() as w:
        for base in (0, 10):
            ids = list(range(base, base + 10))
            tokens, rows = zip(*(example(i) for i in ids), strict=True)
            w.append(ids, list(tokens), list(rows))
    objects = store.objects
    real_write, real_write_new, real_delete = objects.write, objects.write_new, objects.delete

    def write_new(key, data):
        ok = real_write_new(key, data)
        if (step == "after_journal" and key.startswith("journal/")) or \
           (step == "after_new_manifest" and key.startswith("manifests/")):
            raise Crash(step)
        return ok

    def write(key, data):
        real_write(key, data)
        if step == "after_tombstones" and key.startswith("tombstones/"):
            raise Crash(step)

    def delete(key):
        real_delete(key)
        if step == "after_old_manifest" and key.startswith("manifests/"):
            raise Crash(step)

    monkeypatch.setattr(objects, "write_new", write_new)
    monkeypatch.setattr(objects, "write", write)
    monkeypatch.setattr(objects, "delete", delete)
    with pytest.raises(Crash):
        store.erase([3, 12])
    monkeypatch.undo()
    (Path(uri) / "locks" / "mutation.json").unlink(missing_ok=True)  # the crashed process held the lock

    # A read-only handle cannot finish the erasure, but must not return what it erases either.
    readonly = GradStore.open(uri, read_only=True)
    assert sorted(readonly.ids()) == [i for i in range(20) if i not in (3, 12)]
    assert len(readonly) == 18 and 3 not in readonly
    for i in (3, 12):
        with pytest.raises(ErasedError):
            readonly.get(i)
    assert sorted(i for b in readonly.iter_batches(7) for i in b.ids) == sorted(readonly.ids())
    assert list((Path(uri) / "journal").iterdir())  # still pending

    reopened = GradStore.open(uri)  # replays the journal
    assert sorted(reopened.ids()) == [i for i in range(20) if i not in (3, 12)]
    for i in (3, 12):
        with pytest.raises(ErasedError):
            reopened.get(i)
    check_store(uri, set(range(20)) - {3, 12})
    assert not list((Path(uri) / "journal").iterdir())
    assert reopened.stats().segments == 2  # no superseded segment left visible


def test_a_read_only_handle_keeps_a_copy_appended_after_a_crashed_erasure(tmp_path, monkeypatch):
    uri = str(tmp_path / "store")
    store = GradStore.create(uri, dim=DIM, vocab_size=VOCAB, dtype="float32")
    ids = list(range(6))
    tokens, rows = zip(*(example(i) for i in ids), strict=True)
    with store.writer() as w:
        w.append(ids, list(tokens), list(rows))
    objects = store.objects
    real_write_new = objects.write_new

    def write_new(key, data):
        ok = real_write_new(key, data)
        if key.startswith("journal/"):
            raise Crash("after_journal")
        return ok

    monkeypatch.setattr(objects, "write_new", write_new)
    with pytest.raises(Crash):
        store.erase([2, 4])
    monkeypatch.undo()
    (Path(uri) / "locks" / "mutation.json").unlink(missing_ok=True)
    # The crashed process appends example 2 again: that copy is not what the erasure meant.
    new_tokens, new_rows = example(77)
    with store.writer() as w:
        w.append([2], [new_tokens], [new_rows], replace=True)

    readonly = GradStore.open(uri, read_only=True)
    assert sorted(readonly.ids()) == [0, 1, 2, 3, 5]
    assert torch.equal(readonly.get(2).rows, new_rows)
    assert readonly.is_erased(4) and not readonly.is_erased(2)  # no tombstone yet: the journal says so
    assert sorted(GradStore.open(uri).ids()) == [0, 1, 2, 3, 5]  # a writable open finishes it alike


def test_stale_lock_of_a_dead_process_is_broken(tmp_path):
    uri = str(tmp_path / "store")
    store = GradStore.create(uri, dim=DIM, vocab_size=VOCAB, dtype="float32")
    tokens, rows = example(1)
    with store.writer() as w:
        w.append([1], [tokens], [rows])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (Path(uri) / "locks").mkdir(exist_ok=True)
    holder = {"owner": "x", "pid": int(dead.stdout), "host": socket.gethostname(), "acquired": time.time()}
    (Path(uri) / "locks" / "mutation.json").write_text(json.dumps(holder))
    assert store.erase([1]).erased == [1]


def test_orphaned_segment_files_are_invisible_and_collected(tmp_path, monkeypatch):
    uri = str(tmp_path / "store")
    store = GradStore.create(uri, dim=DIM, vocab_size=VOCAB, dtype="float32")
    objects = store.objects
    monkeypatch.setattr(objects, "write_new", lambda key, data: (_ for _ in ()).throw(Crash("before manifest")))
    tokens, rows = example(5)
    with pytest.raises(Crash), store.writer() as w:
        w.append([5], [tokens], [rows])
    monkeypatch.undo()
    assert GradStore.open(uri).ids() == []
    orphans = len([p for p in (Path(uri) / "segments").iterdir() if p.is_dir()])
    assert orphans >= 1  # leaving the `with` block retried the commit once more: also uncommitted
    import gradstore.store as store_module

    monkeypatch.setattr(store_module, "ORPHAN_GRACE_S", 0.0)
    assert GradStore.open(uri).compact().orphans_removed == orphans
    assert not [p for p in (Path(uri) / "segments").iterdir() if p.is_dir()]


def test_a_write_interrupted_between_its_temp_file_and_its_name_leaves_nothing_after_compaction(tmp_path):
    """A crash after `link` and before the temp file's unlink leaves a second name of a committed manifest (with
    its IDs): it must not outlive the erasure of those IDs. Compaction sweeps such files once they are old."""
    uri = Path(tmp_path / "store")
    store = GradStore.create(str(uri), dim=DIM, vocab_size=VOCAB, dtype="float32")
    tokens, rows = example(5)
    with store.writer() as w:
        w.append(["secret-id"], [tokens], [rows])
    (manifest,) = (uri / "manifests").iterdir()
    left_behind = manifest.with_name(f".{manifest.name}.0123456789abcdef.tmp")
    os.link(manifest, left_behind)
    fresh = manifest.with_name(f".{manifest.name}.fedcba9876543210.tmp")
    fresh.write_bytes(b"a write in progress")
    hour_ago = time.time() - 2 * 3600
    os.utime(left_behind, (hour_ago, hour_ago))
    store.erase(["secret-id"])
    report = GradStore.open(str(uri)).compact()
    assert report.temporaries_removed == 1 and not left_behind.exists() and fresh.exists()
    assert not [p for p in uri.rglob("*") if p.is_file() and b"secret-id" in p.read_bytes()]


def test_a_retired_manifest_is_durably_gone_before_its_segment_files_are_deleted(tmp_path, monkeypatch):
    """Without a power cut to test with: the order of directory syncs, creations and deletions that survives one."""
    uri = Path(tmp_path / "store")
    store = GradStore.create(str(uri), dim=DIM, vocab_size=VOCAB, dtype="float32")
    tokens, rows = example(5)
    with store.writer() as w:
        w.append([1, 2], [tokens, tokens], [rows, rows])
    (old,) = [p.name for p in (uri / "segments").iterdir() if p.is_dir()]
    events = []
    objects = type(store.objects)
    for name in ("_sync_dir", "delete", "delete_prefix", "write_new"):
        def recording(self, arg, *rest, _name=name, _original=getattr(objects, name)):
            events.append((_name, Path(arg).name if _name == "_sync_dir" else arg))
            return _original(self, arg, *rest)
        monkeypatch.setattr(objects, name, recording)
    store.erase([1])
    (new,) = [p.name for p in (uri / "segments").iterdir() if p.is_dir()]
    # The new segment's entry in segments/ is on disk before the manifest that names it is created ...
    created = events.index(("write_new", f"manifests/{new}.json"))
    assert ("_sync_dir", "segments") in events[:created]
    # ... and the old manifest's removal before the old segment's files go.
    deleted = events.index(("delete", f"manifests/{old}.json"))
    removed = events.index(("delete_prefix", f"segments/{old}"))
    assert ("_sync_dir", "manifests") in events[deleted:removed]


def test_opening_a_store_while_another_process_erases_does_not_wait_for_it(tmp_path):
    from gradstore._lock import mutation_lock

    uri = Path(tmp_path / "store")
    store = GradStore.create(str(uri), dim=DIM, vocab_size=VOCAB, dtype="float32")
    tokens, rows = example(5)
    with store.writer() as w:
        w.append([1, 2], [tokens, tokens], [rows, rows])
    (uri / "journal").mkdir(exist_ok=True)
    (uri / "journal" / "running.json").write_text(json.dumps({"receipt": "running", "hashes": [], "time": 0}))
    with mutation_lock(store.objects):  # an erasure in progress: its lock and its journal entry
        started = time.monotonic()
        assert sorted(GradStore.open(str(uri)).ids()) == [1, 2]
        assert time.monotonic() - started < 5
    assert (uri / "journal" / "running.json").exists()  # left to the erasure that owns it
