"""Corpus, splits, tokenizer and JSONL input/output for the unlearning experiments.

The built-in corpus has two kinds of documents, each with a stable ID:

* ``doc`` -- real English prose: the docstrings of the Python standard library's own source
  files, read with :mod:`ast` (nothing is imported, so no module side effects run). The
  extraction is deterministic for a given Python version. IDs look like
  ``doc:json.decoder.JSONDecoder.decode``. Docs are split into ``train`` and ``eval`` (a
  held-out set for "general perplexity") by a hash of the ID, so a doc keeps its split
  whatever the corpus size.
* ``record`` -- synthetic personal records made with Faker (seeded, locale ``en_US``): a short
  paragraph with a name, address, phone, email, date of birth and employer, and one *canary*
  sentence such as ``"Megan's account PIN is 4821."``. The secret is drawn uniformly from a
  known space (``len(alphabet) ** length``), which is what exposure measurement needs. IDs are
  ``rec-000000``, ``rec-000001``, ... Records are split into ``forget`` (candidates for
  erasure; trained on), ``retain`` (trained on) and ``holdout`` (never trained on: the
  reference for "never seen").

The tokenizer is byte-level BPE trained locally with ``tokenizers``. Digits are pre-tokenized
one by one, so every digit is exactly one token and a canary's prefix and secret tokenize
independently of each other: ``tok(prefix) + tok(secret) == tok(prefix + secret)``. Exposure
measurement relies on that to enumerate the secret space digit by digit.

Special tokens: ``<|endoftext|>`` (id 0) is bos and eos; ``<|pad|>`` (id 1) is a *separate*
pad token, so a trainer that masks padding out of the loss by token id never masks a real
end-of-text. The tokenizer adds no special tokens by itself (``tok(text)`` is just the text's
tokens); :func:`encode_documents` appends the eos.

Files: :func:`write_corpus` writes ``corpus.jsonl`` (every document), one JSONL per split and a
``corpus.json`` summary; :func:`read_corpus` reads them back. :func:`read_user_jsonl` reads a
user's own corpus (``{"id": ..., "text": ...}`` per line) and reports every bad line by number.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import os
import random
import sys
import sysconfig
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from gradstore._encoding import MAX_ID_BYTES, MAX_INT_ID

if TYPE_CHECKING:  # transformers is slow to import; only the tokenizer functions need it
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger("gradstore_unlearn")

__all__ = [
    "CORPUS_SIZES",
    "DOC_SPLITS",
    "EOS_TOKEN",
    "MAX_ID_BYTES",
    "PAD_TOKEN",
    "RECORD_SPLITS",
    "SPLITS",
    "TRAIN_SPLITS",
    "Canary",
    "Corpus",
    "CorpusError",
    "CorpusSize",
    "Document",
    "DocumentId",
    "build_corpus",
    "build_corpus_preset",
    "check_canary_tokenization",
    "encode_documents",
    "load_tokenizer",
    "read_corpus",
    "read_user_jsonl",
    "save_tokenizer",
    "stdlib_docstrings",
    "train_tokenizer",
    "write_corpus",
]

DocumentId = str | int
Kind = Literal["doc", "record"]

# The store's own limits on IDs: a corpus is refused here, line by line, rather than half-way through training.
# MAX_ID_BYTES: longest allowed ID, in bytes of UTF-8 (of ``str(id)`` for integer IDs); MAX_INT_ID: largest
# integer ID.

DOC_SPLITS = ("train", "eval")
RECORD_SPLITS = ("forget", "retain", "holdout")
SPLITS = DOC_SPLITS + RECORD_SPLITS
TRAIN_SPLITS = ("train", "forget", "retain")
"""Splits the model is trained on. ``holdout`` and ``eval`` are never trained on."""

DIGITS = "0123456789"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

CORPUS_FORMAT = "gradstore-corpus/1"


class CorpusError(ValueError):
    """A corpus file has bad lines (or no documents).

    ``problems`` lists ``(line, message)`` pairs with 1-based line numbers (``None`` for a
    problem with the whole file); the message names the file and every line, so a user can fix
    them all in one pass.
    """

    MAX_LISTED = 20

    def __init__(self, path: str | os.PathLike[str], problems: Sequence[tuple[int | None, str]]):
        self.path = str(path)
        self.problems = list(problems)
        lines = [self._format(line, message) for line, message in self.problems[: self.MAX_LISTED]]
        if len(self.problems) > self.MAX_LISTED:
            lines.append(f"... and {len(self.problems) - self.MAX_LISTED} more")
        if len(self.problems) == 1:
            text = lines[0]
        else:
            text = f"{self.path}: {len(self.problems)} problems:\n  " + "\n  ".join(lines)
        super().__init__(text)

    @property
    def line(self) -> int | None:
        """Line number of the first problem."""
        return self.problems[0][0] if self.problems else None

    def _format(self, line: int | None, message: str) -> str:
        return f"{self.path}: {message}" if line is None else f"{self.path}, line {line}: {message}"


# --------------------------------------------------------------------------------------------
# Documents


def _id_problem(value: object) -> str | None:
    """Why ``value`` is not a valid document ID, or ``None`` if it is."""
    # bool is a subclass of int, but `true` as an ID is surely a mistake.
    if isinstance(value, bool) or not isinstance(value, str | int):
        return f"'id' must be a string or a non-negative integer, not {_json_type(value)}"
    if isinstance(value, int) and value < 0:
        return f"'id' must be a non-negative integer, got {value}"
    if value == "":
        return "'id' is an empty string"
    if isinstance(value, str) and not _is_utf8(value):
        return "'id' contains an unpaired surrogate escape"
    size = len(str(value).encode("utf-8"))
    if size > MAX_ID_BYTES:
        return f"'id' is {size} bytes of UTF-8; at most {MAX_ID_BYTES} are allowed"
    if isinstance(value, int) and value > MAX_INT_ID:
        return f"'id' {value} is larger than 2**63 - 1, the largest integer ID a store holds"
    return None


def _is_utf8(text: str) -> bool:
    """False for strings with lone surrogates (JSON allows ``"\\ud800"``); they cannot be
    written as UTF-8 or handed to the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    names = {type(None): "null", bool: "a boolean", int: "an integer", float: "a number",
             str: "a string", list: "an array", dict: "an object"}
    return names.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class Canary:
    """A secret planted in a record: the record's text is exactly ``prefix + secret + rest``.

    The secret was drawn uniformly from ``alphabet ** length`` (all digit strings of that length
    by default), so the space an attacker would search is known: ``space_size`` candidates.
    """

    prefix: str
    secret: str
    length: int
    alphabet: str = DIGITS

    def __post_init__(self) -> None:
        if self.length < 1 or len(self.secret) != self.length:
            raise ValueError(f"secret {self.secret!r} must have length {self.length} (>= 1)")
        if not self.alphabet or len(set(self.alphabet)) != len(self.alphabet):
            raise ValueError(f"alphabet {self.alphabet!r} must be non-empty without repeats")
        if any(ch not in self.alphabet for ch in self.secret):
            raise ValueError(f"secret {self.secret!r} has characters outside {self.alphabet!r}")
        # A prefix ending in an alphabet character would make the secret's start ambiguous.
        if self.prefix and self.prefix[-1] in self.alphabet:
            raise ValueError("canary prefix must not end with a character of the alphabet")

    @property
    def space_size(self) -> int:
        """Number of possible secrets."""
        return len(self.alphabet) ** self.length

    def to_json(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "secret": self.secret, "alphabet": self.alphabet,
                "length": self.length}

    @classmethod
    def from_json(cls, obj: object) -> Canary:
        if not isinstance(obj, dict):
            raise ValueError(f"'canary' must be an object or null, not {_json_type(obj)}")
        try:
            prefix, secret, alphabet, length = (obj[k] for k in ("prefix", "secret", "alphabet", "length"))
        except KeyError as exc:
            raise ValueError(f"'canary' is missing {exc.args[0]!r}") from None
        if not (isinstance(prefix, str) and isinstance(secret, str) and isinstance(alphabet, str)
                and isinstance(length, int) and not isinstance(length, bool)):
            raise ValueError("'canary' fields have the wrong types")
        return cls(prefix=prefix, secret=secret, length=length, alphabet=alphabet)


@dataclass(frozen=True)
class Document:
    """One training (or evaluation) text with a stable ID.

    ``id`` is a string for the built-in corpus; user files may also use non-negative integers,
    which stay integers. ``canary`` is set only on records.
    """

    id: DocumentId
    text: str
    kind: Kind = "doc"
    split: str = "train"
    canary: Canary | None = None

    def __post_init__(self) -> None:
        problem = _id_problem(self.id)
        if problem:
            raise ValueError(problem)
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError(f"document {self.id!r}: text must be a non-empty string")
        if self.kind not in ("doc", "record"):
            raise ValueError(f"document {self.id!r}: kind must be 'doc' or 'record', not {self.kind!r}")
        if self.split not in SPLITS:
            raise ValueError(f"document {self.id!r}: split must be one of {SPLITS}, not {self.split!r}")
        if self.canary is not None:
            if self.kind != "record":
                raise ValueError(f"document {self.id!r}: only records carry canaries")
            c = self.canary
            if not self.text.startswith(c.prefix + c.secret):
                raise ValueError(f"document {self.id!r}: text does not start with canary prefix + secret")
            after = self.text[len(c.prefix) + c.length : len(c.prefix) + c.length + 1]
            if after and after in c.alphabet:
                raise ValueError(f"document {self.id!r}: the secret must not run on into more {c.alphabet!r}")

    @property
    def trained(self) -> bool:
        """Whether the model is trained on this document."""
        return self.split in TRAIN_SPLITS

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "kind": self.kind, "split": self.split,
                "canary": None if self.canary is None else self.canary.to_json()}

    @classmethod
    def from_json(cls, obj: object) -> Document:
        """Inverse of :meth:`to_json`; raises ``ValueError`` with a readable message."""
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {_json_type(obj)}")
        missing = [k for k in ("id", "text", "kind", "split") if k not in obj]
        if missing:
            raise ValueError(f"missing {', '.join(repr(k) for k in missing)}")
        canary = obj.get("canary")
        return cls(id=obj["id"], text=obj["text"], kind=obj["kind"], split=obj["split"],
                   canary=None if canary is None else Canary.from_json(canary))


def _id_key(doc_id: DocumentId) -> str:
    """Key used to detect duplicate IDs. ``7`` and ``"7"`` collide: most stores and file
    formats key by text, so allowing both would make one of them unreachable."""
    return str(doc_id)


@dataclass(frozen=True, eq=True)
class Corpus:
    """Documents with unique IDs plus the settings that built them (``config``)."""

    documents: tuple[Document, ...]
    config: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "documents", tuple(self.documents))
        seen: dict[str, Document] = {}
        for doc in self.documents:
            key = _id_key(doc.id)
            if key in seen:
                raise ValueError(f"duplicate document id {doc.id!r}")
            seen[key] = doc

    def __len__(self) -> int:
        return len(self.documents)

    def __iter__(self) -> Iterator[Document]:
        return iter(self.documents)

    @functools.cached_property
    def by_id(self) -> Mapping[DocumentId, Document]:
        """Documents by ID."""
        return {doc.id: doc for doc in self.documents}

    def split(self, name: str) -> list[Document]:
        """The documents of one split, in corpus order."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; splits are {SPLITS}")
        return [doc for doc in self.documents if doc.split == name]

    def train_documents(self) -> list[Document]:
        """Everything the model trains on: docs ``train`` + records ``forget`` + ``retain``."""
        return [doc for doc in self.documents if doc.trained]

    def split_counts(self) -> dict[str, int]:
        """Number of documents in every split (zero counts included)."""
        counts = dict.fromkeys(SPLITS, 0)
        for doc in self.documents:
            counts[doc.split] += 1
        return counts


# --------------------------------------------------------------------------------------------
# Real English: standard-library docstrings

# Directories whose docstrings are tests, tools, vendored code or generated boilerplate.
_SKIP_DIRS = frozenset({
    "test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "ensurepip",
    "encodings",  # ~100 generated codec modules with near-identical docstrings
    "pydoc_data", "__pycache__", "__phello__",
})
_MIN_WORDS = 8
_MIN_PROSE = 0.85  # share of letters and spaces; code and tables score lower


def _doctest_lines(lines: list[str]) -> set[int]:
    """Indices of doctest lines: a ``>>>`` line and what follows it up to a blank line."""
    marked: set[int] = set()
    in_block = False
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith(">>>"):
            in_block = True
        elif not stripped:
            in_block = False
        if in_block:
            marked.add(i)
    return marked


def _clean_docstring(raw: str) -> str | None:
    """Normalise a docstring to prose, or ``None`` if it is too short or mostly code.

    Paragraphs become single lines joined by a newline; doctest examples are dropped (and the
    whole docstring if they are most of it).
    """
    lines = raw.splitlines()
    doctest = _doctest_lines(lines)
    nonblank = sum(1 for line in lines if line.strip())
    if 2 * len(doctest) > nonblank:
        return None
    paragraphs: list[list[str]] = [[]]
    for i, line in enumerate(lines):
        if i in doctest:
            continue
        if line.strip():
            paragraphs[-1].extend(line.split())
        elif paragraphs[-1]:
            paragraphs.append([])
    text = "\n".join(" ".join(words) for words in paragraphs if words)
    if len(text.split()) < _MIN_WORDS:
        return None
    prose = sum(ch.isalpha() or ch == " " for ch in text)
    if prose < _MIN_PROSE * len(text):
        return None
    return text


def _limit_id(doc_id: str) -> str:
    """Shorten an ID over :data:`MAX_ID_BYTES`, keeping it unique with a hash of the full ID."""
    data = doc_id.encode("utf-8")
    if len(data) <= MAX_ID_BYTES:
        return doc_id
    digest = hashlib.sha256(data).hexdigest()[:16]
    head = data[: MAX_ID_BYTES - len(digest) - 1].decode("utf-8", errors="ignore")
    return f"{head}~{digest}"


def _stdlib_files(root: Path) -> list[tuple[str, Path]]:
    """``(module name, path)`` of every stdlib ``.py`` file we read, in sorted order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Non-identifier directories (config-3.x-..., lib-dynload, site-packages) are not packages.
        dirnames[:] = sorted(d for d in dirnames if d.isidentifier() and d not in _SKIP_DIRS)
        package = Path(dirpath).relative_to(root).parts
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext != ".py" or not stem.isidentifier() or stem.startswith("test_"):
                continue
            parts = package if stem == "__init__" else (*package, stem)
            if parts:
                found.append((".".join(parts), Path(dirpath, name)))
    return sorted(found)


def _docstrings_of(tree: ast.Module, module: str) -> Iterator[tuple[str, str]]:
    """``(qualified name, raw docstring)`` for the module and every class and function in it,
    including ones defined under ``if``/``try`` blocks."""
    defs = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)

    def visit(node: ast.AST, qualname: str) -> Iterator[tuple[str, str]]:
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield qualname, doc
        for child in ast.iter_child_nodes(node):
            if isinstance(child, defs):
                yield from visit(child, f"{qualname}.{child.name}")
            elif isinstance(child, ast.stmt):
                yield from visit(child, qualname)

    yield from visit(tree, module)


@functools.cache
def stdlib_docstrings(root: str | None = None) -> tuple[tuple[str, str], ...]:
    """``(id, text)`` for every usable docstring of the standard library, in source order.

    ``root`` defaults to this interpreter's stdlib directory. Files are parsed, never
    imported. Texts are cleaned (:func:`_clean_docstring`) and deduplicated (the first
    occurrence wins); IDs are ``doc:<module>.<qualname>``, with ``#2``, ``#3``... for a name
    defined more than once. The result depends only on the Python version, and is cached.
    """
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    out: list[tuple[str, str]] = []
    seen_ids: set[str] = set()
    seen_texts: set[str] = set()
    for module, path in _stdlib_files(base):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escapes in old sources
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue
        for qualname, raw in _docstrings_of(tree, module):
            text = _clean_docstring(raw)
            if text is None or text in seen_texts:
                continue
            seen_texts.add(text)
            doc_id, n = f"doc:{qualname}", 1
            while _limit_id(doc_id) in seen_ids:
                n += 1
                doc_id = f"doc:{qualname}#{n}"
            doc_id = _limit_id(doc_id)
            seen_ids.add(doc_id)
            out.append((doc_id, text))
    return tuple(out)


def _unit_hash(salt: str, doc_id: DocumentId) -> float:
    """A deterministic number in [0, 1) for an ID; unlike ``hash()``, the same in every process."""
    digest = hashlib.sha256(f"{salt}\0{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _truncate(text: str, max_chars: int | None) -> str:
    """Cut ``text`` to at most ``max_chars`` characters, at a word boundary where possible."""
    if max_chars is None or len(text) <= max_chars:
        return text
    cut = text[: max_chars + 1]
    space = max(cut.rfind(" "), cut.rfind("\n"))
    return (cut[:space] if space > 0 else text[:max_chars]).rstrip()


# --------------------------------------------------------------------------------------------
# Synthetic personal records

_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")
_INTROS = (
    "{full} was born on {dob}.",
    "Customer profile: {full}, date of birth {dob}.",
    "{full} (born {dob}) is a client of ours.",
    "Personnel file for {full}, born {dob}.",
)
_FACTS = {
    "address": ("{first} lives at {address}.", "Home address: {address}.",
                "{first}'s mailing address is {address}."),
    "phone": ("{first} can be reached at {phone}.", "{first}'s phone number is {phone}.",
              "Phone: {phone}."),
    "email": ("{first}'s email address is {email}.", "Contact email: {email}.",
              "{first} reads mail at {email}."),
    "employer": ("{first} works as {job} at {company}.", "{first} is employed by {company} as {job}.",
                 "Employer: {company} ({job})."),
}
# "{secret}" splits each canary sentence into the end of the prefix and the start of the rest;
# the prefix ends in a space and the rest in a period, never in a digit.
_CANARIES = (
    "{first}'s account PIN is {secret}.",
    "The door code for {first}'s building is {secret}.",
    "{first} set the voicemail PIN to {secret}.",
    "{first}'s locker combination is {secret}.",
    "The security code on {first}'s card is {secret}.",
    "{first}'s alarm code is {secret}.",
)


def _format_dob(day: date, style: int) -> str:
    if style == 0:
        return f"{_MONTHS[day.month - 1]} {day.day}, {day.year}"
    if style == 1:
        return day.isoformat()
    return f"{day.month:02d}/{day.day:02d}/{day.year}"


def _with_article(job: str) -> str:
    return ("an " if job[:1].lower() in "aeiou" else "a ") + job.lower()


def _records(n: int, seed: int, secret_length: int) -> list[tuple[str, Canary]]:
    """``n`` (text, canary) pairs. Record ``i`` depends only on ``seed`` and ``i``'s position in
    the stream, so a smaller corpus's records are a prefix of a larger one's."""
    from faker import Faker  # imported here: Faker takes a while to import

    fake = Faker("en_US")
    fake.seed_instance(seed)
    # Separate streams: template choices, secrets. Strings seed `random` through SHA-512, so
    # this is the same in every process and Python build.
    rng = random.Random(f"gradstore-records:{seed}")
    secret_rng = random.Random(f"gradstore-secrets:{seed}")
    first_day, n_days = date(1940, 1, 1), (date(2005, 12, 31) - date(1940, 1, 1)).days
    out = []
    for _ in range(n):
        first, last = fake.first_name(), fake.last_name()
        user = "".join(ch for ch in f"{first}.{last}".lower() if ch.isalnum() or ch == ".")
        # Faker's own date_of_birth() is relative to today; ours must not change over time.
        dob = first_day + timedelta(days=rng.randrange(n_days + 1))
        fields = {
            "first": first, "full": f"{first} {last}",
            "dob": _format_dob(dob, rng.randrange(3)),
            "address": fake.address().replace("\n", ", "),
            "phone": fake.phone_number(),
            "email": f"{user}@{fake.free_email_domain()}",
            "company": fake.company(), "job": _with_article(fake.job()),
        }
        sentences = [rng.choice(options).format(**fields) for options in _FACTS.values()]
        rng.shuffle(sentences)
        # The canary goes anywhere after the introduction, so prefixes vary in length.
        position = rng.randrange(len(sentences) + 1)
        before_secret, after_secret = rng.choice(_CANARIES).format(**fields, secret="\0").split("\0")
        secret = "".join(secret_rng.choice(DIGITS) for _ in range(secret_length))
        head = " ".join([rng.choice(_INTROS).format(**fields), *sentences[:position], before_secret])
        tail = " ".join([after_secret, *sentences[position:]])
        canary = Canary(prefix=head, secret=secret, length=secret_length)
        out.append((head + secret + tail, canary))
    return out


# --------------------------------------------------------------------------------------------
# Corpus building


@dataclass(frozen=True)
class CorpusSize:
    """A named corpus size, plus matching tokenizer and sequence sizes for the trainer."""

    n_docs: int | None  # None: every stdlib docstring
    n_records: int
    max_chars: int | None  # docs are cut to this many characters
    vocab_size: int  # for train_tokenizer
    max_tokens: int  # for encode_documents: longest training sequence, eos included


CORPUS_SIZES: dict[str, CorpusSize] = {
    # Small enough for a tiny GPT-2 to train on in about two minutes on a 2-core CPU.
    "tiny": CorpusSize(n_docs=300, n_records=300, max_chars=600, vocab_size=2048, max_tokens=192),
    "small": CorpusSize(n_docs=2000, n_records=2000, max_chars=1500, vocab_size=8192, max_tokens=512),
    # For a GPT-2-small-sized model on a GPU.
    "gpt2": CorpusSize(n_docs=None, n_records=10000, max_chars=4000, vocab_size=16384, max_tokens=1024),
}


def build_corpus(
    n_docs: int | None,
    n_records: int,
    *,
    secret_length: int = 4,
    seed: int = 0,
    forget_fraction: float = 0.1,
    holdout_fraction: float = 0.2,
    eval_fraction: float = 0.1,
    max_chars: int | None = None,
) -> Corpus:
    """Build the built-in corpus: ``n_docs`` stdlib docstrings and ``n_records`` records.

    Docs (``None``: all of them) are chosen by a hash of their ID, so a smaller corpus's docs
    are a subset of a larger one's, and split into ``eval`` (about ``eval_fraction``) and
    ``train`` by another hash of the ID; ``max_chars`` cuts them at a word boundary. The
    ``seed`` drives the records only: their content, secrets (each ``secret_length`` digits)
    and split. Exactly ``round(n_records * forget_fraction)`` records are ``forget`` and
    ``round(n_records * holdout_fraction)`` are ``holdout``; the rest are ``retain``.
    """
    if (n_docs is not None and n_docs < 0) or n_records < 0:
        raise ValueError("n_docs and n_records must be non-negative")
    if secret_length < 1:
        raise ValueError("secret_length must be at least 1")
    if max_chars is not None and max_chars < 1:
        raise ValueError("max_chars must be positive or None")
    for name, value in (("forget_fraction", forget_fraction), ("holdout_fraction", holdout_fraction),
                        ("eval_fraction", eval_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    n_forget, n_holdout = round(n_records * forget_fraction), round(n_records * holdout_fraction)
    if n_forget + n_holdout > n_records:
        raise ValueError("forget_fraction + holdout_fraction must not exceed 1")

    documents = _select_docs(n_docs, max_chars, eval_fraction)

    order = list(range(n_records))
    random.Random(f"gradstore-splits:{seed}").shuffle(order)
    record_split = dict.fromkeys(order[:n_forget], "forget")
    record_split.update(dict.fromkeys(order[n_forget : n_forget + n_holdout], "holdout"))
    width = max(6, len(str(max(n_records - 1, 0))))
    for i, (text, canary) in enumerate(_records(n_records, seed, secret_length)):
        documents.append(Document(id=f"rec-{i:0{width}d}", text=text, kind="record",
                                  split=record_split.get(i, "retain"), canary=canary))

    config = {
        "n_docs": n_docs, "n_records": n_records, "secret_length": secret_length, "seed": seed,
        "forget_fraction": forget_fraction, "holdout_fraction": holdout_fraction,
        "eval_fraction": eval_fraction, "max_chars": max_chars,
        # The docs depend on the Python version and the records on Faker's: record both.
        "python": ".".join(map(str, sys.version_info[:3])), "faker": _faker_version(),
    }
    return Corpus(tuple(documents), config)


def _select_docs(n_docs: int | None, max_chars: int | None, eval_fraction: float) -> list[Document]:
    """The first ``n_docs`` docstrings in hash order, kept in source order, cut and split."""
    available = stdlib_docstrings()
    if n_docs is not None and n_docs > len(available):
        raise ValueError(f"n_docs={n_docs}, but the standard library has only {len(available)} usable docstrings")
    ranked = sorted(range(len(available)), key=lambda i: _unit_hash("select", available[i][0]))
    # Two docstrings may only differ after the cut: a duplicate is passed over and the next in hash order taken,
    # so that n_docs are returned whenever that many distinct texts exist.
    chosen, seen_texts = [], set()
    for i in ranked:
        if n_docs is not None and len(chosen) == n_docs:
            break
        text = _truncate(available[i][1], max_chars)
        if text not in seen_texts:
            seen_texts.add(text)
            chosen.append((i, text))
    if n_docs is not None and len(chosen) < n_docs:
        raise ValueError(f"n_docs={n_docs}, but only {len(chosen)} docstrings remain distinct when cut to "
                         f"{max_chars} characters")
    documents = []
    for i, text in sorted(chosen):  # kept in source order
        doc_id = available[i][0]
        split = "eval" if _unit_hash("split", doc_id) < eval_fraction else "train"
        documents.append(Document(id=doc_id, text=text, kind="doc", split=split))
    return documents


def _faker_version() -> str:
    from importlib.metadata import version

    return version("faker")


def build_corpus_preset(size: str | CorpusSize, *, seed: int = 0, secret_length: int = 4) -> Corpus:
    """:func:`build_corpus` with the sizes of a :data:`CORPUS_SIZES` preset (or a given size)."""
    preset = CORPUS_SIZES[size] if isinstance(size, str) else size
    corpus = build_corpus(preset.n_docs, preset.n_records, max_chars=preset.max_chars,
                          seed=seed, secret_length=secret_length)
    if isinstance(size, str):
        return Corpus(corpus.documents, {**corpus.config, "preset": size})
    return corpus


# --------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(
    texts: Iterable[str | Document], vocab_size: int = 8192, *, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for ``transformers``.

    Train it on the training documents only (``corpus.train_documents()``), so the holdout
    records do not shape the vocabulary. Digits are split one per token before BPE, so no
    merge ever contains a digit: secrets cannot leak through the vocabulary, and
    ``tok(prefix) + tok(secret) == tok(prefix + secret)`` for every canary.

    Returns a ``transformers.PreTrainedTokenizerFast`` with ``<|endoftext|>`` as bos/eos and
    ``<|pad|>`` as pad; it adds no special tokens when encoding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + 2:
        raise ValueError("vocab_size must cover the 256 bytes and 2 special tokens")
    tokenizer = Tokenizer(models.BPE())
    # Digits first: once each digit is its own piece, ByteLevel's regex cannot glue a space
    # or a neighbouring digit onto it, whatever surrounds the secret.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN, PAD_TOKEN],
        # Every byte, seen or not, so any text can be encoded without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator((t.text if isinstance(t, Document) else t for t in texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS_TOKEN,
                                   eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | os.PathLike[str]) -> Path:
    """Save with ``save_pretrained``; returns the directory."""
    tokenizer.save_pretrained(str(directory))
    return Path(directory)


def load_tokenizer(directory: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by :func:`save_tokenizer` (or any ``save_pretrained`` directory)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def check_canary_tokenization(tokenizer: PreTrainedTokenizerFast, documents: Iterable[Document]) -> None:
    """Raise ``ValueError`` unless every canary tokenizes the way exposure measurement needs:
    the secret is ``length`` tokens, one per character, and the text's tokens start with the
    prefix's tokens followed by the secret's."""
    for doc in documents:
        c = doc.canary
        if c is None:
            continue
        prefix = tokenizer(c.prefix, add_special_tokens=False).input_ids
        secret = tokenizer(c.secret, add_special_tokens=False).input_ids
        full = tokenizer(doc.text, add_special_tokens=False).input_ids
        if len(secret) != c.length:
            raise ValueError(f"{doc.id!r}: secret {c.secret!r} is {len(secret)} tokens, not {c.length}")
        if full[: len(prefix) + len(secret)] != prefix + secret:
            raise ValueError(f"{doc.id!r}: the prefix and secret tokenize differently inside the text")


def encode_documents(
    tokenizer: PreTrainedTokenizerFast, documents: Iterable[Document | str], max_length: int, *,
    report_cuts: bool = True,
) -> list[list[int]]:
    """Token IDs per document: the text's tokens cut to ``max_length - 1``, then eos.

    Every sequence ends in eos and has at most ``max_length`` tokens. How many documents were cut is logged
    as a warning unless ``report_cuts`` is False (a corpus built to be cut, like the demo's).
    """
    if max_length < 2:
        raise ValueError("max_length must be at least 2 (one token and the eos)")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token")
    texts = [d.text if isinstance(d, Document) else d for d in documents]
    if not texts:
        return []
    empty = [i for i, text in enumerate(texts) if not isinstance(text, str) or not text.strip()]
    if empty:
        raise ValueError(f"document {empty[0]} has no text to encode"
                         + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""))
    encoded = tokenizer(texts, add_special_tokens=False).input_ids
    cut = sum(len(ids) > max_length - 1 for ids in encoded)
    if cut and report_cuts:
        # Not silent: what is cut is never trained on or captured, so it cannot be forgotten or explained.
        log.warning("%d of %d documents are longer than %d tokens and were cut to fit the model's context (the "
                    "rest of each is neither trained on nor captured)", cut, len(texts), max_length - 1)
    return [[*ids[: max_length - 1], eos] for ids in encoded]


# --------------------------------------------------------------------------------------------
# JSONL files


def _write_jsonl(path: Path, documents: Iterable[Document]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for doc in documents:
            f.write(json.dumps(doc.to_json(), ensure_ascii=False) + "\n")


def write_corpus(corpus: Corpus, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``corpus.jsonl`` (every document), one JSONL per split and ``corpus.json``.

    The split files are ``forget``, ``retain``, ``holdout`` and ``eval.jsonl``, and
    ``train.jsonl`` -- the whole *training set* (docs ``train`` + records ``forget`` +
    ``retain``), so that ``gradstore train --data DIR/train.jsonl`` trains on the right
    documents. Every line carries id, text, kind, split and canary, so each file can be read
    with :func:`read_corpus` or :func:`read_user_jsonl`. Returns the written paths by name.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"corpus": out / "corpus.jsonl"}
    _write_jsonl(paths["corpus"], corpus.documents)
    paths["train"] = out / "train.jsonl"
    _write_jsonl(paths["train"], corpus.train_documents())
    for name in ("forget", "retain", "holdout", "eval"):
        paths[name] = out / f"{name}.jsonl"
        _write_jsonl(paths[name], corpus.split(name))
    summary = {
        "format": CORPUS_FORMAT,
        "documents": len(corpus),
        "splits": corpus.split_counts(),
        "train_documents": len(corpus.train_documents()),
        "files": {name: path.name for name, path in paths.items()},
        "sha256": hashlib.sha256(paths["corpus"].read_bytes()).hexdigest(),
        "config": dict(corpus.config),
    }
    paths["summary"] = out / "corpus.json"
    paths["summary"].write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return paths


def _json_lines(path: Path) -> Iterator[tuple[int, object | None, str | None]]:
    """``(line number, decoded value, problem)`` for each non-blank line of a JSONL file."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, None, f"not valid UTF-8 (byte {exc.start + 1})"
                continue
            if number == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
            if not line.strip():
                continue
            try:
                yield number, json.loads(line, object_pairs_hook=_object_without_repeated_keys), None
            except json.JSONDecodeError as exc:
                yield number, None, f"invalid JSON: {exc.msg} (column {exc.colno})"
            except _RepeatedKey as exc:
                yield number, None, f"the key {exc.args[0]!r} appears twice in one object"
            except (ValueError, RecursionError) as exc:  # a number of > 4300 digits; nesting too deep to parse
                yield number, None, f"invalid JSON: {str(exc).splitlines()[0][:120]}"


class _RepeatedKey(ValueError):
    pass


def _object_without_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a repeated key: `{"id": 1, ..., "id": 2}` silently kept the last one."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKey(key)
        out[key] = value
    return out


def read_corpus(path: str | os.PathLike[str]) -> Corpus:
    """Read a corpus written by :func:`write_corpus`: its directory (``corpus.jsonl`` and, if
    present, the ``config`` of ``corpus.json``) or any of its JSONL files."""
    path = Path(path)
    config: dict[str, Any] = {}
    if path.is_dir():
        summary = path / "corpus.json"
        if summary.exists():
            config = json.loads(summary.read_text(encoding="utf-8")).get("config", {})
        path = path / "corpus.jsonl"
    problems: list[tuple[int | None, str]] = []
    documents: list[Document] = []
    first_line: dict[str, int] = {}
    for number, obj, problem in _json_lines(path):
        if problem is None:
            try:
                doc = Document.from_json(obj)
            except ValueError as exc:
                problem = str(exc)
        if problem is not None:
            problems.append((number, problem))
            continue
        key = _id_key(doc.id)
        if key in first_line:
            problems.append((number, f"duplicate id {doc.id!r} (first on line {first_line[key]})"))
            continue
        first_line[key] = number
        documents.append(doc)
    if problems:
        raise CorpusError(path, problems)
    return Corpus(tuple(documents), config)


def read_user_jsonl(path: str | os.PathLike[str]) -> list[Document]:
    """Read a user's corpus: one ``{"id": ..., "text": ...}`` object per line.

    ``id`` is a string or a non-negative integer (integers stay integers) of at most
    :data:`MAX_ID_BYTES` bytes; ``text`` a non-empty string. Other fields are ignored, so the
    files of :func:`write_corpus` are accepted too. Blank lines are skipped. Every bad line and
    every repeated ID (``7`` and ``"7"`` count as the same) is collected and reported together
    in one :class:`CorpusError`, with 1-based line numbers. The documents are ``kind="doc"``,
    ``split="train"``.
    """
    path = Path(path)
    problems: list[tuple[int | None, str]] = []
    documents: list[Document] = []
    first_line: dict[str, int] = {}
    for number, obj, problem in _json_lines(path):
        if problem is None:
            problem = _user_line_problem(obj)
        if problem is not None:
            problems.append((number, problem))
            continue
        assert isinstance(obj, dict)
        key = _id_key(obj["id"])
        if key in first_line:
            problems.append((number, f"duplicate id {obj['id']!r} (first on line {first_line[key]})"))
            continue
        first_line[key] = number
        documents.append(Document(id=obj["id"], text=obj["text"]))
    if not documents and not problems:
        problems.append((None, "no documents (the file is empty)"))
    if problems:
        raise CorpusError(path, problems)
    return documents


def _user_line_problem(obj: object) -> str | None:
    """What is wrong with one decoded line of a user file, or ``None``."""
    if not isinstance(obj, dict):
        return f"expected a JSON object with 'id' and 'text', got {_json_type(obj)}"
    if "id" not in obj:
        return "missing 'id'"
    problem = _id_problem(obj["id"])
    if problem:
        return problem
    if "text" not in obj:
        return "missing 'text'"
    if not isinstance(obj["text"], str):
        return f"'text' must be a string, not {_json_type(obj['text'])}"
    if not obj["text"].strip():
        return "'text' is empty"
    if not _is_utf8(obj["text"]):
        return "'text' contains an unpaired surrogate escape"
    return None
