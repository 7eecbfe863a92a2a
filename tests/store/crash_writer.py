"""Helper process for the crash tests: append examples in a loop, printing each ID once its append returned."""

from __future__ import annotations

import sys

import numpy as np
import torch

from gradstore import GradStore

DIM, VOCAB = 16, 200


def example(i: int) -> tuple[np.ndarray, torch.Tensor]:
    """The content of example i is a function of i, so a checker can verify it exactly."""
    rng = np.random.default_rng(i)
    k = int(rng.integers(0, 40))
    return rng.choice(VOCAB, size=k, replace=False), torch.from_numpy(rng.standard_normal((k, DIM)).astype(np.float32))


def main(uri: str, start: int, per_append: int) -> None:
    store = GradStore.open(uri)
    print("ready", flush=True)
    i = start
    with store.writer() as w:
        while True:
            ids = list(range(i, i + per_append))
            tokens, rows = zip(*(example(j) for j in ids), strict=True)
            w.append(ids, list(tokens), list(rows), [{"step": j} for j in ids])
            print(" ".join(map(str, ids)), flush=True)
            i += per_append


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
