"""The lock on a model directory that one writer of its weights holds: a server for as long as it serves the
model, `gradstore forget` for the length of its run.

Two writers of one model directory each start from the weights they loaded, so the second to commit would
silently replace the first one's forget with weights that still hold what it erased. (The engine also refuses
to commit over weights replaced since it read them; this lock turns that late refusal into an early one.)
Standard library only: the command line takes it without importing torch first.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

LOCK_FILE = ".gradstore-server.lock"


class ModelInUseError(RuntimeError):
    """Another process holds the model directory (a server serving it, or a `gradstore forget`)."""


class ModelDirLock:
    """An exclusive `flock` on `<model dir>/.gradstore-server.lock`, taken at construction (or refused with
    `ModelInUseError` at once, never waited for) and held until `release()` or the end of a `with` block.
    The kernel drops it with the process, so a killed holder never leaves the directory locked."""

    def __init__(self, model_dir: str | os.PathLike[str]):
        self.path = Path(model_dir)
        if not (self.path / "config.json").exists():
            raise FileNotFoundError(f"{self.path} is not a saved model (no config.json)")
        lock_path = self.path / LOCK_FILE
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ModelInUseError(f"the model in {self.path} is in use by another gradstore process (a "
                                      "server serving it, or a `gradstore forget`)") from None
            # The holder removes the file when it lets go (`release`). If that happened between our open and
            # our flock, we hold a lock on a file nobody else will open: take the current one.
            try:
                current = os.stat(lock_path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                break
            os.close(fd)
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Let go (idempotent)."""
        if self._fd is None:
            return
        # Removed while still held, so that no model directory keeps a stale lock file after a clean stop
        # or a failed start (a SIGKILL leaves it behind, harmlessly: the flock dies with the process).
        try:
            os.unlink(self.path / LOCK_FILE)
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None

    def __enter__(self) -> ModelDirLock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
