"""Immutable segments: one zarr v3 group per commit of one writer, and the manifest that commits it.

A segment holds n examples in CSR form (R rows in total):

    rows        [R, D]   float32 | uint16 (bfloat16 bits) | int8      sharded, 64-row chunks
    scales      [R]      float32 (int8 stores only: dequantised row = rows * scale)
    token_ids   [R]      int32    token of each row
    row_offsets [n+1]    int64    example e owns rows row_offsets[e]:row_offsets[e+1]
    seq_tokens  [T]      int32    each example's token sequence (for evaluation), CSR by seq_offsets [n+1]
    meta_json   [B]      uint8    each example's metadata as UTF-8 JSON, CSR by meta_offsets [n+1]

and the group's attributes name the segment and its IDs (so a segment describes itself). The manifest
(`manifests/<seg>.json`) repeats the IDs and row offsets so that opening a store reads one small file per
segment, never the arrays; it is created last, with create-only semantics, and is the commit point: a
segment without a manifest is invisible (and garbage-collected after a grace period).
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from ._arrays import ChunkedArrayReader, UnsupportedLayout, write_array
from ._encoding import MAX_ID_BYTES, MAX_INT_ID, ExampleId, normalize_id
from ._format import STORED_DTYPES, StoreConfig
from ._objects import ObjectStore
from .errors import FormatError, InvalidInputError

SEGMENTS = "segments"
MANIFESTS = "manifests"
# What `new_segment_id` makes. Manifests are checked against it: a name from a manifest becomes a path
# (`segments/<name>`) that is read and, on retirement, deleted recursively, so it must not be "../..".
SEGMENT_NAME = re.compile(r"\d{20}-[0-9a-f]{12}")
# dtype of every array but `rows` (whose dtype is the store's, see `STORED_DTYPES`).
_ARRAY_DTYPES = {name: np.dtype(t) for name, t in (
    ("scales", np.float32), ("token_ids", np.int32), ("seq_tokens", np.int32), ("seq_offsets", np.int64),
    ("meta_json", np.uint8), ("meta_offsets", np.int64),
)}
_SMALL_CHUNK = 1024  # elements per chunk of 1-D arrays: an example's token ids cost one or two 4 KiB chunks
_SMALL_SHARD = 1 << 20


def new_segment_id() -> str:
    """Unique, prefixed by the creation time (which dates orphans; commit order is the manifest's `order`)."""
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"


@dataclass
class SegmentData:
    """The content of one segment, in memory, already validated and encoded."""

    ids: list[ExampleId]
    row_offsets: np.ndarray  # int64 [n+1]
    token_ids: np.ndarray  # int32 [R]
    rows: np.ndarray  # [R, D] stored dtype
    scales: np.ndarray | None  # float32 [R] for int8
    seq_offsets: np.ndarray  # int64 [n+1]
    seq_tokens: np.ndarray  # int32 [T]
    meta_offsets: np.ndarray  # int64 [n+1]
    meta_json: np.ndarray  # uint8 [B]

    @property
    def n_rows(self) -> int:
        return int(self.row_offsets[-1])

    @staticmethod
    def concatenate(parts: list[SegmentData]) -> SegmentData:
        def csr(offsets_name: str, values_name: str) -> tuple[np.ndarray, np.ndarray]:
            offsets, base = [np.zeros(1, np.int64)], 0
            for p in parts:
                o = getattr(p, offsets_name)
                offsets.append(o[1:] + base)
                base += int(o[-1])
            return np.concatenate(offsets), np.concatenate([getattr(p, values_name) for p in parts])

        row_offsets, token_ids = csr("row_offsets", "token_ids")
        seq_offsets, seq_tokens = csr("seq_offsets", "seq_tokens")
        meta_offsets, meta_json = csr("meta_offsets", "meta_json")
        scales = None if parts[0].scales is None else np.concatenate([p.scales for p in parts])
        return SegmentData(
            ids=[i for p in parts for i in p.ids],
            row_offsets=row_offsets,
            token_ids=token_ids,
            rows=np.concatenate([p.rows for p in parts]),
            scales=scales,
            seq_offsets=seq_offsets,
            seq_tokens=seq_tokens,
            meta_offsets=meta_offsets,
            meta_json=meta_json,
        )

    def select(self, keep: list[int]) -> SegmentData:
        """Only the examples at positions `keep` (in that order)."""

        def take(offsets: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            lengths = np.array([offsets[i + 1] - offsets[i] for i in keep], dtype=np.int64)
            new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            index = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in keep]) if keep else np.zeros(0, int)
            return new_offsets, values[index]

        row_offsets, token_ids = take(self.row_offsets, self.token_ids)
        _, rows = take(self.row_offsets, self.rows)
        scales = None if self.scales is None else take(self.row_offsets, self.scales)[1]
        seq_offsets, seq_tokens = take(self.seq_offsets, self.seq_tokens)
        meta_offsets, meta_json = take(self.meta_offsets, self.meta_json)
        return SegmentData([self.ids[i] for i in keep], row_offsets, token_ids, rows, scales,
                           seq_offsets, seq_tokens, meta_offsets, meta_json)


@dataclass(frozen=True)
class Manifest:
    """The commit record of one segment."""

    segment: str
    ids: tuple[ExampleId, ...]
    row_offsets: np.ndarray = field(repr=False)  # int64 [n+1]
    replaces: tuple[str, ...] = ()  # segments this one supersedes (erasure rewrite, compaction)
    stored_bytes: int = 0  # bytes of every file of the segment
    rows_stored_bytes: int = 0  # bytes of the `rows` (+ `scales`) arrays only, for the compression ratio
    created: float = 0.0
    writer: str = ""
    order: int = 0  # place in commit order, ns (see `_index`); 0: a manifest from before it was recorded
    # Each example's own commit order, where the examples came from segments committed at different times (a
    # rewrite or a merge keeps every copy's order: moving a copy never makes it newer); None: all `order`.
    orders: tuple[int, ...] | None = field(default=None, repr=False)

    @property
    def order_key(self) -> tuple[int, str]:
        """Sorts segments by commit order. Manifests without `order` fall back on the segment ID's time."""
        if self.order:
            return self.order, self.segment
        prefix = self.segment.split("-", 1)[0]
        return (int(prefix) if prefix.isdigit() else 0), self.segment

    @functools.cached_property
    def latest_order(self) -> int:
        """The largest commit order of its examples (computed once: a merge's `orders` may be long)."""
        return max(self.order_key[0], max(self.orders, default=0) if self.orders else 0)

    def copy_order(self, position: int) -> int:
        """The commit order of the example at `position`: which of several copies of an ID is current."""
        return self.orders[position] if self.orders is not None else self.order_key[0]

    @property
    def n_examples(self) -> int:
        return len(self.ids)

    @property
    def n_rows(self) -> int:
        return int(self.row_offsets[-1])

    def to_json(self) -> bytes:
        return json.dumps({
            "format_version": 1,
            "segment": self.segment,
            "ids": list(self.ids),
            "row_offsets": self.row_offsets.tolist(),
            "replaces": list(self.replaces),
            "stored_bytes": self.stored_bytes,
            "rows_stored_bytes": self.rows_stored_bytes,
            "created": self.created,
            "writer": self.writer,
            "order": self.order,
            **({"orders": list(self.orders)} if self.orders is not None else {}),
        }, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str, segment: str | None = None) -> Manifest:
        """Parse and validate a manifest (`where`: its path, for messages); every problem is a `FormatError`.

        IDs must be valid IDs (`normalize_id`); `row_offsets` n+1 integers starting at 0, non-decreasing; the
        segment's own name and those it replaces must look like `new_segment_id`'s. `segment`, if given (the
        name of the manifest's file), must be the name the manifest holds.
        """

        def malformed(problem: str) -> FormatError:
            return FormatError(f"{where}: malformed manifest: {problem}")

        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise malformed(f"not valid JSON ({err})") from None
        if not isinstance(doc, dict):
            raise malformed(f"a JSON {type(doc).__name__}, not an object")
        name = doc.get("segment")
        if not isinstance(name, str) or not SEGMENT_NAME.fullmatch(name):
            raise malformed(f"segment {name!r} is not a segment name")
        if segment is not None and name != segment:
            raise malformed(f"it names segment {name!r} but is the manifest of {segment!r}")
        ids = doc.get("ids")
        if not isinstance(ids, list):
            raise malformed(f"ids must be a list, got {type(ids).__name__}")
        if not _all_valid_ids(ids):  # find the first bad one, for the message
            for i, value in enumerate(ids):
                try:
                    normalize_id(value)
                except InvalidInputError as err:
                    raise malformed(f"ids[{i}]: {err}") from None
        offsets = doc.get("row_offsets")
        # Exact types: JSON true/false would pass isinstance(o, int) as 1/0.
        if not isinstance(offsets, list) or not set(map(type, offsets)) <= {int}:
            raise malformed("row_offsets must be a list of integers")
        if len(offsets) != len(ids) + 1:
            raise malformed(f"{len(ids)} ids need {len(ids) + 1} row_offsets, got {len(offsets)}")
        if offsets[0] != 0:
            raise malformed(f"row_offsets must start at 0, got {offsets[0]}")
        try:
            row_offsets = np.asarray(offsets, dtype=np.int64)
        except OverflowError:
            raise malformed("row_offsets do not fit int64") from None
        if len(row_offsets) > 1 and (np.diff(row_offsets) < 0).any():
            e = int((np.diff(row_offsets) < 0).argmax())
            raise malformed(f"row_offsets decrease at example {e} ({offsets[e]} -> {offsets[e + 1]})")
        replaces = doc.get("replaces", [])
        if not isinstance(replaces, list) or not all(isinstance(r, str) and SEGMENT_NAME.fullmatch(r)
                                                     for r in replaces):
            raise malformed(f"replaces must be a list of segment names, got {replaces!r}")
        order = doc.get("order", 0)
        if type(order) is not int or order < 0:
            raise malformed(f"order must be a non-negative integer, got {order!r}")
        orders = doc.get("orders")
        if orders is not None and (not isinstance(orders, list) or len(orders) != len(ids)
                                   or not set(map(type, orders)) <= {int} or (orders and min(orders) < 0)):
            raise malformed(f"orders must be a list of {len(ids)} non-negative integers, one per id")
        try:
            return cls(
                segment=name,
                ids=tuple(ids),
                row_offsets=row_offsets,
                replaces=tuple(replaces),
                stored_bytes=int(doc.get("stored_bytes", 0)),
                rows_stored_bytes=int(doc.get("rows_stored_bytes", 0)),
                created=float(doc.get("created", 0.0)),
                writer=str(doc.get("writer", "")),
                order=order,
                orders=tuple(orders) if orders is not None else None,
            )
        except (ValueError, TypeError, OverflowError) as err:
            raise malformed(str(err)) from None


def _all_valid_ids(ids: list[Any]) -> bool:
    """Whether every ID is one `normalize_id` accepts as is (a JSON int or str), checked in bulk.

    Opening a store parses every manifest: calling `normalize_id` per ID took 2.5x as long as parsing the JSON
    of a manifest of a million IDs (0.26 s); this takes well under half as long.
    """
    types = set(map(type, ids))
    if not types <= {int, str}:
        return False
    if int in types:
        ints = ids if types == {int} else [v for v in ids if type(v) is int]
        if min(ints) < 0 or max(ints) > MAX_INT_ID:
            return False
    if str in types:
        strs = ids if types == {str} else [v for v in ids if type(v) is str]
        try:
            "".join(strs).encode("utf-8")  # fails on any lone surrogate
        except UnicodeEncodeError:
            return False
        lengths = list(map(len, strs))
        if min(lengths) == 0:
            return False
        # A str of n code points has at most 4n UTF-8 bytes: only IDs longer than a quarter of the limit are encoded.
        if max(lengths) * 4 > MAX_ID_BYTES and max(len(v.encode()) for v in strs) > MAX_ID_BYTES:
            return False
    return True


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, -(-value // multiple) * multiple)


def group_metadata(attributes: dict[str, Any]) -> bytes:
    """A Zarr v3 group's zarr.json."""
    return json.dumps({"attributes": attributes, "zarr_format": 3, "node_type": "group"}, indent=2).encode()


def write_segment(objects: ObjectStore, config: StoreConfig, segment: str, data: SegmentData,
                  replaces: tuple[str, ...] = (), writer: str = "") -> Manifest:
    """Write the segment's arrays (not yet visible) and return its manifest, ready to be committed."""
    root = f"{SEGMENTS}/{segment}"
    objects.write_raw(f"{root}/zarr.json",
                      group_metadata({"segment": segment, "ids": list(data.ids), "dtype": config.dtype}))
    sizes: dict[str, int] = {}

    def put(name: str, values: np.ndarray, chunk: int, shard: int) -> None:
        # A segment smaller than a shard gets one shard of its own (rounded up to whole chunks).
        shard = _round_up(min(shard, max(len(values), 1)), chunk)
        sizes[name] = write_array(objects, f"{root}/{name}", values, chunk, shard, config.codec)

    put("rows", data.rows, config.chunk_rows, config.shard_rows)
    if data.scales is not None:
        put("scales", data.scales, _SMALL_CHUNK, _SMALL_SHARD)
    put("token_ids", data.token_ids, _SMALL_CHUNK, _SMALL_SHARD)
    put("row_offsets", data.row_offsets, _SMALL_CHUNK, _SMALL_SHARD)
    put("seq_tokens", data.seq_tokens, _SMALL_CHUNK, _SMALL_SHARD)
    put("seq_offsets", data.seq_offsets, _SMALL_CHUNK, _SMALL_SHARD)
    put("meta_json", data.meta_json, 1 << 16, _SMALL_SHARD)
    put("meta_offsets", data.meta_offsets, _SMALL_CHUNK, _SMALL_SHARD)
    objects.make_durable(root)
    return Manifest(segment=segment, ids=tuple(data.ids), row_offsets=data.row_offsets, replaces=replaces,
                    stored_bytes=sum(sizes.values()), rows_stored_bytes=sizes["rows"] + sizes.get("scales", 0),
                    created=time.time(), writer=writer)


class SegmentReader:
    """Random access to one committed segment's arrays; opened lazily, safe to share between threads.

    Each array's zarr.json is checked when first opened: malformed metadata, or a shape or dtype that does not
    match the manifest (rows, token_ids, scales: `n_rows` long; offsets: n+1) or the store (`rows`: [R, dim]
    of the stored dtype of `config.dtype`), raises `FormatError` naming the array, rather than returning
    reinterpreted bytes. Without `config`, `rows` may be any of the stored dtypes and any width, and reads into
    a caller's buffer (`read_rows_into`) are checked against that buffer's dtype and width instead.
    """

    ARRAYS = ("rows", "scales", "token_ids", "seq_tokens", "seq_offsets", "meta_json", "meta_offsets")

    def __init__(self, objects: ObjectStore, manifest: Manifest, config: StoreConfig | None = None):
        self.objects = objects
        self.manifest = manifest
        self.config = config
        self.root = f"{SEGMENTS}/{manifest.segment}"
        self._arrays: dict[str, Any] = {}
        self._small: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def _array(self, name: str) -> Any:
        with self._lock:
            if name not in self._arrays:
                array = self._open_array(name)
                self._check_array(name, array)
                self._arrays[name] = array
            return self._arrays[name]

    def _where(self, name: str) -> str:
        return f"{self.objects.uri}/{self.root}/{name}/zarr.json"

    def _open_array(self, name: str) -> Any:
        path = f"{self.root}/{name}"
        try:
            raw = self.objects.read(f"{path}/zarr.json")
        except FileNotFoundError:
            raise FileNotFoundError(f"segment {self.manifest.segment} has no array {name!r}") from None
        try:
            metadata = json.loads(raw)
            if not isinstance(metadata, dict):
                raise ValueError(f"a JSON {type(metadata).__name__}, not an object")
            try:
                # complete: the store's writer writes every shard, so a missing one is not "all zeros"
                return ChunkedArrayReader(self.objects, path, metadata, complete=True)
            except UnsupportedLayout:  # written by another tool: read it through zarr-python
                return _ZarrArrayReader(self.objects, path)
        except FileNotFoundError:
            raise  # retired meanwhile (zarr's NodeNotFoundError is one too): callers look again
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
            # Bad JSON, missing or mistyped keys, or zarr-python refusing the metadata (its errors are
            # ValueErrors): the file is not the array metadata the segment was written with.
            raise FormatError(f"{self._where(name)}: unreadable array metadata ({type(err).__name__}: {err})") from None

    def _check_array(self, name: str, array: Any) -> None:
        """The array's shape and dtype against the manifest and (if known) the store config."""
        shape, dtype = tuple(array.shape), _dtype_of(array)
        n_rows, n = self.manifest.n_rows, self.manifest.n_examples
        if name == "rows":
            width = self.config.dim if self.config else (shape[1] if len(shape) == 2 else None)
            want_shape: tuple[int | None, ...] = (n_rows, width)
            want = [STORED_DTYPES[self.config.dtype]] if self.config else list(STORED_DTYPES.values())
        else:
            # seq_tokens and meta_json are as long as their offsets say: checked in _offsets.
            length = {"token_ids": n_rows, "scales": n_rows, "seq_offsets": n + 1, "meta_offsets": n + 1}.get(
                name, shape[0] if len(shape) == 1 else None)
            want_shape = (length,)
            want = [_ARRAY_DTYPES[name]]
        if shape != want_shape or dtype not in want:
            expected = "/".join(str(d) for d in want)
            source = "the manifest and gradstore.json" if name == "rows" and self.config else "the manifest"
            raise FormatError(
                f"{self._where(name)}: array {name!r} is {dtype} of shape {list(shape)}; from {source} it should "
                f"be {expected} of shape {['?' if d is None else d for d in want_shape]}"
            )

    def _offsets(self, name: str) -> np.ndarray:
        """seq_offsets or meta_offsets, int64 [n+1], checked: from 0, non-decreasing, ending at their values'
        length (so that a range read from them can never be negative or run past the array)."""
        with self._lock:
            cached = self._small.get(name)
        if cached is None:
            cached = self._array(name).read_all().astype(np.int64)
            values = {"seq_offsets": "seq_tokens", "meta_offsets": "meta_json"}[name]
            size = self._array(values).shape[0]
            if cached[0] != 0 or (np.diff(cached) < 0).any() or cached[-1] != size:
                raise FormatError(f"{self._where(name)}: {name} must rise from 0 to {size} (the length of "
                                  f"{values}), got {cached.tolist()[:8]}{'...' if len(cached) > 8 else ''}")
            with self._lock:
                self._small[name] = cached
        return cached

    def row_ranges(self, positions: list[int]) -> list[tuple[int, int]]:
        o = self.manifest.row_offsets
        return [(int(o[p]), int(o[p + 1])) for p in positions]

    def read_rows(self, positions: list[int], with_scales: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(token_ids int32 [R'], rows [R', D], scales float32 [R'] | None) of the examples at `positions`."""
        ranges = self.row_ranges(positions)
        rows = self._array("rows").read_ranges(ranges)
        token_ids = self._array("token_ids").read_ranges(ranges)
        scales = self._array("scales").read_ranges(ranges) if with_scales else None
        return token_ids, rows, scales

    def read_rows_into(self, positions: list[int], dest: list[int], token_ids: np.ndarray, rows: np.ndarray,
                       scales: np.ndarray | None) -> None:
        """Like `read_rows`, but example i's rows land at row dest[i] of the caller's arrays (no extra copy)."""
        ranges = self.row_ranges(positions)
        for name, out in (("token_ids", token_ids), ("rows", rows), ("scales", scales)):
            if out is None:
                continue
            array = self._array(name)
            # The caller sized `out` from the store config; chunks are decoded straight into it, so an array of
            # another dtype or width must be refused, not reinterpreted (checked here when no config was given).
            if out.dtype != _dtype_of(array) or out.shape[1:] != tuple(array.shape[1:]):
                raise FormatError(f"{self._where(name)}: array {name!r} is {_dtype_of(array)} of shape "
                                  f"{list(array.shape)}; the store expects {out.dtype} rows of shape {list(out.shape[1:])}")
            if isinstance(array, ChunkedArrayReader):
                array.read_ranges(ranges, out=out, dest=dest)
            else:  # a foreign layout read through zarr-python
                got, pos = array.read_ranges(ranges), 0
                for (lo, hi), at in zip(ranges, dest, strict=True):
                    out[at : at + hi - lo] = got[pos : pos + hi - lo]
                    pos += hi - lo

    def read_meta(self, positions: list[int]) -> list[dict[str, Any]]:
        """Each example's metadata dict, with its token sequence under "tokens" (list of int) if stored."""
        meta_offsets, seq_offsets = self._offsets("meta_offsets"), self._offsets("seq_offsets")
        meta_ranges = [(int(meta_offsets[p]), int(meta_offsets[p + 1])) for p in positions]
        seq_ranges = [(int(seq_offsets[p]), int(seq_offsets[p + 1])) for p in positions]
        blob = self._array("meta_json").read_ranges(meta_ranges).tobytes()
        tokens = self._array("seq_tokens").read_ranges(seq_ranges)
        out, mpos, spos = [], 0, 0
        for (mlo, mhi), (slo, shi) in zip(meta_ranges, seq_ranges, strict=True):
            meta = json.loads(blob[mpos : mpos + mhi - mlo])
            if shi > slo:
                meta["tokens"] = tokens[spos : spos + shi - slo].tolist()
            mpos += mhi - mlo
            spos += shi - slo
            out.append(meta)
        return out

    def read_sequences(self, positions: list[int]) -> list[np.ndarray]:
        """Each example's token sequence (int32), without reading rows or metadata."""
        seq_offsets = self._offsets("seq_offsets")
        ranges = [(int(seq_offsets[p]), int(seq_offsets[p + 1])) for p in positions]
        tokens = self._array("seq_tokens").read_ranges(ranges)
        out, pos = [], 0
        for lo, hi in ranges:
            out.append(tokens[pos : pos + hi - lo])
            pos += hi - lo
        return out

    def read_all(self) -> SegmentData:
        """The whole segment in memory (for rewriting it during erasure or compaction)."""
        arrays = {name: self._array(name).read_all() for name in ("rows", "token_ids", "seq_tokens", "meta_json")}
        scales = self._array("scales").read_all() if self.objects.exists(f"{self.root}/scales/zarr.json") else None
        return SegmentData(
            ids=list(self.manifest.ids),
            row_offsets=self.manifest.row_offsets.copy(),
            token_ids=arrays["token_ids"],
            rows=arrays["rows"],
            scales=scales,
            seq_offsets=self._offsets("seq_offsets"),
            seq_tokens=arrays["seq_tokens"],
            meta_offsets=self._offsets("meta_offsets"),
            meta_json=arrays["meta_json"],
        )


def _dtype_of(array: Any) -> np.dtype:
    return array.layout.dtype if isinstance(array, ChunkedArrayReader) else array.dtype


class _ZarrArrayReader:
    """Fallback reader through zarr-python, for layouts the fast reader does not implement."""

    def __init__(self, objects: ObjectStore, path: str):
        self._array = zarr.open_array(objects.zarr_store(), path=path, mode="r")
        self.shape: tuple[int, ...] = tuple(self._array.shape)
        self.dtype = np.dtype(self._array.dtype)

    def read_ranges(self, ranges: list[tuple[int, int]]) -> np.ndarray:
        if not ranges:
            return np.zeros((0, *self._array.shape[1:]), dtype=self._array.dtype)
        index = np.concatenate([np.arange(lo, hi) for lo, hi in ranges])
        if index.size == 0:
            return np.zeros((0, *self._array.shape[1:]), dtype=self._array.dtype)
        return self._array.get_orthogonal_selection((index, *[slice(None)] * (self._array.ndim - 1)))

    def read_all(self) -> np.ndarray:
        return self._array[...]
