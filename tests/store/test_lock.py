"""The mutation lock: malformed lock objects never hang or crash a waiter, and a stale lock is broken by one
process only (compare-and-delete), never by two that both judged it stale."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from gradstore import StoreLockedError
from gradstore._lock import LOCK_KEY, mutation_lock
from gradstore._objects import LocalObjects, open_objects

STALE = json.dumps({"owner": "dead", "pid": 1, "host": "another-host", "acquired": 0}).encode()


@pytest.fixture
def objects(tmp_path):
    return LocalObjects(tmp_path / "store")


@pytest.fixture
def any_objects(location):
    uri, options = location
    return open_objects(uri, options)


class CountingReads(LocalObjects):
    def __init__(self, root):
        super().__init__(root)
        self.lock_reads = 0

    def read(self, key):
        if key == LOCK_KEY:
            self.lock_reads += 1
        return super().read(key)


@pytest.mark.parametrize("content", [
    b"",  # zero bytes
    b"\xff\xfe not utf-8",
    b"{truncated",
    b"[]",
    b"null",
    b'{"acquired": "yesterday"}',
    b'{"owner": "x", "pid": "12", "host": "h", "acquired": 1.0}',
    b'{"owner": "x", "pid": -1, "host": "h", "acquired": 1.0}',  # os.kill(-1, 0) would probe every process
    b'{"owner": "x", "pid": 12, "host": "h", "acquired": NaN}',
])
def test_a_malformed_lock_object_times_out_with_a_named_error_without_spinning(tmp_path, content):
    objects = CountingReads(tmp_path / "store")
    objects.write(LOCK_KEY, content)
    started = time.monotonic()
    message = r"locks/mutation\.json: the mutation lock object is not a valid"
    with pytest.raises(StoreLockedError, match=message), mutation_lock(objects, timeout_s=0.1):
        pytest.fail("took a lock held by an object younger than the lease")
    assert time.monotonic() - started < 2
    # Backing off 10, 20, 40, 80 ms: a handful of reads in 0.1 s, where the old loop made thousands.
    assert objects.lock_reads < 15
    assert objects.read(LOCK_KEY) == content  # a young lock object is left alone


def test_a_malformed_lock_object_older_than_the_lease_is_broken(objects):
    objects.write(LOCK_KEY, b"[]")
    old = time.time() - 7200
    os.utime(objects.root / LOCK_KEY, (old, old))
    with mutation_lock(objects, timeout_s=0.2, lease_s=3600) as owner:
        assert json.loads(objects.read(LOCK_KEY))["owner"] == owner
    assert not objects.exists(LOCK_KEY)


def test_modified_is_the_time_of_the_last_write(any_objects):
    any_objects.write("locks/x.json", b"1")
    # S3's LastModified has one-second resolution; allow for that and a little clock skew from the server.
    assert abs(any_objects.modified("locks/x.json") - time.time()) < 60
    with pytest.raises(FileNotFoundError):
        any_objects.modified("locks/absent.json")


def test_delete_if_unchanged_deletes_only_the_bytes_compared(any_objects):
    any_objects.write(LOCK_KEY, b"theirs")
    assert not any_objects.delete_if_unchanged(LOCK_KEY, b"mine")
    assert any_objects.read(LOCK_KEY) == b"theirs"
    assert any_objects.delete_if_unchanged(LOCK_KEY, b"theirs")
    assert not any_objects.exists(LOCK_KEY)
    assert not any_objects.delete_if_unchanged(LOCK_KEY, b"theirs")  # already gone


def test_s3_delete_if_unchanged_is_conditional_on_the_version_compared(s3_location):
    uri, options = s3_location
    objects = open_objects(uri, options)
    objects.write(LOCK_KEY, b"stale")
    real_call = objects._fs.call_s3

    def replace_then_call(method, **kwargs):
        if method == "delete_object":  # another process replaces the object between our GET and our DELETE
            objects.write(LOCK_KEY, b"fresh")
        return real_call(method, **kwargs)

    objects._fs.call_s3 = replace_then_call
    assert not objects.delete_if_unchanged(LOCK_KEY, b"stale")
    objects._fs.call_s3 = real_call
    assert objects.read(LOCK_KEY) == b"fresh"


def test_a_stale_lock_is_broken_on_every_backend(any_objects):
    any_objects.write(LOCK_KEY, STALE)
    with mutation_lock(any_objects, timeout_s=1) as owner:
        assert json.loads(any_objects.read(LOCK_KEY))["owner"] == owner
    assert not any_objects.exists(LOCK_KEY)


def test_two_processes_that_judge_the_same_lock_stale_do_not_both_take_it(tmp_path):
    """B reads the stale holder, then is descheduled while A breaks the lock and takes it. B's delete must not
    remove A's lock: B waits until A releases."""
    root = tmp_path / "store"
    objects = LocalObjects(root)
    objects.write(LOCK_KEY, STALE)
    b_read_stale, a_holds = threading.Event(), threading.Event()
    inside: list[str] = []
    overlaps: list[tuple[str, ...]] = []

    class PausesAfterReadingTheStaleHolder(LocalObjects):
        def read(self, key):
            data = super().read(key)
            if key == LOCK_KEY and not b_read_stale.is_set():
                b_read_stale.set()
                a_holds.wait(5)
            return data

    def hold(name: str, objs: LocalObjects, seconds: float) -> None:
        with mutation_lock(objs, timeout_s=5):
            if inside:
                overlaps.append((*inside, name))
            inside.append(name)
            if name == "A":
                a_holds.set()
            time.sleep(seconds)
            inside.remove(name)

    def a() -> None:
        b_read_stale.wait(5)
        hold("A", LocalObjects(root), 0.2)  # long enough for B to resume and (wrongly) break A's lock

    b = threading.Thread(target=hold, args=("B", PausesAfterReadingTheStaleHolder(root), 0.0))
    ta = threading.Thread(target=a)
    b.start()
    ta.start()
    b.join(10)
    ta.join(10)
    assert a_holds.is_set() and not overlaps
    assert not objects.exists(LOCK_KEY)


def test_release_leaves_a_successors_lock_alone(objects):
    successor = json.dumps({"owner": "next", "pid": os.getpid(), "host": "h", "acquired": time.time()}).encode()
    with mutation_lock(objects, timeout_s=1):
        # Our lease expired meanwhile; another process broke the lock and took it.
        objects.delete(LOCK_KEY)
        assert objects.write_new(LOCK_KEY, successor)
    assert objects.read(LOCK_KEY) == successor


def test_a_create_whose_answer_was_lost_is_recognised_as_ours(objects):
    """On S3 a create-only PUT that reached the server but whose answer was lost is retried and refused (412):
    the object there is our own record, not another holder's."""
    real = objects.write_new
    calls = []

    def lost_answer(key, data):
        calls.append(key)
        if len(calls) == 1:
            real(key, data)  # it landed ...
            return False  # ... but the retried request reports that the key exists
        return real(key, data)
    objects.write_new = lost_answer
    started = time.monotonic()
    with mutation_lock(objects, timeout_s=2):
        assert json.loads(objects.read(LOCK_KEY))["pid"] == os.getpid()
    assert time.monotonic() - started < 1 and not objects.exists(LOCK_KEY)


def test_replace_if_unchanged_replaces_only_the_bytes_compared(any_objects):
    assert not any_objects.replace_if_unchanged(LOCK_KEY, b"a", b"b")  # nothing there
    any_objects.write(LOCK_KEY, b"a")
    assert not any_objects.replace_if_unchanged(LOCK_KEY, b"other", b"b")
    assert any_objects.read(LOCK_KEY) == b"a"
    assert any_objects.replace_if_unchanged(LOCK_KEY, b"a", b"b")
    assert any_objects.read(LOCK_KEY) == b"b"


def test_a_live_holder_renews_its_lease_past_its_length(any_objects):
    """An erasure that runs longer than the lease keeps the lock: a waiter does not break it."""
    with mutation_lock(any_objects, timeout_s=1, lease_s=0.6) as owner:
        first = json.loads(any_objects.read(LOCK_KEY))["acquired"]
        with pytest.raises(StoreLockedError, match="another process"), \
                mutation_lock(any_objects, timeout_s=1.5, lease_s=0.6):
            pass
        record = json.loads(any_objects.read(LOCK_KEY))
        assert record["owner"] == owner and record["acquired"] > first
    assert not any_objects.exists(LOCK_KEY)  # the release compares against the renewed record


def test_a_holder_whose_lock_was_broken_does_not_renew_over_its_successor(objects):
    successor = json.dumps({"owner": "next", "pid": os.getpid(), "host": "h", "acquired": time.time()}).encode()
    with mutation_lock(objects, timeout_s=1, lease_s=0.15):
        objects.delete(LOCK_KEY)  # broken while we stalled; another process took it
        assert objects.write_new(LOCK_KEY, successor)
        time.sleep(0.2)  # several renewal periods
        assert objects.read(LOCK_KEY) == successor
    assert objects.read(LOCK_KEY) == successor


def test_named_store_locks_follow_the_same_rules(tmp_path):
    from gradstore import GradStore, InvalidInputError

    store = GradStore.create(tmp_path / "s", dim=4, vocab_size=8)
    with store.lock("forget-commit") as owner:
        assert json.loads(store.objects.read("locks/forget-commit.json"))["owner"] == owner
        with pytest.raises(StoreLockedError, match="holds this lock"), store.lock("forget-commit", timeout_s=0):
            pass
        with store.lock("another", timeout_s=0):  # independent of other names
            pass
    assert not store.objects.exists("locks/forget-commit.json")
    for bad in ("mutation", "../x", "Upper", ""):
        with pytest.raises(InvalidInputError, match="not a lock name"), store.lock(bad):
            pass


def test_an_audit_record_appended_twice_under_one_name_is_kept_once(tmp_path):
    from gradstore import GradStore, InvalidInputError

    store = GradStore.create(tmp_path / "s", dim=4, vocab_size=8)
    name = store.audit_name()
    assert store.append_audit({"n": 1}, name=name) == store.append_audit({"n": 2}, name=name)
    assert store.audit_log() == [{"n": 1}]
    with pytest.raises(InvalidInputError, match="not an audit record name"):
        store.append_audit({"n": 3}, name="../gradstore")


def test_audit_names_sort_after_the_newest_record_even_with_a_clock_behind(tmp_path):
    """A writer whose clock is behind (another host) still names its record after those already written."""
    from gradstore import GradStore

    store = GradStore.create(tmp_path / "s", dim=4, vocab_size=8)
    ahead = f"{time.time_ns() + 3600 * 10**9:020d}-{'a' * 8}"  # a record written by a host an hour ahead
    store.append_audit({"n": 1}, name=ahead)
    later = store.audit_name()
    assert later > ahead and int(later[:20]) == int(ahead[:20]) + 1
    store.append_audit({"n": 2}, name=later)
    assert store.audit_log() == [{"n": 1}, {"n": 2}]


def test_a_lock_left_by_an_earlier_process_with_our_pid_is_broken_at_once(objects):
    """After a container restart the new process often has the dead holder's pid (1) and hostname."""
    import socket

    left = json.dumps({"owner": "before-the-restart", "pid": os.getpid(), "host": socket.gethostname(),
                       "acquired": time.time()}).encode()
    objects.write(LOCK_KEY, left)
    with mutation_lock(objects, timeout_s=0.5) as owner:
        assert json.loads(objects.read(LOCK_KEY))["owner"] == owner


def test_a_live_pid_that_another_process_now_holds_is_not_the_holder(objects, monkeypatch):
    """Told apart by the process's identity (boot and start time); pid 1 is alive on every host. The identity
    is stubbed, so that the test runs where /proc does not tell it too."""
    import socket

    from gradstore import _lock

    monkeypatch.setattr(_lock, "_process_identity", lambda pid: f"this-boot:{pid}")
    reused = json.dumps({"owner": "old", "pid": 1, "host": socket.gethostname(), "acquired": time.time(),
                         "process": "another-boot:1"}).encode()
    objects.write(LOCK_KEY, reused)
    with mutation_lock(objects, timeout_s=0.5):
        pass
    alive = json.dumps({"owner": "init", "pid": 1, "host": socket.gethostname(), "acquired": time.time(),
                        "process": "this-boot:1"}).encode()
    objects.write(LOCK_KEY, alive)
    with pytest.raises(StoreLockedError), mutation_lock(objects, timeout_s=0.2):
        pass


def test_a_renewal_whose_answer_was_lost_is_still_released(tmp_path):
    class LostAnswer(LocalObjects):
        lost = 0

        def replace_if_unchanged(self, key, expected, data):
            done = super().replace_if_unchanged(key, expected, data)
            if done and not self.lost:
                self.lost += 1
                raise OSError("connection reset")  # the write landed; the answer did not
            return done

        def read(self, key):
            if key == LOCK_KEY and self.lost == 1:
                raise OSError("still unreachable")  # nor can the holder read back what is there
            return super().read(key)

    objects = LostAnswer(tmp_path / "store")
    with mutation_lock(objects, timeout_s=1, lease_s=0.3):
        time.sleep(0.15)  # one renewal: landed, answer lost
        objects.lost = 2  # reachable again
        time.sleep(0.3)  # later renewals recognise the one that landed and renew from it
    assert not objects.exists(LOCK_KEY)
