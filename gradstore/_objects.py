"""Byte-level access to where a store lives: a local directory or an S3 prefix.

The store needs very little from its backend: whole-object reads and writes, ranged reads (for chunk-level
random access), listing one "directory", deletes, and one atomic primitive — *create-only* writes — on which
every commit rests (a segment becomes visible when its manifest is created, and creating it must fail rather
than overwrite). Locally that is a temporary file hard-linked into place (`os.link` fails if the name exists,
and the linked file is already complete); on S3 it is a conditional PUT (`If-None-Match: *`).

The mutation lock needs one more: `delete_if_unchanged`, a compare-and-delete, so that a process breaking a
dead holder's lock cannot delete a lock that another process took meanwhile. Locally every such delete runs
under an `flock` on a hidden guard file beside the object, which makes "re-read, compare, unlink" atomic with
respect to every other deleter (creators cannot replace an existing name). On S3 it is a conditional DELETE
(`If-Match: <ETag>`) of the version whose bytes were compared; a server that ignores `If-Match` leaves a
window of one request between the comparison and the delete (see `S3Objects.delete_if_unchanged`).

Keys are '/'-separated paths relative to the store root, like zarr's.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import InvalidInputError, NotAStoreError


class ObjectStore(ABC):
    """The operations the store needs from a backend. Missing keys raise `FileNotFoundError`."""

    uri: str
    is_local = False  # a local file system: reads are cheap enough to issue one after another

    @abstractmethod
    def read(self, key: str) -> bytes: ...

    @abstractmethod
    def read_range(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes from `start`; a negative `start` counts from the end (then `length` must be -start)."""

    @abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Write or replace `key` atomically: readers see the old or the new object, never a mix."""

    def write_raw(self, key: str, data: bytes) -> None:
        """Write an object of a segment being built: no atomic rename, no fsync (`make_durable` comes later)."""
        self.write(key, data)

    @abstractmethod
    def write_new(self, key: str, data: bytes) -> bool:
        """Create `key` only if it does not exist; returns False (and writes nothing) if it does."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def modified(self, key: str) -> float:
        """When `key` was last written, as seconds since the epoch (the backend's clock)."""

    def delete_if_unchanged(self, key: str, expected: bytes) -> bool:
        """Delete `key` only if it still holds exactly `expected`; True if this call deleted it.

        This generic version re-reads, compares, then deletes: between the comparison and the delete another
        process may replace the object. Backends override it with an atomic version where they can.
        """
        try:
            if self.read(key) != expected:
                return False
        except FileNotFoundError:
            return False
        self.delete(key)
        return True

    def replace_if_unchanged(self, key: str, expected: bytes, data: bytes) -> bool:
        """Overwrite `key` with `data` only if it still holds exactly `expected`; True if this call wrote it.

        This generic version re-reads, compares, then writes, with the same window as `delete_if_unchanged`.
        """
        try:
            if self.read(key) != expected:
                return False
        except FileNotFoundError:
            return False
        self.write(key, data)
        return True

    @abstractmethod
    def list_dir(self, prefix: str) -> list[str]:
        """Names (not paths) directly under `prefix`, sorted; an empty list if the prefix is absent."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing key is not an error (deletes are retried after crashes)."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete everything under `prefix`."""

    @abstractmethod
    def size_of_prefix(self, prefix: str) -> int:
        """Total bytes of the objects under `prefix`."""

    @abstractmethod
    def is_empty(self) -> bool:
        """True if nothing at all exists at the store root."""

    @abstractmethod
    def zarr_store(self) -> Any:
        """A zarr v3 `Store` rooted at the same place, for zarr-python to write arrays into."""

    def remove_stale_temporaries(self, older_than_s: float) -> int:
        """Delete temporary files a crashed write left behind (older than `older_than_s`); returns how many.

        Only a local directory has them (`write` and `write_new` go through a hidden temp file); object
        stores write in one request.
        """
        return 0

    def make_durable(self, prefix: str) -> None:  # noqa: B027 - deliberately a no-op by default
        """Flush what was written under `prefix` to stable storage before it is committed (no-op remotely)."""


class LocalObjects(ObjectStore):
    """A directory on a local (POSIX) file system."""

    is_local = True

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.uri = str(self.root)
        # A regular file where the store's directory (or one of its parents) should be would otherwise surface
        # as a raw NotADirectoryError from the first read or mkdir.
        for path in (self.root, *self.root.parents):
            if path.exists():
                if not path.is_dir():
                    where = "is" if path == self.root else f"lies under {path}, which is"
                    raise NotAStoreError(f"{self.uri} {where} a file, not a directory: a store is a directory")
                break

    def _path(self, key: str) -> Path:
        return self.root / key

    def read(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def read_range(self, key: str, start: int, length: int) -> bytes:
        # One pread on a raw descriptor: no buffered file object to build for a read of a few chunks. (The
        # descriptor is not kept: an open one would keep an erased segment's bytes alive on disk.)
        fd = os.open(self._path(key), os.O_RDONLY)
        try:
            if start < 0:
                start = max(os.fstat(fd).st_size + start, 0)
            return os.pread(fd, length, start)
        finally:
            os.close(fd)

    def _write_temp(self, key: str, data: bytes) -> Path:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def remove_stale_temporaries(self, older_than_s: float) -> int:
        # A crash between `_write_temp` and its rename/link/unlink leaves `.<name>.<uuid>.tmp`. It may hold what
        # the object held (a manifest names its segment's IDs; after `link` it is even a second name of the
        # committed manifest), so it must not outlive an erasure: compaction sweeps the old ones.
        cutoff, removed = time.time() - older_than_s, 0
        for path in self.root.rglob(".*.tmp"):
            try:
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue  # its writer finished meanwhile
        return removed

    def _sync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write(self, key: str, data: bytes) -> None:
        tmp = self._write_temp(key, data)
        os.replace(tmp, self._path(key))
        self._sync_dir(self._path(key).parent)

    def write_raw(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    def write_new(self, key: str, data: bytes) -> bool:
        # The temp file is complete and fsynced before it gets its final name, so a crash can never leave a
        # half-written object under `key`; os.link refuses to replace an existing name.
        tmp = self._write_temp(key, data)
        try:
            os.link(tmp, self._path(key))
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        self._sync_dir(self._path(key).parent)
        return True

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def modified(self, key: str) -> float:
        return os.stat(self._path(key)).st_mtime

    def delete_if_unchanged(self, key: str, expected: bytes) -> bool:
        path = self._path(key)
        with self._compare_guard(path) as guarded:
            if not guarded or not self._holds(path, expected):
                return False
            path.unlink()
            self._sync_dir(path.parent)
            return True

    def replace_if_unchanged(self, key: str, expected: bytes, data: bytes) -> bool:
        path = self._path(key)
        with self._compare_guard(path) as guarded:
            if not guarded or not self._holds(path, expected):
                return False
            self.write(key, data)
            return True

    @contextmanager
    def _compare_guard(self, path: Path) -> Iterator[bool]:
        # Every compare-and-delete and compare-and-replace of `path` holds an exclusive flock on a hidden guard
        # file beside it, so no other of them can change the object between our read and our change; and nothing
        # else can replace an existing name (creation is create-only). So the object changed is the one
        # compared. The guard file stays (a few bytes of inode, hidden from list_dir by its leading dot). Yields
        # False when not even the directory exists.
        try:
            fd = os.open(path.with_name(f".{path.name}.delete-guard"), os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            yield False
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield True
        finally:
            os.close(fd)  # releases the flock

    @staticmethod
    def _holds(path: Path, expected: bytes) -> bool:
        try:
            return path.read_bytes() == expected
        except FileNotFoundError:
            return False

    def list_dir(self, prefix: str) -> list[str]:
        try:
            names = os.listdir(self._path(prefix))
        except FileNotFoundError:
            return []
        return sorted(n for n in names if not n.startswith("."))

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Durable before whatever the caller deletes next: a manifest's removal must reach the disk before its
        # segment's files go, or a power cut could leave a manifest naming files that no longer exist.
        if path.parent.is_dir():
            self._sync_dir(path.parent)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def size_of_prefix(self, prefix: str) -> int:
        total = 0
        for dirpath, _, files in os.walk(self._path(prefix)):
            for name in files:
                try:
                    total += os.stat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:
                    pass
        return total

    def is_empty(self) -> bool:
        return not self.root.exists() or not any(self.root.iterdir())

    def zarr_store(self) -> Any:
        import zarr.storage

        self.root.mkdir(parents=True, exist_ok=True)
        return zarr.storage.LocalStore(self.root)

    def make_durable(self, prefix: str) -> None:
        # zarr-python writes chunk files without fsync; a segment must be on disk before its manifest is.
        for dirpath, _, files in os.walk(self._path(prefix)):
            for name in files:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self._sync_dir(Path(dirpath))
        # ... and the segment's own entry in its parent (`segments/`), before the manifest that names it exists.
        self._sync_dir(self._path(prefix).parent)


class S3Objects(ObjectStore):
    """An `s3://bucket/prefix` location, through s3fs (any S3-compatible endpoint).

    `storage_options` go to `s3fs.S3FileSystem` (e.g. `endpoint_url`, `key`, `secret`, `client_kwargs`).
    """

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        import s3fs

        if not uri.startswith("s3://"):
            raise InvalidInputError(f"not an S3 URI: {uri!r}")
        self.uri = uri.rstrip("/")
        self._base = self.uri[len("s3://") :]
        if "/" not in self._base:
            raise InvalidInputError(f"S3 URI {uri!r} needs a prefix after the bucket: s3://bucket/prefix")
        self.storage_options = dict(storage_options or {})
        self._fs = s3fs.S3FileSystem(**self.storage_options)

    def _path(self, key: str) -> str:
        return f"{self._base}/{key}" if key else self._base

    def read(self, key: str) -> bytes:
        return self._fs.cat_file(self._path(key))

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0:
            size = self._fs.size(self._path(key))
            start = size + start
        return self._fs.cat_file(self._path(key), start=start, end=start + length)

    def write(self, key: str, data: bytes) -> None:
        self._fs.pipe_file(self._path(key), data)  # a single PUT is atomic on S3

    def write_new(self, key: str, data: bytes) -> bool:
        try:
            self._fs.pipe_file(self._path(key), data, mode="create")
        except FileExistsError:
            return False
        except OSError as err:  # s3fs maps HTTP 412 (If-None-Match failed) to a generic OSError on some versions
            if "PreconditionFailed" in str(err) or "412" in str(err):
                return False
            raise
        return True

    def exists(self, key: str) -> bool:
        return self._fs.exists(self._path(key))

    def modified(self, key: str) -> float:
        return self._fs.modified(self._path(key), refresh=True).timestamp()

    def delete_if_unchanged(self, key: str, expected: bytes) -> bool:
        """GET the object and its ETag in one request, compare the bytes, then DELETE with `If-Match: <ETag>`.

        On a server that honours conditional deletes (AWS S3 documents `If-Match` on DeleteObject; moto, which the
        tests run against, honours it) the object deleted is the version compared.
        One that ignores `If-Match` deletes whatever is there: a window of one request remains. One that refuses
        the header (501 / NotImplemented) gets a plain DELETE after the comparison, with the same window.
        """
        from fsspec.asyn import sync

        bucket, path = self._path(key).split("/", 1)

        async def get() -> tuple[bytes, str]:
            response = await self._fs._call_s3("get_object", Bucket=bucket, Key=path)
            async with response["Body"] as body:
                return await body.read(), response["ETag"]

        try:
            data, etag = sync(self._fs.loop, get)
        except FileNotFoundError:
            return False
        if data != expected:
            return False
        try:
            self._fs.call_s3("delete_object", Bucket=bucket, Key=path, IfMatch=etag)
        except FileNotFoundError:
            return False
        except OSError as err:
            code = _s3_error_code(err)
            if code == "PreconditionFailed":
                return False  # replaced since we read it: not ours to delete
            if code != "NotImplemented":
                raise
            self.delete(key)
        finally:
            self._fs.invalidate_cache(self._path(key))
        return True

    def list_dir(self, prefix: str) -> list[str]:
        try:
            entries = self._fs.ls(self._path(prefix), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def delete(self, key: str) -> None:
        try:
            self._fs.rm_file(self._path(key))
        except FileNotFoundError:
            pass

    def delete_prefix(self, prefix: str) -> None:
        try:
            self._fs.rm(self._path(prefix), recursive=True)
        except FileNotFoundError:
            pass

    def size_of_prefix(self, prefix: str) -> int:
        try:
            return int(self._fs.du(self._path(prefix), total=True))
        except FileNotFoundError:
            return 0

    def is_empty(self) -> bool:
        try:
            return not self._fs.ls(self._base, refresh=True)
        except FileNotFoundError:
            return True

    def zarr_store(self) -> Any:
        import s3fs
        import zarr.storage

        fs = s3fs.S3FileSystem(asynchronous=True, **self.storage_options)
        return zarr.storage.FsspecStore(fs, path=self._base)


def _s3_error_code(err: BaseException) -> str | None:
    """The S3 error code behind an OSError that s3fs translated from a botocore ClientError (its __cause__)."""
    response = getattr(err.__cause__, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


def open_objects(uri: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> ObjectStore:
    """The backend for a URI: `s3://bucket/prefix`, `file:///path`, or a plain local path."""
    text = os.fspath(uri)
    if text.startswith("s3://"):
        return S3Objects(text, storage_options)
    if "://" in text and not text.startswith("file://"):
        raise InvalidInputError(f"unsupported store URI {text!r}: use a local path, file://... or s3://bucket/prefix")
    if storage_options:
        raise InvalidInputError("storage_options apply only to s3:// stores")
    return LocalObjects(text.removeprefix("file://"))
