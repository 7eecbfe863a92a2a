"""The `gradstore` command line.

    gradstore demo [--out DIR] [--size tiny|small|gpt2]        the whole story on a local store
    gradstore info STORE [--json]                               counts, bytes, compression, segments
    gradstore corpus --out DIR [--size ...]                     the built-in corpus and its splits
    gradstore train --store URI --out DIR [...]                 train with capture into a store
    gradstore forget --store URI --model DIR (--ids ... | --ids-file F | --text T) [...]
    gradstore find --store URI --model DIR --text T             fuzzy matching of stored examples
    gradstore influence --store URI --model DIR (--text T | --id ID) [--k N]
    gradstore audit --store URI [--model DIR]                   the forget audit log (and its hash chain)
    gradstore drift --store URI --model DIR [--set F | --clear] the drift budget over all forget requests
    gradstore serve --store URI --model DIR                     the HTTP server

Each command prints a table, or strict JSON with `--json` (values that were not measured, NaN in a report, are
null; `demo --json` prints its tables on stderr). IDs on the command line are strings or integers: `--id-type
auto` (the default) reads "3" as the string ID "3" if the store holds or erased one, else as the integer 3
(only a canonical decimal: "007" is a string); `--id-type int` / `str` say which.

Exit codes: 0 success, 2 bad input (an unknown ID, a missing or unreadable file, a bad value, a model that a
server or another forget holds), 3 a forget that did not reach its target, 4 an audit trail whose model hashes
break (`audit --model`), 130 interrupted, 141 output closed early (`gradstore info STORE | head -1`).
Heavy modules are imported inside the commands, so that `gradstore --help` and `gradstore info` start fast.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from .tables import format_pairs, format_table, json_safe

ID_TYPES = ("auto", "int", "str")


def _storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """`--storage-option key=value` pairs (for s3:// stores: endpoint_url, key, secret, ...)."""
    options: dict[str, Any] = {}
    for item in getattr(args, "storage_option", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--storage-option expects KEY=VALUE, got {item!r}")
        options[key] = value
    return options or None


def _add_store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                        help="option for an s3:// store (endpoint_url=..., key=..., secret=...); repeatable")


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    if getattr(args, "json", False):
        _print_json(data)
    else:
        print(text)


def _print_json(data: Any) -> None:
    # Strict JSON: Python's default writes NaN / Infinity, which JSON parsers (jq, JSON.parse) reject.
    print(json.dumps(json_safe(data), indent=2, allow_nan=False))


# Argument types: a bad value is an argparse usage error (exit 2, naming the option) before anything runs.
def _int_at_least(low: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _fraction(*, allow_zero: bool) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (0 <= value <= 1) or (value == 0 and not allow_zero):  # NaN fails the first test too
            raise argparse.ArgumentTypeError(f"must lie in {'[0, 1]' if allow_zero else '(0, 1]'}, got {text}")
        return value

    return parse


def _budget(text: str) -> float:
    """A drift budget: a fraction above 0 and below 10 (the library's range)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 10:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be above 0 and below 10 (0.05 is 5%), got {text}")
    return value


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


def _resolve_id(store: Any, text: str, id_type: str = "auto") -> Any:
    """A command-line ID. `auto`: the string as given if the store holds it or erased it, else the integer
    it spells in canonical decimal, if any, else the string; `int` / `str`: exactly that (so that the integer
    3 is reachable where the store also holds the string "3")."""
    if id_type == "str":
        return text
    if id_type == "int":
        if not (text.isascii() and text.isdigit()):
            raise ValueError(f"--id-type int: {text!r} is not a non-negative integer")
        return int(text)
    # An erased string still names itself, so that repeating a forget of "3" reports it forgotten instead of
    # erasing the integer 3; and only the canonical spelling names an integer, so that "007" never aliases 7
    # (the server's rule for IDs in URLs).
    from gradstore._encoding import canonical_int_id

    number = canonical_int_id(text)
    if text in store or store.is_erased(text) or number is None:
        return text
    return number


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
            raise ValueError("--holdout needs the model directory's tokenizer to encode the texts")
        holdout = encode_documents(tokenizer, read_user_jsonl(args.holdout), model.config.n_positions)
    return Unlearner(model, store, tokenizer=tokenizer, holdout=holdout, model_dir=args.model,
                     config=ForgetConfig())


def cmd_corpus(args: argparse.Namespace) -> int:
    from . import data

    corpus = data.build_corpus_preset(args.size, seed=args.seed)
    paths = data.write_corpus(corpus, args.out)
    counts = corpus.split_counts()
    # Documents per file: train.jsonl is the whole training set (the docstrings' `train` split and the records
    # of `forget` and `retain`), not the split of that name.
    lines = {**counts, "corpus": len(corpus), "train": len(corpus.train_documents())}
    rows = [(paths[name].name, lines[name]) for name in ("corpus", "train", "forget", "retain", "holdout", "eval")]
    _print(args, {"out": str(args.out), "files": {k: str(v) for k, v in paths.items()}, "counts": counts},
           format_pairs(rows, title=f"corpus written to {args.out} (documents per file)"))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from gradstore import GradStore

    from . import data
    from .train import (
        MODEL_SIZES,
        TrainConfig,
        build_model,
        check_device,
        check_new_model_dir,
        save_model,
        train_model,
    )
    from .unlearn import record_trained_model, save_reference_set

    # Checked before anything is read or written: a bad value must not leave a half-created store behind, and
    # a run must not train for minutes to fail at its save.
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    config.validate()
    check_new_model_dir(args.out)
    device = check_device(args.device or ("cuda" if __import__("torch").cuda.is_available() else "cpu"))
    options = _storage_options(args)
    try:
        existing = GradStore.open(args.store, storage_options=options)
    except FileNotFoundError:
        existing = None
    if existing is not None and len(existing):
        # A new model's gradients do not belong beside another run's: with the `first` policy the IDs it
        # shares with them would not even be captured, and its forgets would ascend the old run's rows.
        raise ValueError(f"the store {args.store} already holds {len(existing)} examples captured from another "
                         "training run: train into a new store")
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
    created = existing is None
    if existing is not None:
        store = existing  # empty (made with options of your own, say): it must fit this model
        if (store.dim, store.vocab_size) != (model.config.n_embd, len(tokenizer)):
            raise ValueError(f"the store {args.store} is for dim {store.dim} and vocabulary {store.vocab_size}; "
                             f"this model has {model.config.n_embd} and {len(tokenizer)}: train into a new store")
    else:
        store = GradStore.create(args.store, dim=model.config.n_embd, vocab_size=len(tokenizer), dtype=args.dtype,
                                 model_id=f"gpt2-{args.size}", capture_policy=args.capture, storage_options=options)
    config = dataclasses.replace(config, device=device, pad_token_id=tokenizer.pad_token_id,
                                 autocast_dtype="bfloat16" if device == "cuda" else None)
    try:
        result = train_model(model, sequences, [d.id for d in documents], config, store=store,
                             capture_policy=args.capture, progress=not args.json, record_trained=False)
        save_model(model, tokenizer, args.out, extra={"train": config.to_dict(), "result": result.to_dict()})
        # Only once the model is saved: the audit chain must start from weights that exist.
        record_trained_model(store, model)
        if holdout:
            save_reference_set(store, data.encode_documents(tokenizer, holdout, preset.max_tokens))
    except BaseException:
        # The captured rows belong to a model that was never saved: they can neither forget nor explain anything,
        # and they are personal data. A store this command created goes with them; an existing one is left alone
        # (its earlier examples are not ours to delete), with a word about what this run added.
        if created:
            store.objects.delete_prefix("")
            print(f"gradstore: training failed; removed the store it had created at {args.store}",
                  file=sys.stderr)
        else:
            print(f"gradstore: training failed; the examples this run captured remain in the existing store "
                  f"{args.store}: erase them or start from a new store", file=sys.stderr)
        raise
    capture = result.capture.to_dict() if result.capture else {}
    _print(args, {"model": str(args.out), "store": args.store, **result.to_dict()} | {"losses": None},
           format_pairs([("model", args.out), ("store", args.store), ("steps", result.steps),
                         ("final loss", result.final_loss), ("tokens/s", round(result.tokens_per_second)),
                         ("examples captured", capture.get("examples_captured")),
                         ("examples not finite (fp16 overflow; captured when next seen)",
                          capture.get("examples_nonfinite")),
                         ("stall seconds", capture.get("stall_seconds"))], title="trained"))
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    from .unlearn import check_request_id

    if args.request_id is not None:
        check_request_id(args.request_id)  # before anything is opened: it names objects in the store
    if args.dry_run:  # changes neither the model nor the store: no need to hold the model
        return _forget(args)
    from .model_lock import ModelDirLock, ModelInUseError

    # Held for the whole run: a server (or another forget) on this model starts from the weights it loaded,
    # and its next save would undo this forget; and a server that starts meanwhile would serve stale weights.
    try:
        lock = ModelDirLock(args.model)
    except ModelInUseError as err:
        raise ValueError(f"{err}; while a server serves it, send the forget to the server (POST /v1/forget)"
                         ) from None
    with lock:
        return _forget(args)


def _forget(args: argparse.Namespace) -> int:
    if args.text is None and args.threshold is not None:
        raise ValueError("--threshold applies to --text only (IDs are forgotten exactly as named)")
    if args.text is not None and not args.text.strip():
        raise ValueError("the text to match is empty")  # as `gradstore find` says
    raw = list(args.ids or [])
    if args.ids_file:
        try:
            with open(args.ids_file, encoding="utf-8") as f:
                # Only the line break goes: an ID may begin or end with spaces, and stripping them could name
                # another stored example. Blank lines are skipped.
                raw += [line.rstrip("\n") for line in f if line.strip()]
        except UnicodeDecodeError as err:
            raise ValueError(f"{args.ids_file}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    engine = _open_engine(args)
    if args.text is not None:
        threshold = 0.5 if args.threshold is None else args.threshold
        _, report = engine.forget_text(args.text, threshold, mode=args.mode, dry_run=args.dry_run,
                                       request_id=args.request_id)
    else:
        ids = [_resolve_id(engine.store, i, args.id_type) for i in raw]
        report = engine.forget(ids, mode=args.mode, dry_run=args.dry_run, request_id=args.request_id)
    _print(args, report.to_dict(), report.to_table())
    return 0 if report.status in ("forgotten", "dry_run", "nothing_to_do") else 3


def cmd_find(args: argparse.Namespace) -> int:
    from gradstore import GradStore

    from .capture import is_later_epoch_record
    from .fuzzy import ShingleIndex
    from .train import load_model

    if not args.text.strip():
        raise ValueError("the text to match is empty")  # as the library's `Unlearner.find` says
    store = GradStore.open(args.store, storage_options=_storage_options(args), read_only=True)
    _, tokenizer = load_model(args.model)  # the store holds token IDs only: the text needs the model's tokenizer
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer (tokenizer.json): find cannot encode the text")
    tokens = tokenizer(args.text, add_special_tokens=False)["input_ids"]
    # Later-epoch records (capture policy `all`) are copies of an example, not examples: skipped, as the
    # library's own fuzzy index skips them.
    skip = is_later_epoch_record if store.config.capture.get("policy") == "all" else None
    index = ShingleIndex()
    if len(tokens) < index.n:
        raise ValueError(f"the text is {len(tokens)} token(s); matching compares {index.n}-token shingles, so it "
                         f"needs at least {index.n} tokens")
    matches = index.add_store(store, skip=skip).query(tokens, args.threshold, metric=args.metric, limit=args.limit)
    rows = [(m.id, round(m.jaccard, 4), round(m.containment, 4)) for m in matches]
    _print(args, [m.__dict__ for m in matches], format_table(["id", "jaccard", "containment"], rows,
                                                             title=f"{len(rows)} match(es)"))
    return 0


def cmd_influence(args: argparse.Namespace) -> int:
    engine = _open_engine(args)
    # Say which: with query_type "auto" an ID the store does not hold would be scored as a text instead.
    if args.text is not None:
        pairs = engine.influence(args.text, args.k, query_type="text")
    else:
        pairs = engine.influence(_resolve_id(engine.store, args.id, args.id_type), args.k, query_type="id")
    _print(args, [{"id": i, "score": v} for i, v in pairs],
           format_table(["id", "score"], pairs, title=f"top {len(pairs)} by embedding-gradient dot product"))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from gradstore import GradStore

    if args.adopt and args.model is None:
        raise ValueError("--adopt needs --model DIR: the model to continue the audit chain from")
    store = GradStore.open(args.store, storage_options=_storage_options(args), read_only=not args.adopt)
    if args.adopt:
        from .model_lock import ModelDirLock, ModelInUseError
        from .train import load_model
        from .unlearn import Unlearner, adopt_model

        try:
            lock = ModelDirLock(args.model)  # not while a server or a forget may be changing those weights
        except ModelInUseError as err:
            raise ValueError(str(err)) from None
        with lock:
            model = load_model(args.model)[0]
            Unlearner(model, store, model_dir=args.model)  # finishes a commit a crash left pending, if any
            adopt_model(store, model)
    records = store.audit_log()
    rows = [(r.get("request_id") or f"({r.get('kind')})", r.get("mode"), len(r.get("id_hashes", [])),
             r.get("metrics_before", {}).get("forget_loss"), r.get("metrics_after", {}).get("forget_loss"),
             r.get("target_loss"), (r.get("model_hash_after") or r.get("model_hash") or "")[:12],
             ", ".join(c["request_id"] for c in r.get("carries") or []) or "-", r.get("erasure_receipt"))
            for r in records]  # a `trained` record shows as "(trained)", with the trained model's hash
    table = format_table(["request", "mode", "ids", "loss before", "loss after", "target", "model after", "carries",
                          "receipt"], rows, title=f"{len(rows)} audit record(s)")
    if args.model is None:
        _print(args, records, table)
        return 0
    from .train import load_model
    from .unlearn import verify_audit_chain

    chain = verify_audit_chain(store, load_model(args.model)[0])
    _print(args, {"records": records, "chain": chain.to_dict()}, f"{table}\n{chain.summary()}")
    return 0 if chain.whole else 4


def cmd_drift(args: argparse.Namespace) -> int:
    from .drift import signed_percent

    engine = _open_engine(args)
    if args.set is None and (args.kind is not None or args.panel is not None or args.keep_baseline):
        raise ValueError("--kind, --panel and --keep-baseline go with --set")
    if args.clear:
        engine.set_drift_budget(None)
        reading = None
    elif args.set is not None:
        if args.keep_baseline and args.panel is not None:
            raise ValueError("--keep-baseline keeps the panel: --panel cannot go with it")
        reading = engine.set_drift_budget(args.set, kind=args.kind or "perplexity", panel=args.panel or 128,
                                          keep_baseline=args.keep_baseline)
    else:
        reading = engine.drift()
    if reading is None:
        _print(args, {"budget": None}, "the store has no drift budget" + (" (removed)" if args.clear else "")
               + ": each forget request is bounded by its own retain guard only")
        return 0
    pairs = [("budget", f"+{100 * reading.budget:.2f}% ({reading.kind})"),
             ("baseline model", reading.baseline_model_hash[:16]), ("panel examples", reading.members),
             ("panel loss at the baseline", reading.baseline_loss), ("panel loss now", reading.loss),
             ("change since the baseline", signed_percent(reading.change)),
             ("left (nats of mean loss)", reading.remaining)]
    _print(args, reading.to_dict(), format_pairs(pairs, title="drift budget" + (" set" if args.set else "")))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    # With --json, stdout is the one JSON document: the demo's progress and tables go to stderr instead.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        report = run_demo(args.out, args.size, retrain=args.retrain, seed=args.seed, device=args.device)
    if args.json:
        _print_json({k: report[k] for k in ("checks", "seconds", "requests")})
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
    demo.add_argument("--json", action="store_true",
                      help="print the checks as JSON on stdout (the progress and tables go to stderr)")
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
    which.add_argument("--ids-file", metavar="FILE",
                       help="one ID per line, as stored (blank lines are skipped)")
    which.add_argument("--text", help="forget every stored example that matches this text")
    forget.add_argument("--id-type", default="auto", choices=ID_TYPES,
                        help="how to read --ids / --ids-file: auto (a string the store holds or erased, else "
                             "an integer), int or str")
    # Above 0, as in the server: at 0 every stored example would match the text.
    forget.add_argument("--threshold", type=_fraction(allow_zero=False), default=None,
                        help="similarity threshold for --text, in (0, 1] (default 0.5)")
    forget.add_argument("--mode", default="first_epoch", choices=["first_epoch", "iterative"])
    forget.add_argument("--holdout", metavar="FILE.jsonl", help="never-trained texts: the calibration target "
                        "(default: the store's reference set)")
    forget.add_argument("--request-id", default=None,
                        help="makes the request idempotent: 1-128 letters, digits and ._:- starting with a "
                             "letter or digit")
    forget.add_argument("--dry-run", action="store_true", help="resolve and report, change nothing")
    forget.add_argument("--json", action="store_true")
    _add_store_options(forget)
    forget.set_defaults(func=cmd_forget)

    find = sub.add_parser("find", help="stored examples matching a text (fuzzy)")
    find.add_argument("--store", required=True)
    find.add_argument("--model", required=True, help="model directory, for its tokenizer")
    find.add_argument("--text", required=True)
    find.add_argument("--threshold", type=_fraction(allow_zero=True), default=0.5, help="in [0, 1]")
    find.add_argument("--metric", default="jaccard", choices=["jaccard", "containment"])
    find.add_argument("--limit", type=_int_at_least(1), default=20)
    find.add_argument("--json", action="store_true")
    _add_store_options(find)
    find.set_defaults(func=cmd_find)

    influence = sub.add_parser("influence", help="training examples that most influenced a text or an example")
    influence.add_argument("--store", required=True)
    influence.add_argument("--model", required=True)
    target = influence.add_mutually_exclusive_group(required=True)
    target.add_argument("--text", help="a text, scored on the current model")
    target.add_argument("--id", help="a stored example (its first-epoch gradient)")
    influence.add_argument("--id-type", default="auto", choices=ID_TYPES,
                           help="how to read --id: auto (a string the store holds or erased, else an "
                                "integer), int or str")
    influence.add_argument("--k", type=_int_at_least(1), default=10)
    influence.add_argument("--json", action="store_true")
    _add_store_options(influence)
    influence.set_defaults(func=cmd_influence)

    audit = sub.add_parser("audit", help="the forget audit log of a store")
    audit.add_argument("--store", required=True)
    audit.add_argument("--model", default=None, metavar="DIR",
                       help="also follow the records' model hashes to this saved model's weights (exit 4 if broken)")
    audit.add_argument("--adopt", action="store_true",
                       help="record the model in --model DIR as where the chain goes on from (after a change made "
                            "off the record, such as fine-tuning, which forgets otherwise refuse); the break "
                            "before it stays in the log")
    audit.add_argument("--json", action="store_true")
    _add_store_options(audit)
    audit.set_defaults(func=cmd_audit)

    drift = sub.add_parser("drift", help="the store's drift budget: how far all forget requests together may move "
                                         "the retained examples' loss")
    drift.add_argument("--store", required=True)
    drift.add_argument("--model", required=True, help="the model directory (the panel is read on it)")
    change = drift.add_mutually_exclusive_group()
    change.add_argument("--set", type=_budget, default=None, metavar="FRACTION",
                        help="set the budget (0.05 is 5%%), with this model as the baseline")
    change.add_argument("--clear", action="store_true", help="remove the budget")
    drift.add_argument("--keep-baseline", action="store_true",
                       help="with --set: change only the fraction (and --kind), keeping the panel, the baseline and "
                            "the drift spent since")
    drift.add_argument("--kind", default=None, choices=["perplexity", "loss"],
                       help="with --set: what the budget bounds (perplexity, the default: the loss and perplexity "
                            "both)")
    drift.add_argument("--panel", type=_int_at_least(1), default=None,
                       help="with --set: how many retained examples measure it (default 128)")
    drift.add_argument("--json", action="store_true")
    _add_store_options(drift)
    drift.set_defaults(func=cmd_drift)

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
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, not at exit: a closed pipe must surface where it is handled below
        return code
    except BrokenPipeError:
        # The reader went away (`gradstore info STORE | head -1`): stop quietly, like a command killed by
        # SIGPIPE. Point stdout at /dev/null so that the interpreter's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (GradStoreError, OSError, ValueError) as err:
        # Input errors (an unknown ID, a path that is a directory or missing, a bad value): one line, no trace.
        print(f"gradstore: {_describe(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        if not _from_object_storage(err):
            raise
        # No credentials, an endpoint that does not answer, access denied: the store's location is unusable.
        print(f"gradstore: the object store failed: {type(err).__name__}: {_describe(err)}", file=sys.stderr)
        return 2


def _from_object_storage(err: BaseException) -> bool:
    """Whether `err` comes from the S3 client libraries (they raise their own types, not OSError)."""
    return type(err).__module__.split(".")[0] in ("botocore", "aiobotocore", "s3fs", "fsspec")


def _describe(err: Exception) -> str:
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        where = f"{err.filename} -> {err.filename2}" if err.filename2 is not None else str(err.filename)
        return f"{where}: {err.strerror}"  # "/tmp: Is a directory", not "[Errno 21] Is a directory: '/tmp'"
    return str(err) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
