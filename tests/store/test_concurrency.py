"""Several processes (and threads) at once on one store: appends, reads, erasures and compactions.

Every example is present exactly once afterwards, readers never see a retired segment's absence, and the
current copy of an ID stays current however its segments are rewritten or merged."""

from __future__ import annotations

import multiprocessing as mp
import threading

import numpy as np
import pytest
import torch

from gradstore import FormatError, GradStore


def write_range(uri: str, worker: int, n: int) -> None:
    store = GradStore.open(uri)
    rng = np.random.default_rng(worker)
    with store.writer(name=f"worker{worker}") as w:
        for start in range(0, n, 5):
            ids = [f"w{worker}-{i}" for i in range(start, start + 5)]
            tokens = [rng.choice(100, size=3, replace=False) for _ in ids]
            rows = [torch.full((3, 4), float(worker)) for _ in ids]
            w.append(ids, tokens, rows)


def test_four_processes_append_concurrently(tmp_path):
    uri = str(tmp_path / "store")
    GradStore.create(uri, dim=4, vocab_size=100, dtype="bfloat16")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=write_range, args=(uri, w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    store = GradStore.open(uri)
    ids = store.ids()
    assert len(ids) == len(set(ids)) == 160
    assert store.stats().shadowed_copies == 0
    batch = store.get_many(ids)
    for j, example_id in enumerate(batch.ids):
        worker = int(example_id[1 : example_id.index("-")])
        assert bool((batch.example(j).rows.float() == worker).all())
    # Compaction merges the 32 small segments without losing or duplicating anything.
    store.compact()
    reopened = GradStore.open(uri)
    assert sorted(reopened.ids()) == sorted(ids) and reopened.stats().segments == 1


# --- readers and writers meeting erasure and compaction ------------------------------------------------------
def one_row(value: float) -> list[torch.Tensor]:
    return [torch.full((1, 4), float(value))]


def test_a_replacement_committed_during_a_compaction_stays_the_current_copy(tmp_path):
    """The writer's segment is written before, and committed after, a compaction that merged the older copy:
    the replacement must win (and the older copy go), whatever the segments' names say."""
    uri = str(tmp_path / "store")
    store = GradStore.create(uri, dim=4, vocab_size=100, dtype="float32")
    for example_id, value in (("x", 1.5), ("z", 9.0)):
        with store.writer() as w:
            w.append([example_id], [[1]], one_row(value))
    compactor, writer_side = GradStore.open(uri), GradStore.open(uri)
    commit = writer_side.objects.write_new
    merged = []

    def compact_just_before_the_commit(key, data):
        if key.startswith("manifests/") and not merged:
            merged.append(compactor.compact(small_rows=1 << 20).segments_merged)
        return commit(key, data)
    writer_side.objects.write_new = compact_just_before_the_commit
    with writer_side.writer() as w:
        w.append(["x"], [[3]], one_row(777.25), replace=True)
    assert merged == [2]
    for handle in (writer_side, GradStore.open(uri)):
        assert handle.get("x").rows[0, 0] == 777.25 and handle.get("z").rows[0, 0] == 9.0
    assert GradStore.open(uri).stats().shadowed_copies == 0


def test_a_reader_survives_segments_retired_by_another_process(tmp_path):
    uri = str(tmp_path / "store")
    store = GradStore.create(uri, dim=4, vocab_size=100, dtype="float32")
    with store.writer() as w:
        w.append(["keep", "gone"], [[1], [3]], one_row(1.0) + one_row(2.0),
                 [{"tokens": [5, 6, 7]}, {"tokens": [8]}])
    reader = GradStore.open(uri, read_only=True)
    assert reader.get("keep").rows[0, 0] == 1.0  # its segment's readers and shard indexes are now cached
    GradStore.open(uri).erase(["gone"])  # rewrites that segment and deletes the old one
    assert reader.get("keep").rows[0, 0] == 1.0
    with store.writer() as w:
        w.append(["z"], [[4]], one_row(4.0))
    stale = GradStore.open(uri, read_only=True)
    GradStore.open(uri).compact(small_rows=1 << 20)
    assert stale.get_sequences(["keep"]) == [[5, 6, 7]]
    assert sorted(stale.ids()) == ["keep", "z"]


def test_iterating_while_another_process_compacts_yields_every_example_once(tmp_path):
    uri = str(tmp_path / "store")
    store = GradStore.create(uri, dim=4, vocab_size=100, dtype="float32")
    for i in range(4):
        with store.writer() as w:
            w.append([f"e{i}a", f"e{i}b"], [[i], [i + 10]], one_row(i) + one_row(i + 10))
    reader = GradStore.open(uri, read_only=True)
    seen = []
    for n, (ids, _) in enumerate(reader.iter_sequences(batch_size=1)):
        seen += ids
        if n == 0:  # the snapshot being iterated now names three retired segments
            GradStore.open(uri).compact(small_rows=1 << 20)
    assert sorted(seen) == sorted(f"e{i}{s}" for i in range(4) for s in "ab")


def test_threads_sharing_a_handle_read_while_it_compacts(tmp_path):
    store = GradStore.create(str(tmp_path / "store"), dim=4, vocab_size=100, dtype="float32")
    with store.writer() as w:
        w.append(["keep"], [[1]], one_row(5.0))
    stop, errors, reads = threading.Event(), [], [0]

    def read() -> None:
        while not stop.is_set():
            try:
                assert store.get("keep").rows[0, 0] == 5.0
                reads[0] += 1
            except Exception as err:  # every failure is the finding
                errors.append(repr(err))
    thread = threading.Thread(target=read)
    thread.start()
    try:
        for i in range(15):
            with store.writer() as w:
                w.append([f"t{i}"], [[2]], one_row(1.0))
            store.compact(small_rows=1 << 20)
    finally:
        stop.set()
        thread.join()
    assert not errors and reads[0] > 0


def test_a_missing_shard_of_a_committed_segment_is_an_error_not_zeros(tmp_path):
    uri = tmp_path / "store"
    store = GradStore.create(str(uri), dim=4, vocab_size=100, dtype="float32", chunk_rows=2, shard_rows=4)
    with store.writer() as w:
        w.append(["a"], [list(range(1, 9))], [torch.arange(32, dtype=torch.float32).reshape(8, 4) + 1])
    shards = sorted(uri.glob("segments/*/rows/c/*/0"))
    assert len(shards) == 2
    shards[1].unlink()
    with pytest.raises(FormatError, match="missing"):
        GradStore.open(str(uri)).get("a")


def test_a_slow_replacement_stays_current_through_a_merge_of_later_segments(tmp_path):
    """The replacement's commit order is taken before its manifest lands; meanwhile a later segment commits and a
    compaction merges it with the old copy. Each copy keeps its own order, so the merge does not lift the old one."""
    uri = str(tmp_path / "store")
    store = GradStore.create(uri, dim=4, vocab_size=100, dtype="float32")
    with store.writer() as w:
        w.append(["x"], [[1]], one_row(1.0))
    slow, other = GradStore.open(uri), GradStore.open(uri)
    commit, fired = slow.objects.write_new, []

    def land_late(key, data):
        if key.startswith("manifests/") and not fired:
            fired.append(key)
            with other.writer() as w:  # committed after the replacement took its order
                w.append(["y"], [[2]], one_row(5.0))
            other.compact(small_rows=1 << 20)  # merges the old x with y
        return commit(key, data)
    slow.objects.write_new = land_late
    with slow.writer() as w:
        w.append(["x"], [[3]], one_row(2.0), replace=True)
    for handle in (slow, GradStore.open(uri)):
        assert handle.get("x").rows[0, 0] == 2.0 and handle.get("y").rows[0, 0] == 5.0


def test_iterating_while_this_handle_erases_compacts_or_replaces(tmp_path):
    for n, mutate in enumerate((lambda s: s.compact(small_rows=1 << 20), lambda s: s.erase(["e2"]),
                                lambda s: s.writer().__enter__().append(["e0"], [[9]], one_row(9.0), replace=True))):
        store = GradStore.create(str(tmp_path / f"store{n}"), dim=4, vocab_size=100, dtype="float32")
        for i in range(3):
            with store.writer() as w:
                w.append([f"e{i}"], [[i]], one_row(i))
        seen = []
        for batch in store.iter_batches(batch_size=1):
            seen += batch.ids
            if len(seen) == 1:
                mutate(store)
        assert sorted(seen) == sorted(store.ids()), (n, seen)  # every example once; an erased one skipped


def test_a_refresh_on_another_thread_between_commit_and_index_does_not_count_a_segment_twice(tmp_path):
    store = GradStore.create(str(tmp_path / "store"), dim=4, vocab_size=100, dtype="float32")
    with store.writer() as w:
        w.append(["a"], [[1]], one_row(1.0))
    commit = store.objects.write_new

    def refresh_in_the_window(key, data):
        created = commit(key, data)
        if key.startswith("manifests/"):
            thread = threading.Thread(target=store.refresh)
            thread.start()
            thread.join()
        return created
    store.objects.write_new = refresh_in_the_window
    with store.writer() as w:
        w.append(["b", "c"], [[2], [3]], one_row(2.0) + one_row(2.0))
    store.objects.write_new = commit
    assert store.ids() == ["a", "b", "c"] and store.stats().shadowed_copies == 0
    store.compact(small_rows=1 << 20)
    assert GradStore.open(store.uri).ids() == ["a", "b", "c"]


def test_a_refresh_does_not_bring_back_a_segment_another_thread_retired_while_it_read(tmp_path):
    uri = str(tmp_path / "store")
    store = GradStore.create(uri, dim=4, vocab_size=100, dtype="float32")
    with store.writer() as w:
        w.append(["a"], [[1]], one_row(1.0))
    shared = GradStore.open(uri)
    with store.writer() as w:  # another process commits x: unknown to `shared` until it refreshes
        w.append(["x"], [[2]], one_row(2.0))
    read, erased = shared.objects.read, []

    def erase_in_between(key):
        data = read(key)
        if key.startswith("manifests/") and threading.current_thread().name == "lister" and not erased:
            eraser = threading.Thread(target=lambda: erased.append(shared.erase(["x"])))
            eraser.start()
            eraser.join()  # erases x (retiring its segment) between the lister's read and its merge
        return data
    shared.objects.read = erase_in_between
    lister = threading.Thread(target=shared.refresh, name="lister")
    lister.start()
    lister.join()
    shared.objects.read = read
    assert erased and erased[0].erased == ["x"]
    assert "x" not in shared and shared.ids() == ["a"] and shared.is_erased("x")
