"""`GradStore`: the facade over segments, manifests, the index, erasure and compaction."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._encoding import ExampleId, as_list, decode_rows, id_key, normalize_id
from ._format import METADATA_KEY, STORED_DTYPES, CodecConfig, StoreConfig
from ._index import Index
from ._lock import mutation_lock
from ._objects import ObjectStore, open_objects
from ._segment import (
    MANIFESTS,
    SEGMENT_NAME,
    SEGMENTS,
    Manifest,
    SegmentData,
    SegmentReader,
    group_metadata,
    new_segment_id,
    write_segment,
)
from .errors import (
    ErasedError,
    FormatError,
    InvalidInputError,
    NotAStoreError,
    ReadOnlyError,
    StoreLockedError,
    StoreNotFoundError,
    UnknownIdError,
)
from .examples import Batch, Example

if TYPE_CHECKING:
    from .writer import StoreWriter

TOMBSTONES = "tombstones"
JOURNAL = "journal"
AUDIT = "audit"
_AUDIT_NAME = re.compile(r"[0-9]{20}-[0-9a-f]{8}")
_LOCK_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_READ_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="gradstore-read")
_LISTING_ATTEMPTS = 20  # a listing whose manifests vanish before they are read is taken again
_READ_ATTEMPTS = 5  # a read whose segment was retired meanwhile is looked up again (each retry: a mutation landed)
RETIRING = "retiring"  # retiring/<segment>: a segment whose manifest is being deleted, files next
ORPHAN_GRACE_S = 3600.0  # an uncommitted segment younger than this may still be being written


@dataclass(frozen=True)
class ErasureReceipt:
    """What `erase` did. `erased` and `already_erased` hold the caller's own IDs; nothing stored keeps them."""

    receipt_id: str
    erased: list[ExampleId]
    already_erased: list[ExampleId]
    segments_rewritten: int
    bytes_removed: int
    erased_at: float

    def to_dict(self) -> dict[str, Any]:
        return {"receipt_id": self.receipt_id, "erased": self.erased, "already_erased": self.already_erased,
                "segments_rewritten": self.segments_rewritten, "bytes_removed": self.bytes_removed,
                "erased_at": self.erased_at}


@dataclass(frozen=True)
class CompactionReport:
    segments_before: int
    segments_after: int
    segments_merged: int
    orphans_removed: int
    superseded_removed: int
    temporaries_removed: int = 0  # temp files of writes a crash interrupted (local directories only)


@dataclass(frozen=True)
class StoreStats:
    uri: str
    model_id: str
    dtype: str
    dim: int
    vocab_size: int
    format_version: int
    examples: int
    rows: int
    segments: int
    tombstones: int
    shadowed_copies: int
    bytes_on_disk: int
    rows_logical_bytes: int
    rows_stored_bytes: int
    codec: dict[str, Any] = field(default_factory=dict)

    @property
    def compression_ratio(self) -> float:
        """Logical bytes of the rows in the store's dtype over the bytes they take on disk."""
        return self.rows_logical_bytes / self.rows_stored_bytes if self.rows_stored_bytes else 1.0

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["compression_ratio"] = round(self.compression_ratio, 4)
        return out


_ITEMSIZE = {"float32": 4, "bfloat16": 2, "int8": 1}


class GradStore:
    """A store of per-example sparse gradient rows, keyed by example ID.

    Create with `GradStore.create(uri, dim=..., vocab_size=..., dtype=..., model_id=...)`, open with
    `GradStore.open(uri)`. `uri` is a local path, `file://...` or `s3://bucket/prefix` (with
    `storage_options` such as `{"endpoint_url": ...}` for S3-compatible servers).

    One `GradStore` object may be shared by threads. Several processes may append to one store at once (each
    writer commits its own segments); erasure and compaction take a store-wide lock.
    """

    def __init__(self, objects: ObjectStore, config: StoreConfig, *, read_only: bool = False):
        self._objects = objects
        self.config = config
        self.read_only = read_only
        self._lock = threading.RLock()
        self._index = Index()
        self._readers: dict[str, SegmentReader] = {}
        self._retired: set[str] = set()  # segments this handle retired
        self._pending_hashes: frozenset[str] = frozenset()  # salted hashes of journaled erasures left unfinished
        self._salt = bytes.fromhex(config.id_salt)
        self.refresh()

    # ----------------------------------------------------------------------------------------------- opening
    @classmethod
    def create(cls, uri: str | os.PathLike[str], *, dim: int, vocab_size: int, dtype: str = "bfloat16",
               model_id: str = "", codec: str = "blosc-zstd", codec_level: int = 3, shuffle: str = "bitshuffle",
               checksum: bool = True, chunk_rows: int | None = None, shard_rows: int | None = None,
               capture_policy: str = "first", storage_options: dict[str, Any] | None = None) -> GradStore:
        """Create an empty store at `uri`, which must not exist or be an empty directory / prefix."""
        objects = open_objects(uri, storage_options)
        defaults = StoreConfig(dim=1, vocab_size=1, dtype="float32", model_id="")
        config = StoreConfig(
            dim=dim, vocab_size=vocab_size, dtype=dtype, model_id=model_id,
            codec=CodecConfig(name=codec, level=codec_level, shuffle=shuffle, checksum=checksum),
            chunk_rows=chunk_rows or defaults.chunk_rows, shard_rows=shard_rows or defaults.shard_rows,
            capture={"policy": capture_policy, "layer": "input_embedding"},
        )
        config.validate()
        if objects.exists(METADATA_KEY):
            raise InvalidInputError(f"a store already exists at {objects.uri}")
        if not objects.is_empty():
            raise NotAStoreError(f"{objects.uri} exists and is not empty; a new store needs an empty location")
        if not objects.write_new(METADATA_KEY, config.to_json()):
            raise InvalidInputError(f"a store was created at {objects.uri} concurrently")
        # The store is also a Zarr v3 hierarchy: the root and segments/ are groups, each segment a subgroup.
        objects.write("zarr.json", group_metadata({"gradstore_format_version": config.format_version}))
        objects.write(f"{SEGMENTS}/zarr.json", group_metadata({}))
        return cls(objects, config)

    @classmethod
    def open(cls, uri: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None,
             read_only: bool = False) -> GradStore:
        """Open an existing store: validate `gradstore.json`, rebuild the index from the manifests."""
        objects = open_objects(uri, storage_options)
        try:
            raw = objects.read(METADATA_KEY)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            if objects.is_empty():
                raise StoreNotFoundError(f"no store at {objects.uri}") from None
            raise NotAStoreError(f"{objects.uri} exists but is not a gradstore (no {METADATA_KEY})") from None
        config = StoreConfig.from_json(raw, objects.uri)
        store = cls(objects, config, read_only=read_only)
        if objects.list_dir(JOURNAL):
            finished = False
            if not read_only:
                # Without waiting: a journal entry under a live lock is an erasure running now, not a crashed
                # one, and every mutation replays the journal before it starts anyway.
                with contextlib.suppress(StoreLockedError), mutation_lock(objects, timeout_s=0):
                    store._replay_journal(locked=True)
                    finished = True
            if not finished:
                # Not finished here, but its examples are gone for this handle all the same: once an erasure is
                # journaled, no read may return what it erases, even if the process that asked for it crashed.
                store._hide_pending_erasures()
        return store

    @property
    def uri(self) -> str:
        return self._objects.uri

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def dtype(self) -> str:
        return self.config.dtype

    @property
    def model_id(self) -> str:
        return self.config.model_id

    def refresh(self) -> None:
        """Pick up segments committed (or retired) by other processes since the last look."""
        parsed: dict[str, Manifest] = {}  # read once: a retry after a vanished one only reads what is new
        for _ in range(_LISTING_ATTEMPTS):
            # What this handle knew *before* listing: a segment it commits or retires itself while the listing
            # runs is then told apart from one another process did (see below).
            with self._lock:
                known = dict(self._index.manifests)
            names = {n[: -len(".json")] for n in self._objects.list_dir(MANIFESTS) if n.endswith(".json")}
            if names == set(known):
                return
            manifests = {s: m for s, m in known.items() if s in names}
            try:
                for segment in sorted(names - set(known)):
                    if segment not in parsed:
                        key = f"{MANIFESTS}/{segment}.json"
                        parsed[segment] = Manifest.from_json(self._objects.read(key), f"{self.uri}/{key}",
                                                             segment=segment)
                    manifests[segment] = parsed[segment]
                break
            except FileNotFoundError:
                # Retired between listing and reading. Its successor was committed before it was retired, but
                # perhaps after the listing: without a fresh listing its examples would vanish from the index.
                continue
        else:
            raise FormatError(f"{self.uri}: manifests kept vanishing between listing and reading "
                              f"({_LISTING_ATTEMPTS} listings); try again")
        with self._lock:
            # Another thread on this handle may have committed or retired segments since `known`: keep what it
            # did, or the erase that thread runs next would work on an index without its new copy.
            current = self._index.manifests
            manifests.update({s: m for s, m in current.items() if s not in known})
            for gone in (set(known) - set(current)) | self._retired:
                manifests.pop(gone, None)
            self._index = Index.build(manifests, self._index.pending_erasure)
            self._readers = {s: r for s, r in self._readers.items() if s in manifests}

    # ---------------------------------------------------------------------------------------------- writing
    def writer(self, *, buffer_bytes: int = 0, name: str | None = None) -> StoreWriter:
        """A writer for one thread / process / rank. See `StoreWriter` for durability."""
        if self.read_only:
            raise ReadOnlyError(f"{self.uri} was opened read-only")
        from .writer import StoreWriter

        return StoreWriter(self, buffer_bytes=buffer_bytes, name=name)

    def _commit(self, data: SegmentData, *, replaces: tuple[str, ...] = (), writer: str = "",
                order: int | None = None, copy_orders: list[int] | None = None) -> Manifest:
        """Write a segment and commit it with a create-only manifest. Returns the manifest.

        `order`: the segment's place in commit order (see `_index`); by default the time of the commit, taken
        after the files are written, and after every order this handle knows of (a clock that steps back must
        not make a new copy older than an old one). Rewrites and merges pass their sources' order, and
        `copy_orders` [n]: each example's own.
        """
        segment = new_segment_id()
        # A rewrite or merge (under the mutation lock) marks its output first: if it crashes before the commit,
        # the next mutation deletes the files -- they hold live rows, and erased ones would otherwise stay until
        # an orphan sweep an hour later. A writer's segments are left to that sweep (they may still be written).
        marked = bool(replaces)
        if marked:
            self._objects.write(f"{RETIRING}/{segment}", b"")
        manifest = write_segment(self._objects, self.config, segment, data, replaces=replaces, writer=writer)
        if order is None:
            with self._lock:
                order = max(time.time_ns(), self._index.latest_order() + 1)
        if copy_orders is not None and len(copy_orders) != len(data.ids):
            raise AssertionError(f"{len(copy_orders)} commit orders for {len(data.ids)} examples")
        if copy_orders is not None and all(o == order for o in copy_orders):
            copy_orders = None
        manifest = dataclasses.replace(manifest, order=order,
                                       orders=tuple(copy_orders) if copy_orders is not None else None)
        if not self._objects.write_new(f"{MANIFESTS}/{segment}.json", manifest.to_json()):
            raise FormatError(f"manifest of new segment {segment} already exists")  # a UUID collision
        if marked:
            self._objects.delete(f"{RETIRING}/{segment}")
        with self._lock:
            self._index.add(manifest)
        return manifest

    def _contains_live(self, example_id: ExampleId) -> bool:
        with self._lock:
            return example_id in self._index.locate

    # ---------------------------------------------------------------------------------------------- reading
    def __len__(self) -> int:
        with self._lock:
            return len(self._index.locate)

    def __contains__(self, example_id: object) -> bool:
        try:
            key = normalize_id(example_id)
        except InvalidInputError:
            return False
        return self._contains_live(key)

    def ids(self) -> list[ExampleId]:
        """Every live ID, in commit order."""
        with self._lock:
            index = self._index.snapshot()
        return [index.manifests[s].ids[p] for s in index.live for p in index.live_positions(s)]

    def _reader(self, segment: str) -> SegmentReader:
        with self._lock:
            reader = self._readers.get(segment)
            if reader is None:
                manifest = self._index.manifests.get(segment)
                if manifest is None:  # retired by another thread since it was looked up (`_retrying` looks again)
                    raise FileNotFoundError(f"segment {segment} was retired")
                reader = self._readers[segment] = SegmentReader(self._objects, manifest, self.config)
            return reader

    def _resolve(self, ids: Iterable[Any]) -> list[tuple[ExampleId, str, int]]:
        keys = [normalize_id(i) for i in ids]
        with self._lock:
            locate = self._index.locate
            missing = [k for k in keys if k not in locate]
        if missing:
            self.refresh()  # another process may have committed them since we looked
            with self._lock:
                locate = self._index.locate
                missing = [k for k in keys if k not in locate]
            for key in missing:
                raise ErasedError(key) if self.is_erased(key) else UnknownIdError(key)
        with self._lock:
            return [(k, *self._index.locate[k]) for k in keys]

    def _read_live(self, ids: list[ExampleId], read: Any) -> Any:
        """`read(located)` of those of `ids` still in the store, looked up afresh (None if none is): an example
        erased meanwhile is skipped, as the iterators skip it when its segment has not moved."""
        self.refresh()
        with self._lock:
            located = [(k, *self._index.locate[k]) for k in ids if k in self._index.locate]
        return read(located) if located else None

    def get(self, example_id: Any) -> Example:
        """One example. Unknown IDs raise `UnknownIdError` (a KeyError); erased ones `ErasedError`."""
        batch = self.get_many([example_id], with_meta=True)
        return batch.example(0)

    def get_many(self, ids: Iterable[Any], *, with_meta: bool = False) -> Batch:
        """Many examples in one batched read, as a CSR `Batch` in the order asked (repeats allowed)."""
        ids = as_list(ids, "ids")
        return self._retrying(lambda: self._read(self._resolve(ids), with_meta))

    def _retrying(self, read: Any) -> Any:
        """`read()`, looked up and read again once if a segment it used was retired meanwhile.

        An erasure or compaction (in another process, or another thread on this handle) may retire a segment
        between the lookup and the read; its live examples are then in a newer segment, or erased. A file that is
        still missing after a fresh lookup belongs to a committed segment: the store is damaged.
        """
        for _ in range(_READ_ATTEMPTS - 1):
            try:
                return read()
            except FileNotFoundError:
                self.refresh()
        try:
            return read()
        except FileNotFoundError as err:
            raise FormatError(f"{self.uri}: a committed segment is missing data ({err}); the store is damaged"
                              ) from None

    def _read(self, located: list[tuple[ExampleId, str, int]], with_meta: bool) -> Batch:
        # The CSR result is allocated once, from the manifests' row offsets (no I/O), and every segment reads
        # its examples straight into their places in it.
        lengths = []
        for _, segment, position in located:
            (lo, hi), = self._reader(segment).row_ranges([position])
            lengths.append(hi - lo)
        starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        total, dim = int(starts[-1]), self.config.dim
        int8 = self.config.dtype == "int8"
        token_ids = np.empty(total, dtype=np.int32)
        rows = np.empty((total, dim), dtype=STORED_DTYPES[self.config.dtype])
        scales = np.empty(total, dtype=np.float32) if int8 else None
        by_segment: dict[str, list[int]] = {}
        for i, (_, segment, _) in enumerate(located):
            by_segment.setdefault(segment, []).append(i)

        def read(segment: str) -> list[Any] | None:
            reader, picks = self._reader(segment), by_segment[segment]
            positions = [located[i][2] for i in picks]
            reader.read_rows_into(positions, [int(starts[i]) for i in picks], token_ids, rows, scales)
            return reader.read_meta(positions) if with_meta else None

        segments = list(by_segment)
        # Remote objects: segments are read concurrently (each read waits on the network). A local disk: one
        # after another — on 2 cores, threads made 8 random examples slower (p50 6.5-9.6 ms vs 5.7-6.3 ms).
        if len(segments) > 1 and not self._objects.is_local:
            metas_by_segment = list(_READ_POOL.map(read, segments))
        else:
            metas_by_segment = [read(s) for s in segments]
        meta: list[Any] = [None] * len(located)
        if with_meta:
            for segment, metas in zip(segments, metas_by_segment, strict=True):
                for i, m in zip(by_segment[segment], metas, strict=True):
                    meta[i] = m
        return Batch(
            ids=[k for k, _, _ in located],
            offsets=torch.from_numpy(starts),
            token_ids=torch.from_numpy(token_ids),
            rows=decode_rows(rows, self.config.dtype),
            scales=torch.from_numpy(scales) if scales is not None else None,
            meta=meta if with_meta else None,
        )

    def get_sequences(self, ids: Iterable[Any]) -> list[list[int]]:
        """The stored token sequences of these examples (empty lists where none was stored), rows left unread."""
        ids = as_list(ids, "ids")
        return [s.tolist() for s in self._retrying(lambda: self._read_sequences(self._resolve(ids)))]

    def _read_sequences(self, located: list[tuple[ExampleId, str, int]]) -> list[np.ndarray]:
        by_segment: dict[str, list[int]] = {}
        for _, segment, position in located:
            by_segment.setdefault(segment, []).append(position)
        found: dict[tuple[str, int], np.ndarray] = {}
        for segment, positions in by_segment.items():
            for position, tokens in zip(positions, self._reader(segment).read_sequences(positions), strict=True):
                found[(segment, position)] = tokens
        return [found[(s, p)] for _, s, p in located]

    def iter_batches(self, batch_size: int = 256, *, with_meta: bool = False) -> Iterator[Batch]:
        """Every live example, streamed in CSR batches of up to `batch_size` (from one segment each, unless a
        concurrent compaction moved the examples)."""
        yield from self._iterate(batch_size, lambda located: self._read(located, with_meta))

    def iter_sequences(self, batch_size: int = 4096) -> Iterator[tuple[list[ExampleId], list[np.ndarray]]]:
        """Every live example's token sequence (int32 arrays; empty if none was stored), rows left unread."""
        yield from self._iterate(batch_size, lambda located: ([k for k, _, _ in located],
                                                              self._read_sequences(located)))

    def _iterate(self, batch_size: int, read: Any) -> Iterator[Any]:
        """`read(located)` over every live example, in batches, from one snapshot of the index.

        If a segment is retired while it is being read (an erasure or compaction elsewhere), the examples of it
        not yet read are looked up again: they now live in a newer segment (which the snapshot does not list, so
        nothing is read twice) or were erased (and are skipped).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
        with self._lock:
            index = self._index.snapshot()  # commits and retirements on this handle must not change it
        for segment in index.live:
            positions = index.live_positions(segment)
            ids = index.manifests[segment].ids
            for start in range(0, len(positions), batch_size):
                chunk = [(ids[p], segment, p) for p in positions[start : start + batch_size]]
                try:
                    yield read(chunk)
                except FileNotFoundError:
                    rest = [ids[p] for p in positions[start:]]
                    for at in range(0, len(rest), batch_size):
                        got = self._retrying(lambda part=rest[at : at + batch_size]: self._read_live(part, read))
                        if got is not None:
                            yield got
                    break

    # ------------------------------------------------------------------------------------------ tombstones
    def id_hash(self, example_id: Any) -> str:
        """The salted hash that tombstones and audit records keep instead of the ID (HMAC-SHA256, hex)."""
        key = id_key(normalize_id(example_id)).encode()
        return hmac.new(self._salt, key, hashlib.sha256).hexdigest()

    def is_erased(self, example_id: Any) -> bool:
        """True if a tombstone records that this ID was erased (and it has not been appended again since)."""
        key = normalize_id(example_id)
        if self._contains_live(key):
            return False
        digest = self.id_hash(key)
        return digest in self._pending_hashes or self._objects.exists(f"{TOMBSTONES}/{digest}.json")

    def tombstone(self, id_hash: str) -> dict[str, Any] | None:
        """The tombstone of an erased ID, by its salted hash (`id_hash`): {hash, erased_at, receipt}, or None."""
        if not re.fullmatch(r"[0-9a-f]{1,128}", id_hash or ""):
            raise InvalidInputError(f"not an ID hash: {id_hash!r}")
        try:
            return json.loads(self._objects.read(f"{TOMBSTONES}/{id_hash}.json"))
        except FileNotFoundError:
            return None

    # ------------------------------------------------------------------------------------------- mutations
    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.uri} was opened read-only")

    def erase(self, ids: Iterable[Any]) -> ErasureReceipt:
        """Physically erase examples: their rows, token ids, sequences and metadata leave every file.

        Each affected segment is rewritten without them, the new manifest is committed (naming the old segment
        as replaced), then the old manifest and files are deleted. A tombstone keeps the salted ID hash, the
        time and the receipt id. Idempotent: already-erased IDs are reported, not an error; IDs the store never
        held raise `UnknownIdError` before anything changes. Crash-safe: the intent (hashes + segments) is
        journaled first and replayed by the next `open` or mutation.
        """
        self._check_writable()
        keys = list(dict.fromkeys(normalize_id(i) for i in as_list(ids, "ids")))
        if not keys:
            raise InvalidInputError("erase needs at least one ID")
        with mutation_lock(self._objects):
            self._replay_journal(locked=True)
            self.refresh()
            self._retire_superseded()
            present = [k for k in keys if self._contains_live(k)]
            already = [k for k in keys if not self._contains_live(k) and self.is_erased(k)]
            unknown = [k for k in keys if not self._contains_live(k) and k not in already]
            if unknown:
                raise UnknownIdError.naming(unknown, "erase")
            receipt_id = uuid.uuid4().hex
            now = time.time()
            if not present:
                return ErasureReceipt(receipt_id, [], already, 0, 0, now)
            hashes = sorted(self.id_hash(k) for k in present)
            with self._lock:
                segments = self._index.holding(set(present))
            # `segments`: where the copies this erasure means are. A replay after a crash rewrites only these (and
            # their rewrites): a copy appended (replace=True) after the request must stay. Appends are all that
            # can happen in between, since every mutation replays the journal first.
            journal = {"receipt": receipt_id, "hashes": hashes, "time": now, "segments": segments}
            self._objects.write_new(f"{JOURNAL}/{receipt_id}.json", json.dumps(journal).encode())
            rewritten, removed = self._apply_erasure(journal, set(present))
        return ErasureReceipt(receipt_id, present, already, rewritten, removed, now)

    def _apply_erasure(self, journal: dict[str, Any], keys: set[ExampleId] | None = None) -> tuple[int, int]:
        """Tombstones, then segment rewrites, then drop the journal entry. Safe to repeat after a crash.

        Every copy of each ID goes, the shadowed ones too (an older copy left behind would be read again once
        the newer one is gone). `keys`: the IDs, when the caller knows them (the request's own run, under the
        lock). A replay after a crash knows only the salted hashes, and looks for them in the segments the
        request named, or in the segments that replaced them if the crash came after some rewrites.
        """
        for h in journal["hashes"]:
            tombstone = {"hash": h, "erased_at": journal["time"], "receipt": journal["receipt"]}
            self._objects.write(f"{TOMBSTONES}/{h}.json", json.dumps(tombstone).encode())
        with self._lock:
            index = self._index.snapshot()
        segments, keys, horizon = self._erasure_scope(journal, index, keys)
        rewritten = removed = 0
        for segment in segments:
            freed = self._rewrite_segment(
                segment, lambda i, order: i in keys and (horizon is None or order <= horizon))
            rewritten += freed is not None
            removed += freed or 0
        self._objects.delete(f"{JOURNAL}/{journal['receipt']}.json")
        return rewritten, removed

    def _replay_journal(self, locked: bool = False) -> None:
        """Finish erasures that a crash interrupted (their intent is in `journal/`)."""
        names = self._objects.list_dir(JOURNAL)
        if not names:
            return
        if not locked:
            with mutation_lock(self._objects):
                self._replay_journal(locked=True)
            return
        for journal in self._journal_entries(names):
            self.refresh()
            self._retire_superseded()
            self._apply_erasure(journal)
        self._retire_superseded()

    def _erasure_scope(self, journal: dict[str, Any], index: Index,
                       keys: set[ExampleId] | None = None) -> tuple[list[str], set[ExampleId], int | None]:
        """(segments, keys, horizon): the live segments a journaled erasure rewrites, the IDs it drops there,
        and an older journal's bound on their copies' commit order (None: every copy)."""
        # The request's segments and the ones that replaced them (a crash after some rewrites), whether this is
        # the request's own run or a replay: a copy appended meanwhile, elsewhere, is not what it meant.
        named = set(journal.get("segments") or index.live)
        segments = [s for s in index.live if s in named or not named.isdisjoint(index.manifests[s].replaces)]
        if keys is None:
            hashes = set(journal["hashes"])
            keys = {i for s in segments for i in index.manifests[s].ids if self.id_hash(i) in hashes}
        horizon = journal.get("horizon") if "segments" not in journal else None
        return segments, keys, horizon

    def _journal_entries(self, names: list[str]) -> Iterator[dict[str, Any]]:
        """The journaled erasures named `names` (entries finished meanwhile are skipped)."""
        for name in names:
            try:
                yield json.loads(self._objects.read(f"{JOURNAL}/{name}"))
            except FileNotFoundError:
                continue
            except ValueError:  # torn write cannot happen (atomic puts); refuse to guess
                raise FormatError(f"{self.uri}: unreadable journal entry {name}") from None

    def _hide_pending_erasures(self) -> None:
        """Take the examples of unfinished journaled erasures out of this handle's index (not out of the files:
        finishing them takes the mutation lock, which a read-only handle never takes)."""
        pending: set[tuple[str, int]] = set()
        hashes: set[str] = set()
        with self._lock:
            index = self._index.snapshot()
        for journal in self._journal_entries(self._objects.list_dir(JOURNAL)):
            hashes.update(journal["hashes"])
            segments, keys, horizon = self._erasure_scope(journal, index)
            for segment in segments:
                manifest = index.manifests[segment]
                pending.update((segment, p) for p, i in enumerate(manifest.ids)
                               if i in keys and (horizon is None or manifest.copy_order(p) <= horizon))
        with self._lock:
            self._pending_hashes = frozenset(hashes)
            self._index = Index.build(self._index.manifests, frozenset(pending))
            self._readers = {s: r for s, r in self._readers.items() if s in self._index.manifests}

    def _rewrite_segment(self, segment: str, drop: Any) -> int | None:
        """Replace a live segment by a copy without the examples for which `drop(id, copy_order)` is true, and
        without copies that a newer copy shadows.

        Every example keeps its commit order, and the segment its place: a rewrite must not make an old copy
        newer than one committed after it. Returns the bytes freed, or None if nothing was removed. Must hold
        the mutation lock, with superseded segments already retired (`_retire_superseded`).
        """
        with self._lock:
            manifest = self._index.manifests[segment]
            keep = [p for p in self._index.live_positions(segment)
                    if not drop(manifest.ids[p], manifest.copy_order(p))]
        if len(keep) == manifest.n_examples:
            return None
        replaces = (segment, *manifest.replaces)
        if keep:
            data = self._reader(segment).read_all().select(keep)
            new = self._commit(data, replaces=replaces, writer="rewrite", order=manifest.order_key[0],
                               copy_orders=[manifest.copy_order(p) for p in keep])
            freed = manifest.stored_bytes - new.stored_bytes
        else:
            freed = manifest.stored_bytes
        self._retire(segment)
        return freed

    def _retire(self, segment: str) -> None:
        """Delete a segment: manifest first (the segment stops being visible), then its files.

        A marker says the files are to go: a crash between the two deletions would otherwise leave the files
        (erased rows among them) without a manifest, for an hour, until compaction's orphan sweep.
        """
        self._objects.write(f"{RETIRING}/{segment}", b"")
        self._objects.delete(f"{MANIFESTS}/{segment}.json")
        self._objects.delete_prefix(f"{SEGMENTS}/{segment}")
        self._objects.delete(f"{RETIRING}/{segment}")
        with self._lock:
            self._retired.add(segment)  # names are never reused: a refresh that read it before must drop it
            self._index.remove(segment)
            self._readers.pop(segment, None)

    def _retire_superseded(self) -> int:
        """Retire segments a committed manifest replaces, and finish retirements a crash interrupted."""
        with self._lock:
            dead = self._index.superseded()
            committed = set(self._index.manifests)
        for segment in dead:
            self._retire(segment)
        for segment in self._objects.list_dir(RETIRING):
            if SEGMENT_NAME.fullmatch(segment) and segment not in committed:
                self._objects.delete_prefix(f"{SEGMENTS}/{segment}")
                self._objects.delete(f"{RETIRING}/{segment}")
        return len(dead)

    def drop_shadowed(self, ids: Iterable[ExampleId]) -> None:
        """Physically remove older copies of replaced IDs (called by writers after `replace=True` appends)."""
        self._check_writable()
        wanted = set(ids)
        with mutation_lock(self._objects):
            self._replay_journal(locked=True)
            self.refresh()
            self._retire_superseded()
            with self._lock:
                index = self._index
                targets = [s for s in index.live
                           if any(i in wanted and index.locate.get(i) != (s, p)
                                  for p, i in enumerate(index.manifests[s].ids))]
            for segment in targets:
                self._rewrite_segment(segment, lambda i, order: False)  # a rewrite leaves shadowed copies out

    def remove_shadowed(self) -> int:
        """Physically remove every copy of an ID hidden by a newer one; returns how many IDs had copies."""
        with self._lock:
            index = self._index
            shadowed = {i for s in index.live for p, i in enumerate(index.manifests[s].ids)
                        if index.locate.get(i) != (s, p)}
        if shadowed:
            self.drop_shadowed(shadowed)
        return len(shadowed)

    def compact(self, *, target_rows: int = 1 << 20, small_rows: int | None = None) -> CompactionReport:
        """Merge small segments into segments of up to `target_rows` rows; delete dead and orphaned files.

        A segment is small if it has fewer than `small_rows` rows (default: a quarter of `target_rows`). Shadowed
        copies of replaced IDs are dropped while merging. Orphans (segment files without a manifest, left by a
        crashed writer) and the temporary files of interrupted writes (a manifest's may name its IDs) are deleted
        once older than an hour, so that nothing still being written is touched.
        """
        self._check_writable()
        small_rows = target_rows // 4 if small_rows is None else small_rows
        with mutation_lock(self._objects):
            self._replay_journal(locked=True)
            self.refresh()
            superseded = self._retire_superseded()
            orphans = self._remove_orphans()
            temporaries = self._objects.remove_stale_temporaries(ORPHAN_GRACE_S)
            with self._lock:
                # A snapshot: another thread's commit on this handle must not change the positions between
                # reading a segment's examples and recording their orders.
                index = self._index.snapshot()
                before = len(index.live)
                small = [s for s in index.live if index.manifests[s].n_rows < small_rows]
            groups: list[list[str]] = []
            rows = 0
            for segment in small:
                n = index.manifests[segment].n_rows
                if not groups or rows + n > target_rows:
                    groups.append([])
                    rows = 0
                groups[-1].append(segment)
                rows += n
            merged = 0
            for group in groups:
                if len(group) < 2:
                    continue
                parts = [self._reader(s).read_all().select(index.live_positions(s)) for s in group]
                replaces = tuple(dict.fromkeys(r for s in group for r in (s, *index.manifests[s].replaces)))
                # Every example keeps its own commit order, not the time of this commit: a writer that commits a
                # newer copy of one of these IDs meanwhile must stay newer (see `_index`).
                copy_orders = [index.manifests[s].copy_order(p) for s in group for p in index.live_positions(s)]
                order = max(index.manifests[s].order_key[0] for s in group)
                self._commit(SegmentData.concatenate(parts), replaces=replaces, writer="compact", order=order,
                             copy_orders=copy_orders)
                for segment in group:
                    self._retire(segment)
                merged += len(group)
            with self._lock:
                after = len(self._index.live)
        return CompactionReport(before, after, merged, orphans, superseded, temporaries)

    def _remove_orphans(self) -> int:
        with self._lock:
            known = set(self._index.manifests)
        removed = 0
        now_ns = time.time_ns()
        for segment in self._objects.list_dir(SEGMENTS):
            if segment in known or not SEGMENT_NAME.fullmatch(segment):
                continue  # live, or not a segment (zarr's own group metadata lives here too)
            age_s = (now_ns - int(segment.split("-", 1)[0])) / 1e9
            if age_s > ORPHAN_GRACE_S:
                self._objects.delete_prefix(f"{SEGMENTS}/{segment}")
                removed += 1
        return removed

    # --------------------------------------------------------------------------------------------- records
    def audit_name(self) -> str:
        """A fresh name for an audit record: the time first, so that names sort oldest first.

        Never before the newest record's: a writer whose clock is behind (another host, a clock stepped back)
        still names its record after the ones already written, so that, chosen under a lock the writers share,
        names sort in the order of the writes."""
        newest = max((int(n[:20]) for n in self._objects.list_dir(AUDIT) if n.endswith(".json")
                      and _AUDIT_NAME.fullmatch(n[:-5])),
                     default=0)
        return f"{max(time.time_ns(), newest + 1):020d}-{uuid.uuid4().hex[:8]}"

    def append_audit(self, record: dict[str, Any], *, name: str | None = None) -> str:
        """Append one audit record (JSON object; must not hold raw IDs). Returns its key.

        `name` (from `audit_name()`, chosen before a multi-step operation and kept in its journal) makes the
        append idempotent: a replay after a crash that had already appended it writes nothing twice.
        """
        self._check_writable()
        name = name or self.audit_name()
        if not _AUDIT_NAME.fullmatch(name):
            raise InvalidInputError(f"not an audit record name: {name!r} (use GradStore.audit_name())")
        key = f"{AUDIT}/{name}.json"
        self._objects.write_new(key, json.dumps(record, sort_keys=True).encode())
        return key

    @contextlib.contextmanager
    def lock(self, name: str, *, timeout_s: float = 60.0) -> Iterator[str]:
        """Hold the store's lock `name` (object `locks/<name>.json`) for the block: for components that keep
        their own records in the store and must not interleave (the engine's forget commits). The same object
        rules as the mutation lock: create-only, a lease renewed while held, stale holders broken by
        compare-and-delete. Raises `StoreLockedError` after `timeout_s`."""
        if not _LOCK_NAME.fullmatch(name) or name == "mutation":
            raise InvalidInputError(f"not a lock name: {name!r} (lowercase letters, digits, '-'; not 'mutation')")
        with mutation_lock(self._objects, timeout_s=timeout_s, key=f"locks/{name}.json") as owner:
            yield owner

    def audit_log(self) -> list[dict[str, Any]]:
        """Every audit record, oldest first."""
        return [json.loads(self._objects.read(f"{AUDIT}/{n}")) for n in self._objects.list_dir(AUDIT)
                if n.endswith(".json")]

    def audit_log_newest_first(self) -> Iterator[dict[str, Any]]:
        """The audit records, newest first, each read only when asked for (one listing, then one read each)."""
        for name in reversed(self._objects.list_dir(AUDIT)):
            if name.endswith(".json"):
                yield json.loads(self._objects.read(f"{AUDIT}/{name}"))

    @property
    def objects(self) -> ObjectStore:
        """Byte-level access to the store's location (for components that keep their own records in it)."""
        return self._objects

    def stats(self) -> StoreStats:
        with self._lock:
            index = self._index
        manifests = [index.manifests[s] for s in index.live]
        rows = sum(m.n_rows for m in manifests)
        itemsize = _ITEMSIZE[self.config.dtype]
        logical = rows * self.config.dim * itemsize + (rows * 4 if self.config.dtype == "int8" else 0)
        return StoreStats(
            uri=self.uri, model_id=self.config.model_id, dtype=self.config.dtype, dim=self.config.dim,
            vocab_size=self.config.vocab_size, format_version=self.config.format_version,
            examples=len(index.locate), rows=rows, segments=len(manifests),
            tombstones=sum(n.endswith(".json") for n in self._objects.list_dir(TOMBSTONES)),
            shadowed_copies=index.shadowed, bytes_on_disk=self._objects.size_of_prefix(""),
            rows_logical_bytes=logical, rows_stored_bytes=sum(m.rows_stored_bytes for m in manifests),
            codec=self.config.codec.__dict__,
        )

    def __repr__(self) -> str:
        return f"GradStore({self.uri!r}, examples={len(self)}, dtype={self.config.dtype}, dim={self.config.dim})"

