"""`gradstore.json`: the store's format metadata, written once at creation and validated on every open.

Layout of a store (see README, "Store format"):

    gradstore.json              this file: format version, model, dim, vocab, dtype, codec, capture policy
    segments/<seg>/             one zarr v3 group per immutable segment (written by one writer)
    manifests/<seg>.json        created last, create-only: the commit point of a segment
    tombstones/<hash>.json      salted hash of an erased ID + time + receipt id (never the ID or its data)
    journal/                    intents of multi-step mutations (erase), replayed after a crash
    locks/                      the mutation lock (erase / compact are single-writer)
    audit/                      records appended by the unlearning engine
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import FormatError, FormatVersionError, InvalidInputError, NotAStoreError

FORMAT_NAME = "gradstore"
FORMAT_VERSION = 1
METADATA_KEY = "gradstore.json"

DTYPES = ("float32", "bfloat16", "int8")
CODECS = ("blosc-zstd", "zstd", "none")
CAPTURE_POLICIES = ("first", "all", "off")

# Measured with benchmarks/store_io.py (bf16 rows, D=768, heavy-tailed values): 64-row chunks inside
# 8192-row shards gave the lowest latency for reading whole examples of ~50-500 rows at random — small chunks
# bound the over-read at either end of an example to < 64 rows, and shards keep the file count (and the
# per-file open cost) low. Larger chunks compress no better (ratio 1.30 either way) and over-read more.
DEFAULT_CHUNK_ROWS = 64
DEFAULT_SHARD_ROWS = 8192


@dataclass(frozen=True)
class CodecConfig:
    """How rows are compressed. Only codecs of the Zarr v3 spec, so any implementation can read a store."""

    name: str = "blosc-zstd"
    level: int = 3
    shuffle: str = "bitshuffle"  # bits of float values compress; bytes barely do
    checksum: bool = True  # crc32c per chunk: corruption is detected on read, not silently returned

    def validate(self) -> None:
        if self.name not in CODECS:
            raise InvalidInputError(f"unknown codec {self.name!r}; choose one of {CODECS}")
        if not 0 <= self.level <= 22:
            raise InvalidInputError(f"codec level {self.level} out of range 0..22")
        if self.shuffle not in ("bitshuffle", "shuffle", "noshuffle"):
            raise InvalidInputError(f"unknown shuffle {self.shuffle!r}")


@dataclass(frozen=True)
class StoreConfig:
    """The content of `gradstore.json`."""

    dim: int
    vocab_size: int
    dtype: str
    model_id: str
    codec: CodecConfig = field(default_factory=CodecConfig)
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    shard_rows: int = DEFAULT_SHARD_ROWS
    capture: dict[str, Any] = field(default_factory=lambda: {"policy": "first", "layer": "input_embedding"})
    id_salt: str = field(default_factory=lambda: secrets.token_hex(16))
    created: float = field(default_factory=time.time)
    format_version: int = FORMAT_VERSION

    def validate(self) -> None:
        for name in ("dim", "vocab_size", "chunk_rows", "shard_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
        if self.vocab_size > 2**31 - 1:
            raise InvalidInputError(f"vocab_size {self.vocab_size} does not fit int32 token ids")
        if self.dtype not in DTYPES:
            raise InvalidInputError(f"unsupported dtype {self.dtype!r}; choose one of {DTYPES}")
        if self.shard_rows % self.chunk_rows:
            raise InvalidInputError(f"shard_rows {self.shard_rows} must be a multiple of chunk_rows {self.chunk_rows}")
        if not isinstance(self.model_id, str):
            raise InvalidInputError(f"model_id must be a string, got {type(self.model_id).__name__}")
        policy = self.capture.get("policy", "first")
        if policy not in CAPTURE_POLICIES:
            raise InvalidInputError(f"unknown capture policy {policy!r}; choose one of {CAPTURE_POLICIES}")
        self.codec.validate()

    def to_json(self) -> bytes:
        doc = {"format": FORMAT_NAME, **asdict(self)}
        return json.dumps(doc, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> StoreConfig:
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise FormatError(f"{where}: gradstore.json is not valid JSON ({err})") from None
        if not isinstance(doc, dict):
            raise FormatError(f"{where}: gradstore.json is not a JSON object")
        if doc.get("format") != FORMAT_NAME:
            raise NotAStoreError(f"{where}: gradstore.json does not describe a gradstore "
                                 f"(format={doc.get('format')!r})")
        version = doc.get("format_version")
        if not isinstance(version, int):
            raise FormatError(f"{where}: gradstore.json has no integer format_version")
        if version > FORMAT_VERSION:
            raise FormatVersionError(
                f"{where} uses store format version {version}, newer than this gradstore supports "
                f"({FORMAT_VERSION}); upgrade gradstore to open it"
            )
        doc.pop("format")
        try:
            doc["codec"] = CodecConfig(**doc.get("codec", {}))
            config = cls(**doc)
            config.validate()
        except (TypeError, InvalidInputError) as err:
            raise FormatError(f"{where}: invalid gradstore.json ({err})") from None
        return config
