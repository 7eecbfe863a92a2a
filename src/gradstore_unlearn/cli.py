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

from .tables import format_pairs, format_table


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


def _resolve_id(store: Any, text: str) -> Any:
    """A command-line ID: the string as given if the store holds it, else the integer it spells, if any."""
    if text in store or not text.isdigit():
        return text
    return int(text)


def _open_engine(args: argparse.Namespace, *, need_model: bool = True) -> Any:
    from gradstore import GradStore

    from .train import load_model
    from .unlearn import ForgetConfig, Unlearner

    store = GradStore.open(args.store, storage_options=_storage_options(args))
    model, tokenizer = load_model(args.model)
    holdout = None
    if getattr(args, "holdout", None):
        from .data import encode_documents, read_user_jsonl

        if tokenizer is None:
            raise SystemExit("gradstore: --holdout needs the model directory's tokenizer to encode the texts")
        holdout = encode_documents(tokenizer, read_user_jsonl(args.holdout), model.config.n_positions)
    return Unlearner(model, store, tokenizer=tokenizer, holdout=holdout, model_dir=args.model,
                     config=ForgetConfig())


def cmd_corpus(args: argparse.Namespace) -> int:
    from . import data

    corpus = data.build_corpus_preset(args.size, seed=args.seed)
    paths = data.write_corpus(corpus, args.out)
    counts = corpus.split_counts()
    _print(args, {"out": str(args.out), "files": {k: str(v) for k, v in paths.items()}, "counts": counts},
           format_pairs(sorted(counts.items()), title=f"corpus written to {args.out}"))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from gradstore import GradStore

    from . import data
    from .train import MODEL_SIZES, TrainConfig, build_model, save_model, train_model
    from .unlearn import save_reference_set

    preset = data.CORPUS_SIZES[args.size]
    if args.data:
        documents = data.read_user_jsonl(args.data)
        holdout: list = []
    else:
        corpus = data.build_corpus_preset(args.size, seed=args.seed)
        documents, holdout = corpus.train_documents(), corpus.split("holdout")
    tokenizer = data.train_tokenizer(documents, vocab_size=preset.vocab_size)
    sequences = data.encode_documents(tokenizer, documents, preset.max_tokens)
    model = build_model(args.size if args.size in MODEL_SIZES else "tiny", len(tokenizer), preset.max_tokens,
                        seed=args.seed, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    options = _storage_options(args)
    try:
        store = GradStore.open(args.store, storage_options=options)
    except FileNotFoundError:
        store = GradStore.create(args.store, dim=model.config.n_embd, vocab_size=len(tokenizer), dtype=args.dtype,
                                 model_id=f"gpt2-{args.size}", capture_policy=args.capture, storage_options=options)
    device = args.device or ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=device,
                         pad_token_id=tokenizer.pad_token_id,
                         autocast_dtype="bfloat16" if device == "cuda" else None)
    result = train_model(model, sequences, [d.id for d in documents], config, store=store,
                         capture_policy=args.capture, progress=not args.json)
    save_model(model, tokenizer, args.out, extra={"train": config.to_dict(), "result": result.to_dict()})
    if holdout:
        save_reference_set(store, data.encode_documents(tokenizer, holdout, preset.max_tokens))
    capture = result.capture.to_dict() if result.capture else {}
    _print(args, {"model": str(args.out), "store": args.store, **result.to_dict()} | {"losses": None},
           format_pairs([("model", args.out), ("store", args.store), ("steps", result.steps),
                         ("final loss", result.final_loss), ("tokens/s", round(result.tokens_per_second)),
                         ("examples captured", capture.get("examples_captured")),
                         ("stall seconds", capture.get("stall_seconds"))], title="trained"))
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    engine = _open_engine(args)
    if args.text:
        _, report = engine.forget_text(args.text, args.threshold, mode=args.mode, dry_run=args.dry_run,
                                             request_id=args.request_id)
    else:
        raw = list(args.ids or [])
        if args.ids_file:
            with open(args.ids_file, encoding="utf-8") as f:
                raw += [line.strip() for line in f if line.strip()]
        ids = [_resolve_id(engine.store, i) for i in raw]
        report = engine.forget(ids, mode=args.mode, dry_run=args.dry_run, request_id=args.request_id)
    _print(args, report.to_dict(), report.to_table())
    return 0 if report.status in ("forgotten", "dry_run", "nothing_to_do") else 3


def cmd_find(args: argparse.Namespace) -> int:
    from gradstore import GradStore

    from .fuzzy import ShingleIndex

    store = GradStore.open(args.store, storage_options=_storage_options(args), read_only=True)
    if args.model:
        from .train import load_model

        _, tokenizer = load_model(args.model)
    else:
        raise SystemExit("gradstore find: --model DIR is needed for its tokenizer")
    tokens = tokenizer(args.text, add_special_tokens=False)["input_ids"]
    matches = ShingleIndex().add_store(store).query(tokens, args.threshold, metric=args.metric, limit=args.limit)
    rows = [(m.id, round(m.jaccard, 4), round(m.containment, 4)) for m in matches]
    _print(args, [m.__dict__ for m in matches], format_table(["id", "jaccard", "containment"], rows,
                                                             title=f"{len(rows)} match(es)"))
    return 0


def cmd_influence(args: argparse.Namespace) -> int:
    engine = _open_engine(args)
    query = args.text if args.text is not None else _resolve_id(engine.store, args.id)
    pairs = engine.influence(query, args.k)
    _print(args, [{"id": i, "score": v} for i, v in pairs],
           format_table(["id", "score"], pairs, title=f"top {len(pairs)} by embedding-gradient dot product"))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from gradstore import GradStore

    store = GradStore.open(args.store, storage_options=_storage_options(args), read_only=True)
    records = store.audit_log()
    rows = [(r.get("request_id"), r.get("mode"), len(r.get("id_hashes", [])), r.get("metrics_before", {}).get(
        "forget_loss"), r.get("metrics_after", {}).get("forget_loss"), r.get("target_loss"),
        (r.get("model_hash_after") or "")[:12], r.get("erasure_receipt")) for r in records]
    _print(args, records, format_table(["request", "mode", "ids", "loss before", "loss after", "target",
                                        "model after", "receipt"], rows, title=f"{len(rows)} audit record(s)"))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(args.out, args.size, retrain=args.retrain, seed=args.seed, device=args.device)
    if args.json:
        print(json.dumps({k: report[k] for k in ("checks", "seconds", "requests")}, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradstore", description="Gradient store for machine unlearning.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="train with capture, forget by ID and by text, show before/after")
    demo.add_argument("--out", default="demo-out", help="directory for the corpus, store, model and report")
    demo.add_argument("--size", default="tiny", choices=["tiny", "small", "gpt2"])
    demo.add_argument("--retrain", action="store_true", help="also retrain without the forgotten records (KS test)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    demo.add_argument("--json", action="store_true", help="also print the checks as JSON")
    demo.set_defaults(func=cmd_demo)

    info = sub.add_parser("info", help="describe a store")
    info.add_argument("store", help="store URI: a local path or s3://bucket/prefix")
    info.add_argument("--json", action="store_true", help="print JSON")
    _add_store_options(info)
    info.set_defaults(func=cmd_info)

    corpus = sub.add_parser("corpus", help="write the built-in corpus and its splits as JSONL")
    corpus.add_argument("--out", required=True)
    corpus.add_argument("--size", default="tiny", choices=["tiny", "small", "gpt2"])
    corpus.add_argument("--seed", type=int, default=0)
    corpus.add_argument("--json", action="store_true")
    corpus.set_defaults(func=cmd_corpus)

    train = sub.add_parser("train", help="train a GPT-2-architecture model with gradient capture")
    train.add_argument("--store", required=True)
    train.add_argument("--out", required=True, help="directory for the model and tokenizer")
    train.add_argument("--data", help="your corpus: JSONL, one {\"id\": ..., \"text\": ...} per line")
    train.add_argument("--size", default="tiny", choices=["tiny", "small", "gpt2"])
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--capture", default="first", choices=["first", "all", "off"])
    train.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "int8"])
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default=None)
    train.add_argument("--json", action="store_true")
    _add_store_options(train)
    train.set_defaults(func=cmd_train)

    forget = sub.add_parser("forget", help="forget examples by ID or by text")
    forget.add_argument("--store", required=True)
    forget.add_argument("--model", required=True, help="the model directory (updated in place, atomically)")
    which = forget.add_mutually_exclusive_group(required=True)
    which.add_argument("--ids", nargs="+", metavar="ID")
    which.add_argument("--ids-file", metavar="FILE", help="one ID per line")
    which.add_argument("--text", help="forget every stored example that matches this text")
    forget.add_argument("--threshold", type=float, default=0.5, help="similarity threshold for --text")
    forget.add_argument("--mode", default="first_epoch", choices=["first_epoch", "iterative"])
    forget.add_argument("--holdout", metavar="FILE.jsonl", help="never-trained texts: the calibration target "
                        "(default: the store's reference set)")
    forget.add_argument("--request-id", default=None, help="makes the request idempotent")
    forget.add_argument("--dry-run", action="store_true", help="resolve and report, change nothing")
    forget.add_argument("--json", action="store_true")
    _add_store_options(forget)
    forget.set_defaults(func=cmd_forget)

    find = sub.add_parser("find", help="stored examples matching a text (fuzzy)")
    find.add_argument("--store", required=True)
    find.add_argument("--model", help="model directory, for its tokenizer")
    find.add_argument("--text", required=True)
    find.add_argument("--threshold", type=float, default=0.5)
    find.add_argument("--metric", default="jaccard", choices=["jaccard", "containment"])
    find.add_argument("--limit", type=int, default=20)
    find.add_argument("--json", action="store_true")
    _add_store_options(find)
    find.set_defaults(func=cmd_find)

    influence = sub.add_parser("influence", help="training examples that most influenced a text or an example")
    influence.add_argument("--store", required=True)
    influence.add_argument("--model", required=True)
    target = influence.add_mutually_exclusive_group(required=True)
    target.add_argument("--text")
    target.add_argument("--id")
    influence.add_argument("--k", type=int, default=10)
    influence.add_argument("--json", action="store_true")
    _add_store_options(influence)
    influence.set_defaults(func=cmd_influence)

    audit = sub.add_parser("audit", help="the forget audit log of a store")
    audit.add_argument("--store", required=True)
    audit.add_argument("--json", action="store_true")
    _add_store_options(audit)
    audit.set_defaults(func=cmd_audit)

    try:
        from gradstore_server.cli import add_serve_command
    except ImportError:  # the server's dependencies are optional for the rest of the command line
        pass
    else:
        add_serve_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from gradstore import GradStoreError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (GradStoreError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"gradstore: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
