"""Fuzzy matching at scale: the exact shingle index vs MinHash LSH, on growing sets of stored sequences.

    python benchmarks/fuzzy_scaling.py                       # 10^3, 10^4, 10^5 sequences (~2 minutes)
    python benchmarks/fuzzy_scaling.py --sizes 1000 10000    # quicker

Two kinds of stored sequences, because the exact index's cost depends on how common a query's shingles are:

- records: templated personal records ("Name: <first> <last>, born <date>, phone <digits> ...") — the template's
  shingles occur in every record, the personal parts are rare;
- prose: Zipf(1.1) token streams, where frequent n-grams are shared by many sequences.

Indexes: the exact shingle index (prefix filtering: only the query's rarest shingles' postings are read), the
same index reading every posting (the baseline), and MinHash LSH. Each query is a stored sequence with a few tokens changed (a paraphrase in an erasure request). Per size and index:
build seconds, query latency p50/p99, candidates verified per query, and recall of the planted sequence at
Jaccard >= 0.5 (the exact index finds it by construction when its Jaccard is >= 0.5; MinHash may miss it).
Prints a table and writes JSON to benchmarks/results/fuzzy_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from gradstore_unlearn.fuzzy import MinHashIndex, ShingleIndex, shingles

VOCAB = 8000
THRESHOLD = 0.5


def records(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Templated records: 24 fixed template tokens interleaved with 5 fields of 2-8 rare tokens each."""
    template = rng.choice(200, size=(6, 4), replace=False)  # 6 template pieces of 4 tokens
    out = []
    for _ in range(n):
        parts = [template[0]]
        for piece in template[1:]:
            parts.append(rng.integers(200, VOCAB, size=int(rng.integers(2, 9))))
            parts.append(piece)
        out.append(np.concatenate(parts))
    return out


def prose(n: int, rng: np.random.Generator, length: int = 64) -> list[np.ndarray]:
    ranks = np.arange(1, VOCAB + 1, dtype=np.float64)
    p = ranks ** -1.1
    p /= p.sum()
    return [rng.choice(VOCAB, size=length, p=p) for _ in range(n)]


def perturb(tokens: np.ndarray, rng: np.random.Generator, changes: int = 2) -> np.ndarray:
    out = tokens.copy()
    out[rng.choice(len(out), size=changes, replace=False)] = rng.integers(0, VOCAB, size=changes)
    return out


class EveryPostingIndex(ShingleIndex):
    """The baseline: the same exact index read without prefix filtering (every posting of every query shingle)."""

    def query(self, tokens, threshold=THRESHOLD, metric="jaccard", limit=None):
        query = shingles(tokens, self.n)
        overlap: dict[int, int] = {}
        for s in query:
            for slot in self._postings.get(s, ()):
                overlap[slot] = overlap.get(slot, 0) + 1
        candidates = ((self._ids[slot], common, len(self._sets[slot])) for slot, common in overlap.items())
        return self._ranked(candidates, len(query), threshold, metric, limit)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def measure(kind: str, n: int, queries: int, rng: np.random.Generator) -> list[dict]:
    sequences = records(n, rng) if kind == "records" else prose(n, rng)
    picks = rng.choice(n, size=queries, replace=False)
    probes = [(int(i), perturb(sequences[i], rng)) for i in picks]
    planted = [(i, q) for i, q in probes if jaccard(q, sequences[i]) >= THRESHOLD]
    results = []
    for name, index in (("exact", ShingleIndex()), ("exact, every posting", EveryPostingIndex()),
                        ("minhash", MinHashIndex())):
        start = time.perf_counter()
        for i, tokens in enumerate(sequences):
            index.add(i, tokens)
        build_s = time.perf_counter() - start
        times, found, matched = [], 0, []
        for i, query in planted:
            start = time.perf_counter()
            matches = index.query(query, THRESHOLD)
            times.append(time.perf_counter() - start)
            found += any(m.id == i for m in matches)
            matched.append(len(matches))
        ms = np.array(times) * 1e3
        results.append({"kind": kind, "sequences": n, "index": name, "build_s": build_s,
                        "query_p50_ms": float(np.percentile(ms, 50)), "query_p99_ms": float(np.percentile(ms, 99)),
                        "queries": len(planted), "recall": found / max(len(planted), 1),
                        "matches_per_query": float(np.mean(matched)) if matched else 0.0})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "fuzzy_scaling.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'kind':8} {'stored':>8} {'index':21} {'build s':>8} {'p50 ms':>8} {'p99 ms':>8} {'recall':>7} {'matches':>8}")
    for kind in ("records", "prose"):
        for n in args.sizes:
            for r in measure(kind, n, min(args.queries, n), rng):
                rows.append(r)
                print(f"{kind:8} {n:8d} {r['index']:21} {r['build_s']:8.2f} {r['query_p50_ms']:8.3f} "
                      f"{r['query_p99_ms']:8.3f} {r['recall']:7.3f} {r['matches_per_query']:8.1f}")
    result = {"benchmark": "fuzzy_scaling", "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                        "platform": platform.platform()},
              "threshold": THRESHOLD, "ngram": 3, "minhash": {"bands": 32, "rows": 4}, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
