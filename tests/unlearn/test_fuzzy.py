"""Fuzzy matching: the exact index (prefix-filtered) equals brute force; MinHash never reports a false match."""

from __future__ import annotations

import random

import pytest

from gradstore_unlearn.fuzzy import MinHashIndex, ShingleIndex, shingles


def brute_force(stored: dict[str, list[int]], query: list[int], threshold: float, metric: str) -> dict[str, float]:
    q = shingles(query)
    out = {}
    for example_id, tokens in stored.items():
        s = shingles(tokens)
        common = len(q & s)
        if not common:
            continue
        score = common / len(q | s) if metric == "jaccard" else common / len(q)
        if score >= threshold:
            out[example_id] = score
    return out


def corpus(rng: random.Random, n: int) -> dict[str, list[int]]:
    """Templated sequences (a shared skeleton, the same in most) with short random fields, and a few free ones."""
    template = [1, 2, 3, 4]
    stored = {}
    for i in range(n):
        if i % 5 == 0:
            stored[f"free-{i}"] = [rng.randrange(30) for _ in range(rng.randrange(0, 12))]
        else:
            fields = [[rng.randrange(5, 40) for _ in range(rng.randrange(1, 4))] for _ in range(3)]
            stored[f"rec-{i}"] = template + fields[0] + template + fields[1] + template + fields[2]
    return stored


@pytest.mark.parametrize("metric", ["jaccard", "containment"])
def test_prefix_filtered_index_equals_brute_force(metric):
    rng = random.Random(7)
    stored = corpus(rng, 300)
    index = ShingleIndex()
    for example_id, tokens in stored.items():
        index.add(example_id, tokens)
    queries = [*list(stored.values())[:40], *([rng.randrange(40) for _ in range(rng.randrange(1, 20))]
                                            for _ in range(40))]
    for query in queries:
        for threshold in (0.0, 0.1, 0.34, 0.5, 0.75, 1.0):
            got = {m.id: m.score(metric) for m in index.query(query, threshold, metric)}
            assert got == pytest.approx(brute_force(stored, query, threshold, metric)), (query, threshold)


def test_minhash_reports_only_true_matches_and_finds_near_duplicates():
    rng = random.Random(3)
    stored = corpus(rng, 300)
    index = MinHashIndex()
    for example_id, tokens in stored.items():
        index.add(example_id, tokens)
    for example_id, tokens in list(stored.items())[1:60:5]:  # records, not the free sequences
        truth = brute_force(stored, tokens, 0.5, "jaccard")
        got = {m.id: m.jaccard for m in index.query(tokens, 0.5)}
        assert set(got) <= set(truth) and example_id in got
        assert all(got[i] == pytest.approx(truth[i]) for i in got)
