"""Erasure at the byte level: after `erase`, the erased examples' bytes occur in no file under the store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gradstore import GradStore, InvalidInputError


def all_bytes(root: str) -> list[tuple[str, bytes]]:
    return [(str(p), p.read_bytes()) for p in Path(root).rglob("*") if p.is_file()]


def test_erased_rows_ids_and_metadata_leave_every_file(tmp_path):
    # Uncompressed, so that the raw bytes of rows would be findable if they were still anywhere.
    uri = str(tmp_path / "store")
    store = GradStore.create(uri, dim=16, vocab_size=500, dtype="float32", codec="none")
    rng = np.random.default_rng(0)
    secret_rows = torch.from_numpy(rng.standard_normal((5, 16)).astype(np.float32))
    with store.writer() as w:
        w.append(["alice-secret-id", "bob"], [[1, 2, 3, 4, 5], [6, 7]],
                 [secret_rows, torch.ones(2, 16)],
                 [{"tokens": [401, 402, 403], "note": "alice-private-note"}, {"tokens": [1, 2]}])
        w.append(["carol"], [[9]], [torch.ones(1, 16)])
    needles = [secret_rows[i].numpy().tobytes() for i in range(5)] + [b"alice-secret-id", b"alice-private-note"]
    assert any(n in data for _, data in all_bytes(uri) for n in needles)  # present before

    receipt = store.erase(["alice-secret-id"])
    assert receipt.erased == ["alice-secret-id"] and receipt.segments_rewritten == 1
    for path, data in all_bytes(uri):
        for needle in needles:
            assert needle not in data, f"erased bytes remain in {path}"
    # The tombstone holds only a salted hash, the time and the receipt id.
    (tombstone,) = (Path(uri) / "tombstones").iterdir()
    doc = json.loads(tombstone.read_text())
    assert set(doc) == {"hash", "erased_at", "receipt"} and doc["receipt"] == receipt.receipt_id
    assert doc["hash"] == store.id_hash("alice-secret-id") and len(doc["hash"]) == 64
    # The rest is intact, and erasing again is a no-op that reports it.
    reopened = GradStore.open(uri)
    assert sorted(reopened.ids()) == ["bob", "carol"]
    assert reopened.get("bob").meta == {"tokens": [1, 2]}
    again = reopened.erase(["alice-secret-id"])
    assert again.erased == [] and again.already_erased == ["alice-secret-id"]


def test_compressed_store_erasure_leaves_no_ids_and_no_rows_in_decoded_arrays(tmp_path):
    uri = str(tmp_path / "store")
    store = GradStore.create(uri, dim=8, vocab_size=100, dtype="bfloat16")
    rows = torch.arange(3 * 8, dtype=torch.float32).reshape(3, 8) + 1000
    with store.writer() as w:
        w.append(["x-erase-me", "y"], [[1, 2, 3], [4]], [rows, torch.zeros(1, 8)])
    store.erase(["x-erase-me"])
    for path, data in all_bytes(uri):
        assert b"x-erase-me" not in data, path
    import zarr

    group = zarr.open_group(uri, mode="r")
    for _, segment in group["segments"].groups():
        stored = segment["rows"][...].view(np.int16)
        erased = rows.to(torch.bfloat16).view(torch.int16).numpy()
        assert not any((stored == r).all(axis=1).any() for r in erased)


def test_erasing_every_example_of_a_segment_removes_it(tmp_path):
    uri = str(tmp_path / "store")
    store = GradStore.create(uri, dim=4, vocab_size=10, dtype="float32")
    with store.writer() as w:
        w.append([1, 2], [[1], [2]], [torch.ones(1, 4)] * 2)
        w.append([3], [[3]], [torch.ones(1, 4)])
    store.erase([1, 2])
    assert GradStore.open(uri).stats().segments == 1
    assert len([p for p in (Path(uri) / "segments").iterdir() if p.is_dir()]) == 1


# --- every copy of an ID goes, and moving copies never changes which one is current -------------------------
def rows_of(value: float, k: int = 1) -> torch.Tensor:
    return torch.full((k, 4), value)


def two_copies_of_x(uri: str) -> GradStore:
    """A store holding x twice: the older copy (1.5) beside y, the newer (777.25) appended by a handle whose
    index predates the first append (in real life: another process), so nothing dropped the older one."""
    first = GradStore.create(uri, dim=4, vocab_size=100, dtype="float32", codec="none")
    late = GradStore.open(uri)
    with first.writer() as w:
        w.append(["x", "y"], [[1], [2]], [rows_of(1.5), rows_of(2.5)])
    with late.writer() as w:
        w.append(["x"], [[3]], [rows_of(777.25)])
    store = GradStore.open(uri)
    assert store.stats().shadowed_copies == 1 and store.get("x").rows[0, 0] == 777.25
    return store


def test_rewriting_a_segment_does_not_bring_back_an_older_copy(tmp_path):
    store = two_copies_of_x(str(tmp_path / "store"))
    store.erase(["y"])  # rewrites the older segment, which also held the older x
    for handle in (store, GradStore.open(store.uri)):
        assert handle.get("x").rows[0, 0] == 777.25
    assert GradStore.open(store.uri).stats().shadowed_copies == 0  # the rewrite left the older copy out


def test_erasing_an_id_removes_its_shadowed_copies_too(tmp_path):
    uri = str(tmp_path / "store")
    store = two_copies_of_x(uri)
    receipt = store.erase(["x"])
    assert receipt.erased == ["x"] and receipt.segments_rewritten == 2  # both segments that held a copy
    reopened = GradStore.open(uri)
    assert "x" not in reopened and reopened.is_erased("x") and reopened.ids() == ["y"]
    older_row = np.float32(1.5).tobytes() * 4
    for path, data in all_bytes(uri):
        assert b'"x"' not in data and older_row not in data, path


def test_a_compaction_killed_after_its_commit_cannot_bring_erased_examples_back(tmp_path, monkeypatch):
    uri = str(tmp_path / "store")
    store = GradStore.create(uri, dim=4, vocab_size=100, dtype="float32")
    for example_id, value in (("a", 11.0), ("b", 22.0)):
        with store.writer() as w:
            w.append([example_id], [[1]], [rows_of(value)])

    class Killed(Exception):
        pass

    def killed(self, segment):
        raise Killed
    with monkeypatch.context() as m:  # the merged segment is committed; its sources' manifests stay behind
        m.setattr(GradStore, "_retire", killed)
        with pytest.raises(Killed):
            store.compact(small_rows=10)
    survivor = GradStore.open(uri)
    assert sorted(survivor.ids()) == ["a", "b"] and len(list((Path(uri) / "manifests").iterdir())) == 3
    survivor.erase(["a", "b"])  # empties the merged segment: the superseded sources must not come back
    reopened = GradStore.open(uri)
    assert reopened.ids() == [] and reopened.is_erased("a") and reopened.is_erased("b")
    assert list((Path(uri) / "manifests").iterdir()) == []


def test_an_interrupted_erasure_finds_its_examples_after_another_process_rewrote_their_segment(
        tmp_path, monkeypatch):
    uri = str(tmp_path / "store")
    store = GradStore.create(uri, dim=4, vocab_size=100, dtype="float32", codec="none")
    with store.writer() as w:
        w.append(["x", "y"], [[1], [2]], [rows_of(13.0), rows_of(2.0)])
    other = GradStore.open(uri)  # another process, already running

    class Killed(Exception):
        pass

    def killed(self, journal, keys=None):
        raise Killed
    with monkeypatch.context() as m:  # killed right after the journal entry
        m.setattr(GradStore, "_apply_erasure", killed)
        with pytest.raises(Killed):
            store.erase(["x"])
    with other.writer() as w:  # replacing y rewrites the segment the journal entry was written against
        w.append(["y"], [[3]], [rows_of(3.0)], replace=True)
    reopened = GradStore.open(uri)  # replays the journal
    assert reopened.ids() == ["y"] and reopened.is_erased("x")
    assert not list((Path(uri) / "journal").iterdir())
    for path, data in all_bytes(uri):
        assert np.float32(13.0).tobytes() * 4 not in data, path


def test_erase_refuses_a_single_string(tmp_path):
    store = GradStore.create(str(tmp_path / "store"), dim=4, vocab_size=100, dtype="float32")
    with store.writer() as w:
        w.append(["a", "b", "ab"], [[1], [2], [3]], [rows_of(1.0)] * 3)
    for call in (store.erase, store.get_many, store.get_sequences):
        with pytest.raises(InvalidInputError, match="single string"):
            call("ab")  # iterated, it would name 'a' and 'b'
    with pytest.raises(InvalidInputError, match="sequence"):
        store.erase(5)
    assert sorted(store.ids()) == ["a", "ab", "b"]


def test_replaying_an_interrupted_erasure_spares_a_copy_appended_after_it(tmp_path, monkeypatch):
    uri = str(tmp_path / "store")
    store = GradStore.create(uri, dim=4, vocab_size=100, dtype="float32")
    with store.writer() as w:
        w.append(["x", "y"], [[1], [2]], [rows_of(1.0), rows_of(2.0)])
    other = GradStore.open(uri)  # another process, already running

    class Killed(Exception):
        pass

    def killed(*args, **kwargs):
        raise Killed
    with monkeypatch.context() as m:
        m.setattr(GradStore, "_rewrite_segment", killed)
        with pytest.raises(Killed):
            store.erase(["x"])
    with other.writer() as w:  # x appended again after the interrupted request; its flush replays the journal
        w.append(["x"], [[3]], [rows_of(7.0)], replace=True)
    reopened = GradStore.open(uri)
    assert reopened.get("x").rows[0, 0] == 7.0 and not list((Path(uri) / "journal").iterdir())
    assert reopened.stats().shadowed_copies == 0  # the copy the request meant is gone


def test_a_crash_between_a_manifest_and_its_files_leaves_no_erased_bytes(tmp_path, monkeypatch):
    uri = str(tmp_path / "store")
    store = GradStore.create(uri, dim=4, vocab_size=100, dtype="float32", codec="none")
    with store.writer() as w:
        w.append(["x", "y"], [[1], [2]], [rows_of(1234.5678), rows_of(1.0)])

    class Killed(Exception):
        pass

    def killed(prefix):
        raise Killed
    monkeypatch.setattr(store.objects, "delete_prefix", killed)
    with pytest.raises(Killed):
        store.erase(["x"])
    monkeypatch.undo()
    reopened = GradStore.open(uri)  # the next writable open finishes the retirement
    assert reopened.is_erased("x") and reopened.ids() == ["y"]
    for path, data in all_bytes(uri):
        assert np.float32(1234.5678).tobytes() * 4 not in data, path


def test_a_replay_spares_a_slow_append_whose_order_precedes_the_request(tmp_path):
    """The appender takes its commit order, then its manifest lands late: meanwhile a later segment commits and an
    erasure of the same ID is interrupted after its journal. The append returned, so its copy must survive the
    replay, as it survives when the erasure is not interrupted."""
    uri = str(tmp_path / "store")
    store = GradStore.create(uri, dim=4, vocab_size=100, dtype="float32")
    with store.writer() as w:
        w.append(["x"], [[1]], [rows_of(1.0)])
    appender, other, eraser = GradStore.open(uri), GradStore.open(uri), GradStore.open(uri)

    class Killed(BaseException):
        pass

    def killed(*args, **kwargs):
        raise Killed
    eraser._apply_erasure = killed
    commit, fired = appender.objects.write_new, []

    def land_late(key, data):
        if key.startswith("manifests/") and not fired:
            fired.append(key)
            with other.writer() as w:
                w.append(["y"], [[2]], [rows_of(5.0)])
            with pytest.raises(Killed):
                eraser.erase(["x"])
        return commit(key, data)
    appender.objects.write_new = land_late
    with appender.writer() as w:
        w.append(["x"], [[3]], [rows_of(2.0)], replace=True)
    reopened = GradStore.open(uri)  # replays the journal
    assert reopened.get("x").rows[0, 0] == 2.0 and not list((Path(uri) / "journal").iterdir())


def test_a_compaction_killed_before_its_commit_leaves_no_rows_an_erasure_must_remove(tmp_path, monkeypatch):
    uri = str(tmp_path / "store")
    store = GradStore.create(uri, dim=4, vocab_size=100, dtype="float32", codec="none")
    for example_id, value in (("x", 4321.125), ("y", 1.0)):
        with store.writer() as w:
            w.append([example_id], [[1]], [rows_of(value)])

    class Killed(BaseException):
        pass
    commit = store.objects.write_new

    def killed_at_the_manifest(key, data):
        if key.startswith("manifests/"):
            raise Killed
        return commit(key, data)
    monkeypatch.setattr(store.objects, "write_new", killed_at_the_manifest)
    with pytest.raises(Killed):
        store.compact(small_rows=1 << 20)  # the merged segment's files (x's rows among them) are written
    monkeypatch.undo()
    GradStore.open(uri).erase(["x"])  # its first step deletes the crashed merge's files
    for path, data in all_bytes(uri):
        assert np.float32(4321.125).tobytes() * 4 not in data and b'"x"' not in data, path
