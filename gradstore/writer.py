"""`StoreWriter`: validated, batched appends that commit immutable segments.

Durability: with the default `buffer_bytes=0` every `append` call commits one segment before it returns, so
an example whose `append` returned survives any crash. With `buffer_bytes > 0`, appends accumulate in memory
and commit when the buffer reaches that size, on `flush()`, and on `close()` / leaving the `with` block —
fewer, larger segments (better for ingest during training), durable only from the commit on.

Validation happens before anything is buffered or written: a call either appends all its examples or none,
and bad input never touches what is committed.
"""

from __future__ import annotations

import os
import threading
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np

from ._encoding import ExampleId, as_list, encode_meta, encode_rows, normalize_id, to_numpy_tokens
from ._segment import SegmentData
from .errors import DuplicateIdError, InvalidInputError

if TYPE_CHECKING:
    from .store import GradStore


class StoreWriter:
    """Appends examples to a store. One writer per thread / process / rank; use as a context manager."""

    def __init__(self, store: GradStore, *, buffer_bytes: int = 0, name: str | None = None):
        if not isinstance(buffer_bytes, (int, np.integer)) or isinstance(buffer_bytes, bool) or buffer_bytes < 0:
            raise InvalidInputError(f"buffer_bytes must be a non-negative integer, got {buffer_bytes!r}")
        self.store = store
        self.buffer_bytes = int(buffer_bytes)
        self.name = name or f"pid{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._parts: list[SegmentData] = []
        self._buffered_ids: set[ExampleId] = set()
        self._replaced: set[ExampleId] = set()
        self._buffered_size = 0
        self._closed = False
        self._lock = threading.Lock()
        self.segments_committed = 0
        self.examples_committed = 0

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        # Even when the block raised: every append that returned was valid, so it is committed, not dropped.
        self.close()

    def append(self, ids: Any, token_ids: Any, rows: Any, meta: Any = None, *, replace: bool = False) -> int:
        """Append n examples; returns n.

        ids: n IDs (non-negative ints or strings of 1-256 UTF-8 bytes). token_ids: n sequences of k_i distinct
        ints in [0, vocab_size). rows: n float arrays/tensors [k_i, D] (k_i may be 0), finite. meta: None or n
        dicts of JSON values; the key "tokens" (the example's token sequence) is stored apart as int32.
        An ID the store already holds is an error unless `replace=True`, which supersedes the old copy.
        """
        if self._closed:
            raise InvalidInputError(f"writer {self.name} is closed")
        ids = as_list(ids, "ids")
        token_ids = as_list(token_ids, "token_ids")
        rows = as_list(rows, "rows")
        metas = [None] * len(ids) if meta is None else as_list(meta, "meta")
        if not len(ids) == len(token_ids) == len(rows) == len(metas):
            raise InvalidInputError(
                f"lengths differ: {len(ids)} ids, {len(token_ids)} token_ids, {len(rows)} rows, {len(metas)} meta"
            )
        config = self.store.config
        keys: list[ExampleId] = []
        seen: set[ExampleId] = set()  # a set beside the list: the duplicate check stays O(1) for large appends
        tokens_out, rows_out, scales_out, meta_out, seqs = [], [], [], [], []
        for i, raw_id in enumerate(ids):
            key = normalize_id(raw_id)
            where = f"example {i} (ID {key!r})"
            if key in seen:
                raise DuplicateIdError(key, "this append call")
            if not replace and (key in self._buffered_ids or self.store._contains_live(key)):
                raise DuplicateIdError(key)
            tokens = to_numpy_tokens(token_ids[i], config.vocab_size, where)
            encoded = encode_rows(rows[i], config.dim, config.dtype, where)
            if len(tokens) != len(encoded.values):
                raise InvalidInputError(f"{where}: {len(tokens)} token ids but {len(encoded.values)} rows")
            meta_bytes, sequence = encode_meta(metas[i], where, config.vocab_size)
            keys.append(key)
            seen.add(key)
            tokens_out.append(tokens)
            rows_out.append(encoded.values)
            scales_out.append(encoded.scales)
            meta_out.append(np.frombuffer(meta_bytes, dtype=np.uint8))
            seqs.append(np.zeros(0, np.int32) if sequence is None else sequence)
        if not keys:
            return 0

        def offsets(parts: list[np.ndarray]) -> np.ndarray:
            return np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)

        part = SegmentData(
            ids=keys,
            row_offsets=offsets(tokens_out),
            token_ids=np.concatenate(tokens_out).astype(np.int32, copy=False),
            rows=np.concatenate(rows_out) if rows_out else np.zeros((0, config.dim)),
            scales=np.concatenate(scales_out).astype(np.float32) if config.dtype == "int8" else None,
            seq_offsets=offsets(seqs),
            seq_tokens=np.concatenate(seqs).astype(np.int32, copy=False),
            meta_offsets=offsets(meta_out),
            meta_json=np.concatenate(meta_out),
        )
        with self._lock:
            self._parts.append(part)
            self._buffered_ids.update(keys)
            if replace:
                self._replaced.update(keys)
            self._buffered_size += part.rows.nbytes + part.token_ids.nbytes + part.meta_json.nbytes
            if self._buffered_size >= self.buffer_bytes:
                self._flush_locked()
        return len(keys)

    def flush(self) -> None:
        """Commit everything buffered as one segment."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._parts:
            return
        data = SegmentData.concatenate(self._parts) if len(self._parts) > 1 else self._parts[0]
        self.store._commit(data, writer=self.name)
        replaced = self._replaced
        self._parts, self._buffered_ids, self._replaced, self._buffered_size = [], set(), set(), 0
        self.segments_committed += 1
        self.examples_committed += len(data.ids)
        if replaced:
            self.store.drop_shadowed(replaced)

    def close(self) -> None:
        """Commit what is buffered; the writer cannot be used afterwards."""
        if self._closed:
            return
        self.flush()
        self._closed = True
