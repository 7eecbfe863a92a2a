"""Distributed training: 2 CPU processes (gloo) under torchrun; the store holds every example exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ddp_worker import DATA
from tiny_models import VOCAB

from gradstore import GradStore


def test_two_ranks_write_their_own_segments(tmp_path):
    uri = str(tmp_path / "store")
    GradStore.create(uri, dim=32, vocab_size=VOCAB, dtype="float32")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(Path(__file__).parent / "ddp_worker.py"), uri, str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    captured = sorted(json.loads(p.read_text())["captured"] for p in tmp_path.glob("rank*.json"))
    assert len(captured) == 2 and sum(captured) >= len(DATA)  # a padded repeat may be captured twice...
    store = GradStore.open(uri)
    ids = store.ids()
    assert sorted(ids) == sorted(x["id"] for x in DATA) and len(ids) == len(set(ids))
    assert store.stats().shadowed_copies == 0  # ...and the extra copy was removed when capture closed
    writers = {json.loads(p.read_text())["writer"] for p in (Path(uri) / "manifests").iterdir()}
    ranks = {w.split("-")[0] for w in writers} - {"rewrite"}  # writer names: rank<r>-w<thread>; rewrite: a dedup
    assert ranks <= {"rank0", "rank1"} and min(captured) > 0
    for x in DATA:
        assert store.get(x["id"]).meta["tokens"] == x["input_ids"]


def test_a_rank_whose_writer_fails_raises_its_own_error_at_once(tmp_path):
    """It must not wait at the closing barrier while the other rank is in training's all-reduce: that would
    end, after the process group's timeout (120 s here), in a timeout error with the real one buried."""
    uri = str(tmp_path / "store")
    GradStore.create(uri, dim=32, vocab_size=VOCAB, dtype="float32")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(Path(__file__).parent / "ddp_worker.py"), uri, str(tmp_path), "1"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "disk full on rank 1" in result.stderr and "Timed out" not in result.stderr, result.stderr[-3000:]
