"""gradstore: a Zarr v3 store of per-example sparse gradient rows, keyed by example ID.

    from gradstore import GradStore
    store = GradStore.create(uri, dim=768, vocab_size=50257, dtype="bfloat16", model_id="gpt2")
    with store.writer() as w:
        w.append(ids, token_ids, rows, meta)
    batch = GradStore.open(uri).get_many(ids)
"""

from ._format import FORMAT_VERSION
from .errors import (
    DuplicateIdError,
    ErasedError,
    FormatError,
    FormatVersionError,
    GradStoreError,
    InvalidInputError,
    NotAStoreError,
    ReadOnlyError,
    StoreLockedError,
    StoreNotFoundError,
    UnknownIdError,
)
from .examples import Batch, Example
from .store import CompactionReport, ErasureReceipt, GradStore, StoreStats
from .writer import StoreWriter

__all__ = [
    "FORMAT_VERSION",
    "Batch",
    "CompactionReport",
    "DuplicateIdError",
    "ErasedError",
    "ErasureReceipt",
    "Example",
    "FormatError",
    "FormatVersionError",
    "GradStore",
    "GradStoreError",
    "InvalidInputError",
    "NotAStoreError",
    "ReadOnlyError",
    "StoreLockedError",
    "StoreNotFoundError",
    "StoreStats",
    "StoreWriter",
    "UnknownIdError",
]
