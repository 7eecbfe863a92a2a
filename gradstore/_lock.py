"""The mutation lock: erasure and compaction rewrite segments, so only one may run at a time per store.

Appends never take it (each writer writes its own segments). The lock is an object (`locks/mutation.json`,
a JSON record of owner token, pid, host and acquisition time) created with create-only semantics, so it works
on S3 as well as locally.

A holder that died leaves the object behind. It is broken (treated as stale) when:

- its lease has expired (`acquired` older than `lease_s`), or at once when it was taken on this host by a
  process that no longer exists (a pid now held by another process, told apart by its start time, or our own
  pid when this process does not hold the lock, as after a container restart, counts as gone);
- it is not a valid record (not JSON, not an object, fields of the wrong type): gradstore writes the lock in
  one atomic create, so such an object is corruption or a foreign writer. It is broken once the object itself
  (its modification time) is older than the lease; until then a waiter gives up after `timeout_s` with a
  `StoreLockedError` naming the lock object.

Breaking is a compare-and-delete (`ObjectStore.delete_if_unchanged`) of exactly the bytes judged stale: two
processes that both judged the same lock stale cannot both take it, because once the first has deleted it and
created its own lock, the second's delete no longer matches. Locally this is atomic (an flock serialises the
deleters; on a network file system, as far as it implements flock). On S3 it is a conditional DELETE
(`If-Match` on the ETag of the bytes compared), atomic where the server honours `If-Match` (AWS documents it
for DeleteObject; moto honours it). Remaining window: a server that ignores `If-Match` (or refuses it, see
`S3Objects.delete_if_unchanged`) deletes whatever is there, so between the comparison and the DELETE (one
request) a second breaker could remove the lock the first has just taken. Release uses the same
compare-and-delete, so a holder whose lease expired and whose lock was broken never deletes its successor's
lock.

A live holder renews its lease: a background thread rewrites the record with a fresh `acquired` every third of
the lease, so an erasure or compaction that runs longer than the lease is not broken under it. Only a holder
that stopped (killed, or stalled for two thirds of the lease) loses the lock. A renewal is a compare-and-replace
of its own last record (`ObjectStore.replace_if_unchanged`), so a holder whose lock was broken never overwrites
its successor's: atomic locally (under the same flock as breaking); on S3 it is read, compare, PUT, with the
one-request window described above.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ._objects import ObjectStore
from .errors import StoreLockedError

LOCK_KEY = "locks/mutation.json"
_MAX_PID = 2**31 - 1  # os.kill takes a C int; anything larger cannot be a pid


@dataclass(frozen=True)
class _Holder:
    """A valid lock record."""

    owner: str
    pid: int
    host: str
    acquired: float  # time.time() of the holder when it took the lock
    process: str | None = None  # `_process_identity` of the holder (None: not recorded, or not Linux)


def _parse_holder(raw: bytes) -> _Holder | str:
    """The holder recorded in the lock object, or a description of why the object is not a valid record."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"not JSON ({err})"
    if not isinstance(doc, dict):
        return f"a JSON {type(doc).__name__}, not an object"
    owner, pid, host, acquired = (doc.get(k) for k in ("owner", "pid", "host", "acquired"))
    if not isinstance(owner, str):
        return f"owner {owner!r} is not a string"
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid <= _MAX_PID:
        return f"pid {pid!r} is not a process id"
    if not isinstance(host, str):
        return f"host {host!r} is not a string"
    if not isinstance(acquired, (int, float)) or isinstance(acquired, bool) or not math.isfinite(acquired):
        return f"acquired {acquired!r} is not a time"
    process = doc.get("process")
    return _Holder(owner, pid, host, float(acquired), process if isinstance(process, str) else None)


def _process_identity(pid: int) -> str | None:
    """Which process `pid` is, beyond its number: the boot and the process's start time (Linux /proc), so that a
    pid reused by another process, after a restart of a container say (where the new process is often pid 1
    again), is not taken for the holder. None where /proc does not tell."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": the comm may hold spaces
    return f"{boot}:{fields[19]}" if len(fields) > 19 else None  # field 22 of stat: start time, in ticks


_OWN_PROCESS = _process_identity(os.getpid())
_HELD_HERE: set[str] = set()  # owner tokens of the locks this process holds now


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(objects: ObjectStore, key: str, holder: _Holder | str, lease_s: float) -> bool:
    if isinstance(holder, str):  # an invalid record: judged by the object's own age
        try:
            return time.time() - objects.modified(key) > lease_s
        except FileNotFoundError:
            return False  # gone meanwhile: the next attempt to create it decides
    if time.time() - holder.acquired > lease_s:
        return True
    if holder.host != socket.gethostname():
        return False
    if holder.pid == os.getpid():
        # Our own pid: either a lock this process holds now, or one a previous process with the same pid left
        # (a restarted container's pid 1).
        return holder.owner not in _HELD_HERE
    if not _pid_alive(holder.pid):
        return True
    return holder.process is not None and holder.process != _process_identity(holder.pid)  # pid reused


def _record(owner: str, acquired: float) -> bytes:
    return json.dumps({"owner": owner, "pid": os.getpid(), "host": socket.gethostname(), "acquired": acquired,
                       "process": _OWN_PROCESS}).encode()


@contextmanager
def mutation_lock(objects: ObjectStore, *, timeout_s: float = 60.0, lease_s: float = 3600.0,
                  key: str = LOCK_KEY) -> Iterator[str]:
    """Hold the store's mutation lock (or another lock object `key`, same rules) for the duration of the block;
    yields the owner token.

    Waits up to `timeout_s` for another holder, then raises `StoreLockedError`. A holder older than `lease_s`
    (or dead on this host) is broken; the lease is renewed while the block runs. See the module docstring.
    """
    owner = uuid.uuid4().hex
    record = _record(owner, time.time())
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while not objects.write_new(key, record):
        try:
            raw = objects.read(key)
        except FileNotFoundError:
            raw = None  # released between our attempt and the read
        if raw == record:
            break  # ours: a create that reached the server but whose answer was lost, then retried (S3: 412)
        holder = _parse_holder(raw) if raw is not None else None
        # Delete only the exact bytes judged stale: if another process broke them first and took the lock, its
        # record differs and stays. After a break, try again at once.
        if holder is not None and _is_stale(objects, key, holder, lease_s) and objects.delete_if_unchanged(key, raw):
            continue
        # Every other pass checks the deadline and backs off, whatever it read: nothing here may spin.
        if time.monotonic() > deadline:
            raise StoreLockedError(_locked_message(objects, key, holder, timeout_s, lease_s))
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
    _HELD_HERE.add(owner)
    lease = None
    try:
        lease = _Lease(objects, key, owner, record, renew_every_s=lease_s / 3)
        yield owner
    finally:
        _HELD_HERE.discard(owner)
        # Compare-and-delete our own (latest) record: if our lease expired and another process broke the lock
        # and took it, the object is theirs now and stays.
        for candidate in lease.stop() if lease is not None else [record]:
            if objects.delete_if_unchanged(key, candidate):
                break


class _Lease:
    """Renews a held lock's `acquired` from a daemon thread until `stop()`, which returns the records that may be
    in place (one, or two after a renewal whose outcome is unknown)."""

    def __init__(self, objects: ObjectStore, key: str, owner: str, record: bytes, *, renew_every_s: float):
        self._objects, self._key, self._owner, self._record = objects, key, owner, record
        self._maybe: bytes | None = None  # a renewal that may have landed (its answer was lost)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(renew_every_s,), name="gradstore-lock-lease",
                                        daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stopped.wait(every_s):
            fresh = _record(self._owner, time.time())
            try:
                if self._objects.replace_if_unchanged(self._key, self._record, fresh):
                    self._record, self._maybe = fresh, None
                elif self._maybe is not None and self._objects.replace_if_unchanged(self._key, self._maybe, fresh):
                    self._record, self._maybe = fresh, None  # the unknown renewal had landed
                else:
                    return  # broken (we stalled past the lease) and perhaps taken: no longer ours to renew
            except OSError:
                # A failure of the object store; the write may still have landed. Both records stay candidates
                # until a later renewal or the release tells which one is there.
                self._maybe = fresh

    def stop(self) -> list[bytes]:
        self._stopped.set()
        self._thread.join()  # at most one renewal in flight: afterwards the records cannot change
        return [self._record] + ([self._maybe] if self._maybe is not None else [])


def _locked_message(objects: ObjectStore, key: str, holder: _Holder | str | None, timeout_s: float,
                    lease_s: float) -> str:
    where = f"{objects.uri}/{key}"
    if isinstance(holder, _Holder):
        doing = "erasing or compacting" if key == LOCK_KEY else "holds this lock"
        return f"{where}: another process (pid {holder.pid} on {holder.host}) {doing}; gave up after {timeout_s:g} s"
    if isinstance(holder, str):
        return (f"{where}: the mutation lock object is not a valid lock record ({holder}); gave up after "
                f"{timeout_s:g} s. It is treated as stale once older than the lease ({lease_s:g} s); if no "
                f"erase or compaction is running, delete it")
    return f"{where}: the mutation lock kept changing hands; gave up after {timeout_s:g} s"
