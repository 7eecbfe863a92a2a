"""Erasure at the byte level: after `erase`, the erased examples' bytes occur in no file under the store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from gradstore import GradStore


def all_bytes(root: str) -> list[tuple[str, bytes]]:
    return [(str(p), p.read_bytes()) for p in Path(root).rglob("*") if p.is_file()]


def test_erased_rows_ids_and_metadata_leave_every_file(tmp_path):
    # Uncompressed, so that the raw bytes of rows would be findable if they were still anywhere.
    uri = str(tmp_path / "store")
    store = GradStore.create(uri, dim=16, vocab_size=500, dtype="float32", codec="none")
    rng = np.random.default_rng(0)
    secret_rows = torch.from_numpy(rng.standard_normal((5, 16)).astype(np.float32))
    with store.writer() as w:
        w.append(["alice-secret-id", "bob"], [[1, 2, 3, 4, 5], [6, 7]],
                 [secret_rows, torch.ones(2, 16)],
                 [{"tokens": [401, 402, 403], "note": "alice-private-note"}, {"tokens": [1, 2]}])
        w.append(["carol"], [[9]], [torch.ones(1, 16)])
    needles = [secret_rows[i].numpy().tobytes() for i in range(5)] + [b"alice-secret-id", b"alice-private-note"]
    assert any(n in data for _, data in all_bytes(uri) for n in needles)  # present before

    receipt = store.erase(["alice-secret-id"])
    assert receipt.erased == ["alice-secret-id"] and receipt.segments_rewritten == 1
    for path, data in all_bytes(uri):
        for needle in needles:
            assert needle not in data, f"erased bytes remain in {path}"
    # The tombstone holds only a salted hash, the time and the receipt id.
    (tombstone,) = (Path(uri) / "tombstones").iterdir()
    doc = json.loads(tombstone.read_text())
    assert set(doc) == {"hash", "erased_at", "receipt"} and doc["receipt"] == receipt.receipt_id
    assert doc["hash"] == store.id_hash("alice-secret-id") and len(doc["hash"]) == 64
    # The rest is intact, and erasing again is a no-op that reports it.
    reopened = GradStore.open(uri)
    assert sorted(reopened.ids()) == ["bob", "carol"]
    assert reopened.get("bob").meta == {"tokens": [1, 2]}
    again = reopened.erase(["alice-secret-id"])
    assert again.erased == [] and again.already_erased == ["alice-secret-id"]


def test_compressed_store_erasure_leaves_no_ids_and_no_rows_in_decoded_arrays(tmp_path):
    uri = str(tmp_path / "store")
    store = GradStore.create(uri, dim=8, vocab_size=100, dtype="bfloat16")
    rows = torch.arange(3 * 8, dtype=torch.float32).reshape(3, 8) + 1000
    with store.writer() as w:
        w.append(["x-erase-me", "y"], [[1, 2, 3], [4]], [rows, torch.zeros(1, 8)])
    store.erase(["x-erase-me"])
    for path, data in all_bytes(uri):
        assert b"x-erase-me" not in data, path
    import zarr

    group = zarr.open_group(uri, mode="r")
    for _, segment in group["segments"].groups():
        stored = segment["rows"][...].view(np.int16)
        erased = rows.to(torch.bfloat16).view(torch.int16).numpy()
        assert not any((stored == r).all(axis=1).any() for r in erased)


def test_erasing_every_example_of_a_segment_removes_it(tmp_path):
    uri = str(tmp_path / "store")
    store = GradStore.create(uri, dim=4, vocab_size=10, dtype="float32")
    with store.writer() as w:
        w.append([1, 2], [[1], [2]], [torch.ones(1, 4)] * 2)
        w.append([3], [[3]], [torch.ones(1, 4)])
    store.erase([1, 2])
    assert GradStore.open(uri).stats().segments == 1
    assert len([p for p in (Path(uri) / "segments").iterdir() if p.is_dir()]) == 1
