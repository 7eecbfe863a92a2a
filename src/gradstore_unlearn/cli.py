"""The `gradstore` command line.

    gradstore demo [--out DIR] [--size tiny|small|gpt2]        the whole story on a local store
    gradstore info STORE [--json]                               counts, bytes, compression, segments
    gradstore corpus --out DIR [--size ...]                     the built-in corpus and its splits
    gradstore train --store URI --out DIR [...]                 train with capture into a store
    gradstore forget --store URI --model DIR (--ids ... | --ids-file F | --text T) [...]
    gradstore find --store URI --text T                         fuzzy matching of stored examples
    gradstore influence --store URI --model DIR (--text T | --id ID) [--k N]
    gradstore audit --store URI                                 the forget audit log
    gradstore serve --store URI --model DIR                     the HTTP server

Each command prints a table, or JSON with `--json`. Heavy modules are imported inside the commands, so that
`gradstore --help` and `gradstore info` start fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from .tables import format_pairs


def _storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """`--storage-option key=value` pairs (for s3:// stores: endpoint_url, key, secret, ...)."""
    options: dict[str, Any] = {}
    for item in getattr(args, "storage_option", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"gradstore: --storage-option expects KEY=VALUE, got {item!r}")
        options[key] = value
    return options or None


def _add_store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                        help="option for an s3:// store (endpoint_url=..., key=..., secret=...); repeatable")


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)


def cmd_info(args: argparse.Namespace) -> int:
    from gradstore import GradStore

    store = GradStore.open(args.store, storage_options=_storage_options(args), read_only=True)
    stats = store.stats()
    data = stats.to_dict()
    codec = stats.codec
    pairs = [
        ("store", stats.uri), ("model", stats.model_id or "-"), ("format version", stats.format_version),
        ("dtype", stats.dtype), ("dim", stats.dim), ("vocab size", stats.vocab_size),
        ("examples", stats.examples), ("rows", stats.rows), ("segments", stats.segments),
        ("tombstones", stats.tombstones), ("bytes on disk", f"{stats.bytes_on_disk:,}"),
        ("rows: logical bytes", f"{stats.rows_logical_bytes:,}"), ("rows: stored bytes", f"{stats.rows_stored_bytes:,}"),
        ("compression ratio", round(stats.compression_ratio, 3)),
        ("codec", f"{codec['name']} level {codec['level']} {codec['shuffle']}" + (" +crc32c" if codec["checksum"] else "")),
    ]
    if stats.shadowed_copies:
        pairs.append(("shadowed copies", stats.shadowed_copies))
    _print(args, data, format_pairs(pairs))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradstore", description="Gradient store for machine unlearning.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="describe a store")
    info.add_argument("store", help="store URI: a local path or s3://bucket/prefix")
    info.add_argument("--json", action="store_true", help="print JSON")
    _add_store_options(info)
    info.set_defaults(func=cmd_info)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from gradstore import GradStoreError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except GradStoreError as err:
        print(f"gradstore: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
