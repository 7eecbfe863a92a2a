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
import math
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .errors import FormatError, FormatVersionError, InvalidInputError, NotAStoreError

FORMAT_NAME = "gradstore"
FORMAT_VERSION = 1
METADATA_KEY = "gradstore.json"

DTYPES = ("float32", "bfloat16", "int8")
# How each logical dtype is kept in the `rows` arrays (bfloat16 as its bits: zarr has no bfloat16).
STORED_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(np.uint16), "int8": np.dtype(np.int8)}
CODECS = ("blosc-zstd", "zstd", "none")
CAPTURE_POLICIES = ("first", "all", "off")
# 16 random bytes, hex: the HMAC key of every tombstone and audit hash. It must never change (nor be redrawn
# when missing): the hashes written before would stop matching, and erased IDs would read as never known.
ID_SALT = re.compile(r"[0-9a-fA-F]{32}")

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
        if not isinstance(self.level, int) or isinstance(self.level, bool) or not 0 <= self.level <= 22:
            raise InvalidInputError(f"codec level must be an integer in 0..22, got {self.level!r}")
        if self.shuffle not in ("bitshuffle", "shuffle", "noshuffle"):
            raise InvalidInputError(f"unknown shuffle {self.shuffle!r}")
        if not isinstance(self.checksum, bool):
            raise InvalidInputError(f"codec checksum must be true or false, got {self.checksum!r}")


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
        if not isinstance(self.id_salt, str) or not ID_SALT.fullmatch(self.id_salt):
            raise InvalidInputError(f"id_salt must be 32 hex characters, got {self.id_salt!r}")
        version = self.format_version
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise InvalidInputError(f"format_version must be an integer >= 1, got {version!r}")
        created = self.created
        if not isinstance(created, (int, float)) or isinstance(created, bool) or not math.isfinite(created):
            raise InvalidInputError(f"created must be a time in seconds, got {created!r}")
        if not isinstance(self.capture, dict):
            raise InvalidInputError(f"capture must be an object, got {self.capture!r}")
        policy = self.capture.get("policy", "first")
        if policy not in CAPTURE_POLICIES:
            raise InvalidInputError(f"unknown capture policy {policy!r}; choose one of {CAPTURE_POLICIES}")
        self.codec.validate()

    def to_json(self) -> bytes:
        doc = {"format": FORMAT_NAME, **asdict(self)}
        return json.dumps(doc, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> StoreConfig:
        """Parse and validate `gradstore.json`; `where` is the store's URI. Every problem is a `FormatError`
        (`NotAStoreError` if it describes something else, `FormatVersionError` if it is newer) naming the field.
        """
        where = f"{where}/{METADATA_KEY}"
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise FormatError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(doc, dict):
            raise FormatError(f"{where}: not a JSON object")
        if doc.get("format") != FORMAT_NAME:
            raise NotAStoreError(f"{where} does not describe a gradstore (format={doc.get('format')!r})")
        version = doc.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise FormatError(f"{where}: format_version must be an integer >= 1, got {version!r}")
        if version > FORMAT_VERSION:
            raise FormatVersionError(
                f"{where}: store format version {version}, newer than this gradstore supports "
                f"({FORMAT_VERSION}); upgrade gradstore to open it"
            )
        # Fields with a default in the dataclass are only defaults for *new* stores. Of these, the salt must
        # come from the file (a fresh one would orphan every tombstone); the others may fall back.
        if "id_salt" not in doc:
            raise FormatError(f"{where}: id_salt is missing (the key of every tombstone hash cannot be recovered)")
        doc.pop("format")
        codec = doc.get("codec", {})
        if not isinstance(codec, dict):
            raise FormatError(f"{where}: codec must be an object, got {codec!r}")
        try:
            doc["codec"] = CodecConfig(**codec)
            config = cls(**doc)
            config.validate()
        except (TypeError, InvalidInputError) as err:
            raise FormatError(f"{where}: {err}") from None
        return config
