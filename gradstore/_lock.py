"""The mutation lock: erasure and compaction rewrite segments, so only one may run at a time per store.

Appends never take it (each writer writes its own segments). The lock is an object created with create-only
semantics, so it works on S3 as well as locally. A holder that died leaves it behind: a lock is broken when
its lease has expired, or at once when it was taken on this host by a process that no longer exists.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from ._objects import ObjectStore
from .errors import StoreLockedError

LOCK_KEY = "locks/mutation.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(holder: dict, lease_s: float) -> bool:
    if time.time() - float(holder.get("acquired", 0)) > lease_s:
        return True
    return holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1)))


@contextmanager
def mutation_lock(objects: ObjectStore, *, timeout_s: float = 60.0, lease_s: float = 3600.0) -> Iterator[str]:
    """Hold the store's mutation lock for the duration of the block; yields the owner token."""
    owner = uuid.uuid4().hex
    record = json.dumps({"owner": owner, "pid": os.getpid(), "host": socket.gethostname(),
                         "acquired": time.time()}).encode()
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while not objects.write_new(LOCK_KEY, record):
        try:
            holder = json.loads(objects.read(LOCK_KEY))
        except (FileNotFoundError, ValueError):
            continue  # released (or being written) between our attempt and the read: try again
        if _is_stale(holder, lease_s):
            objects.delete(LOCK_KEY)
            continue
        if time.monotonic() > deadline:
            raise StoreLockedError(
                f"{objects.uri}: another process (pid {holder.get('pid')} on {holder.get('host')}) is erasing or "
                f"compacting; gave up after {timeout_s:.0f} s"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
    try:
        yield owner
    finally:
        try:
            if json.loads(objects.read(LOCK_KEY)).get("owner") == owner:
                objects.delete(LOCK_KEY)
        except (FileNotFoundError, ValueError):
            pass
