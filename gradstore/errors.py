"""The store's error hierarchy.

Every error the store raises on purpose derives from `GradStoreError`, and the ones a caller is likely to
catch also derive from the matching built-in (`ValueError`, `KeyError`, `FileNotFoundError`) so that generic
code keeps working. Messages name the offending thing (the ID, the field, the path).
"""

from __future__ import annotations


class GradStoreError(Exception):
    """Base class of every error raised on purpose by `gradstore`."""


class StoreNotFoundError(GradStoreError, FileNotFoundError):
    """Nothing exists at the URI given to `GradStore.open`."""


class NotAStoreError(GradStoreError):
    """Something exists at the URI but it is not a gradstore (no valid `gradstore.json`)."""


class FormatError(GradStoreError):
    """The store's format metadata or a manifest is malformed."""


class FormatVersionError(FormatError):
    """The store was written by a newer, incompatible version of the format."""


class InvalidInputError(GradStoreError, ValueError):
    """An argument is malformed: wrong shape, dtype, range, non-finite values, bad ID..."""


class DuplicateIdError(InvalidInputError):
    """An ID is appended that the store (or the same call) already holds, without `replace=True`."""

    def __init__(self, example_id: object, where: str = "the store"):
        self.example_id = example_id
        super().__init__(f"duplicate ID {example_id!r}: already in {where} (pass replace=True to overwrite it)")


class UnknownIdError(GradStoreError, KeyError):
    """An ID that the store does not hold. `ids`: every unknown ID of the request (`example_id` is the first)."""

    def __init__(self, example_id: object, message: str | None = None, *, ids: list[object] | None = None):
        self.example_id = example_id
        self.ids = list(ids) if ids else [example_id]
        super().__init__(message or f"unknown ID {example_id!r}: not in the store")

    @classmethod
    def naming(cls, ids: list[object], action: str) -> UnknownIdError:
        """"cannot <action> unknown IDs 'a', 'b': not in the store" for every unknown ID of a request (the
        message shows the first 10)."""
        shown = ", ".join(repr(i) for i in ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
        plural = "s" if len(ids) > 1 else ""
        return cls(ids[0], f"cannot {action} unknown ID{plural} {shown}: not in the store", ids=ids)

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


class ErasedError(UnknownIdError):
    """An ID whose example was erased (a tombstone records that it existed, never what it held)."""

    def __init__(self, example_id: object):
        super().__init__(example_id, f"ID {example_id!r} was erased from the store")


class StoreLockedError(GradStoreError):
    """Another process holds the store's mutation lock (erase / compact) and did not release it in time."""


class ReadOnlyError(GradStoreError):
    """A mutation was attempted on a store opened read-only."""
