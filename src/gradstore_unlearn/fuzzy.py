"""Fuzzy matching: which stored examples match a text ("forget everything that looks like this").

Examples are compared by sets of token n-grams (shingles) of their stored token sequences. Two indexes:

- `ShingleIndex` (default): an inverted index shingle -> examples with prefix filtering. A match at Jaccard
  or containment >= t shares at least ceil(t * |Q|) of the query's |Q| shingles, so it must hold one of the
  query's |Q| - ceil(t * |Q|) + 1 *rarest* shingles (pigeonhole): only those postings are read, and the
  candidates get their exact similarity. Exact, and fast even when every record shares a template: the
  template's shingles are the common ones, never read (measured: 10^5 templated records, 336 ms per query
  reading every shared posting, well under a millisecond with the prefix; benchmarks/fuzzy_scaling.py).
- `MinHashIndex`: MinHash signatures with LSH banding. Approximate (a pair of Jaccard similarity J becomes a
  candidate with probability 1 - (1 - J^r)^b), but its cost per query does not depend on how common the
  query's shingles are; candidates are then verified exactly, so it never reports a false match, only may
  miss one near the threshold.

benchmarks/fuzzy_scaling.py measures both on growing sets of sequences.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from gradstore import GradStore

DEFAULT_NGRAM = 3


def shingles(tokens: Sequence[int] | np.ndarray, n: int = DEFAULT_NGRAM) -> frozenset[int]:
    """The set of a sequence's token n-grams, each hashed to an int (a sequence shorter than n is one shingle)."""
    array = np.asarray(tokens, dtype=np.int64)
    if array.size == 0:
        return frozenset()
    if array.size < n:
        return frozenset([hash(tuple(array.tolist())) & 0xFFFF_FFFF_FFFF_FFFF])  # non-negative, like the others
    windows = np.lib.stride_tricks.sliding_window_view(array, n)
    # A polynomial rolling combination of the n token ids, vectorised (collisions are as rare as in a 64-bit hash).
    mixed = np.zeros(len(windows), dtype=np.uint64)
    for j in range(n):
        mixed = mixed * np.uint64(1_000_003) + windows[:, j].astype(np.uint64)
    return frozenset(mixed.tolist())


@dataclass(frozen=True)
class Match:
    """A stored example that matches a query: Jaccard |Q∩S|/|Q∪S| and containment |Q∩S|/|Q| of shingle sets."""

    id: int | str
    jaccard: float
    containment: float

    def score(self, metric: str) -> float:
        return self.jaccard if metric == "jaccard" else self.containment


METRICS = ("jaccard", "containment")


class _SequenceIndex:
    """What both indexes share: filling from a store, and turning overlaps into ranked matches."""

    def add(self, example_id: int | str, tokens: Sequence[int] | np.ndarray) -> None:
        raise NotImplementedError

    def add_store(self, store: GradStore, skip: Callable[[int | str], bool] | None = None) -> _SequenceIndex:
        """Index every stored example's token sequence (but those whose ID `skip` returns True for)."""
        for ids, sequences in store.iter_sequences():
            for example_id, tokens in zip(ids, sequences, strict=True):
                if skip is None or not skip(example_id):
                    self.add(example_id, tokens)
        return self

    @staticmethod
    def _ranked(candidates: Iterable[tuple[int | str, int, int]], query_size: int, threshold: float, metric: str,
                limit: int | None) -> list[Match]:
        """Matches from (id, common shingles, stored set size) triples, best first."""
        matches = []
        for example_id, common, size in candidates:
            match = Match(example_id, common / (query_size + size - common), common / query_size)
            if match.score(metric) >= threshold:
                matches.append(match)
        matches.sort(key=lambda m: (-m.score(metric), str(m.id)))
        return matches[:limit] if limit else matches


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")


class ShingleIndex(_SequenceIndex):
    """Exact similarity search through an inverted index of shingles, read rarest first (prefix filtering)."""

    def __init__(self, n: int = DEFAULT_NGRAM):
        self.n = n
        self._postings: dict[int, list[int]] = defaultdict(list)
        self._ids: list[int | str] = []
        self._sets: list[frozenset[int]] = []

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, example_id: int | str, tokens: Sequence[int] | np.ndarray) -> None:
        shingle_set = shingles(tokens, self.n)
        slot = len(self._ids)
        self._ids.append(example_id)
        self._sets.append(shingle_set)
        for s in shingle_set:
            self._postings[s].append(slot)

    def query(self, tokens: Sequence[int], threshold: float = 0.5, metric: str = "jaccard",
              limit: int | None = None) -> list[Match]:
        """Examples whose `metric` similarity to the query is >= threshold, best first."""
        _check_metric(metric)
        query = shingles(tokens, self.n)
        if not query:
            return []
        # Both metrics need |Q ∩ S| >= t|Q| (Jaccard: |Q ∩ S| >= t|Q ∪ S| >= t|Q|); at least one common shingle
        # even at t = 0, where "matching" still means sharing something. The epsilon keeps t|Q| = 19.0 at 19.
        need = max(1, math.ceil(threshold * len(query) - 1e-9))
        rarest = sorted(query, key=lambda s: len(self._postings.get(s, ())))[: max(len(query) - need + 1, 0)]
        slots: set[int] = set()
        for s in rarest:
            slots.update(self._postings.get(s, ()))
        candidates = ((self._ids[slot], len(query & self._sets[slot]), len(self._sets[slot])) for slot in slots)
        return self._ranked(candidates, len(query), threshold, metric, limit)


class MinHashIndex(_SequenceIndex):
    """Approximate Jaccard search: MinHash signatures (`bands` x `rows` hashes) bucketed by LSH bands.

    Candidates are verified with the exact Jaccard of their shingle sets, so reported similarities are exact.
    """

    _PRIME = (1 << 31) - 1  # a, x < p keep a*x + b below 2**63: exact in uint64

    def __init__(self, n: int = DEFAULT_NGRAM, bands: int = 32, rows: int = 4, seed: int = 0):
        self.n, self.bands, self.rows = n, bands, rows
        rng = np.random.default_rng(seed)
        size = bands * rows
        self._a = rng.integers(1, self._PRIME, size=size, dtype=np.uint64)
        self._b = rng.integers(0, self._PRIME, size=size, dtype=np.uint64)
        self._buckets: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(bands)]
        self._ids: list[int | str] = []
        self._sets: list[frozenset[int]] = []

    def __len__(self) -> int:
        return len(self._ids)

    def _signature(self, shingle_set: frozenset[int]) -> np.ndarray:
        values = np.fromiter(shingle_set, dtype=np.uint64, count=len(shingle_set)) % np.uint64(self._PRIME)
        # (a*x + b) mod p for every hash function and shingle: a universal hash family
        hashed = (self._a[:, None] * values[None, :] + self._b[:, None]) % np.uint64(self._PRIME)
        return hashed.min(axis=1)

    def _band_keys(self, signature: np.ndarray) -> Iterable[tuple[int, bytes]]:
        for band in range(self.bands):
            chunk = signature[band * self.rows : (band + 1) * self.rows]
            yield band, hashlib.blake2b(chunk.tobytes(), digest_size=8).digest()

    def add(self, example_id: int | str, tokens: Sequence[int] | np.ndarray) -> None:
        shingle_set = shingles(tokens, self.n)
        slot = len(self._ids)
        self._ids.append(example_id)
        self._sets.append(shingle_set)
        if not shingle_set:
            return
        for band, key in self._band_keys(self._signature(shingle_set)):
            self._buckets[band][key].append(slot)

    def query(self, tokens: Sequence[int], threshold: float = 0.5, metric: str = "jaccard",
              limit: int | None = None) -> list[Match]:
        """Candidates from the LSH buckets, verified exactly; those >= threshold, best first."""
        _check_metric(metric)
        query = shingles(tokens, self.n)
        if not query:
            return []
        slots: set[int] = set()
        for band, key in self._band_keys(self._signature(query)):
            slots.update(self._buckets[band].get(key, ()))
        candidates = ((self._ids[slot], len(query & self._sets[slot]), len(self._sets[slot])) for slot in slots)
        return self._ranked(candidates, len(query), threshold, metric, limit)
