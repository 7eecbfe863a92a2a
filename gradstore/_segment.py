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

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from ._arrays import ChunkedArrayReader, UnsupportedLayout, write_array
from ._encoding import ExampleId
from ._format import StoreConfig
from ._objects import ObjectStore
from .errors import FormatError

SEGMENTS = "segments"
MANIFESTS = "manifests"
_SMALL_CHUNK = 1024  # elements per chunk of 1-D arrays: an example's token ids cost one or two 4 KiB chunks
_SMALL_SHARD = 1 << 20


def new_segment_id() -> str:
    """Time-ordered, unique: sorting segment IDs sorts them by creation (newest wins on duplicate IDs)."""
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
        }, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        try:
            doc = json.loads(data)
            manifest = cls(
                segment=str(doc["segment"]),
                ids=tuple(doc["ids"]),
                row_offsets=np.asarray(doc["row_offsets"], dtype=np.int64),
                replaces=tuple(doc.get("replaces", ())),
                stored_bytes=int(doc.get("stored_bytes", 0)),
                rows_stored_bytes=int(doc.get("rows_stored_bytes", 0)),
                created=float(doc.get("created", 0.0)),
                writer=str(doc.get("writer", "")),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise FormatError(f"{where}: malformed manifest ({err})") from None
        if len(manifest.row_offsets) != len(manifest.ids) + 1:
            raise FormatError(f"{where}: manifest has {len(manifest.ids)} ids but {len(manifest.row_offsets)} offsets")
        return manifest


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
    """Random access to one committed segment's arrays; opened lazily, safe to share between threads."""

    ARRAYS = ("rows", "scales", "token_ids", "seq_tokens", "seq_offsets", "meta_json", "meta_offsets")

    def __init__(self, objects: ObjectStore, manifest: Manifest):
        self.objects = objects
        self.manifest = manifest
        self.root = f"{SEGMENTS}/{manifest.segment}"
        self._arrays: dict[str, Any] = {}
        self._small: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def _array(self, name: str) -> Any:
        with self._lock:
            if name not in self._arrays:
                path = f"{self.root}/{name}"
                try:
                    metadata = json.loads(self.objects.read(f"{path}/zarr.json"))
                except FileNotFoundError:
                    raise FileNotFoundError(f"segment {self.manifest.segment} has no array {name!r}") from None
                try:
                    self._arrays[name] = ChunkedArrayReader(self.objects, path, metadata)
                except UnsupportedLayout:  # written by another tool: read it through zarr-python
                    self._arrays[name] = _ZarrArrayReader(self.objects, path)
            return self._arrays[name]

    def _offsets(self, name: str) -> np.ndarray:
        with self._lock:
            cached = self._small.get(name)
        if cached is None:
            cached = self._array(name).read_all().astype(np.int64)
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


class _ZarrArrayReader:
    """Fallback reader through zarr-python, for layouts the fast reader does not implement."""

    def __init__(self, objects: ObjectStore, path: str):
        self._array = zarr.open_array(objects.zarr_store(), path=path, mode="r")

    def read_ranges(self, ranges: list[tuple[int, int]]) -> np.ndarray:
        if not ranges:
            return np.zeros((0, *self._array.shape[1:]), dtype=self._array.dtype)
        index = np.concatenate([np.arange(lo, hi) for lo, hi in ranges])
        if index.size == 0:
            return np.zeros((0, *self._array.shape[1:]), dtype=self._array.dtype)
        return self._array.get_orthogonal_selection((index, *[slice(None)] * (self._array.ndim - 1)))

    def read_all(self) -> np.ndarray:
        return self._array[...]
