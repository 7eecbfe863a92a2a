"""Bad input gets a clear error naming the problem, and nothing already committed is touched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gradstore import (
    DuplicateIdError,
    FormatVersionError,
    GradStore,
    InvalidInputError,
    NotAStoreError,
    StoreNotFoundError,
)


@pytest.fixture
def store(tmp_path):
    s = GradStore.create(tmp_path / "s", dim=4, vocab_size=10, dtype="bfloat16", model_id="m")
    with s.writer() as w:
        w.append(["keep"], [[1, 2]], [torch.ones(2, 4)])
    return s


def snapshot(store):
    return sorted(p.relative_to(store.uri).as_posix() for p in Path(store.uri).rglob("*") if p.is_file())


@pytest.mark.parametrize(
    ("ids", "token_ids", "rows", "message"),
    [
        (["a"], [[1, 2]], [torch.ones(2, 5)], r"rows must have shape \[k, 4\], got \(2, 5\)"),
        (["a"], [[1, 2]], [torch.ones(2)], r"rows must have shape \[k, 4\]"),
        (["a"], [[1, 2]], [torch.ones(2, 4, dtype=torch.int64)], "rows must be floating point"),
        (["a"], [[1, 2]], [np.ones((2, 4), dtype=np.int32)], "rows must be floating point"),
        (["a"], [[1, 2]], [[[1.0] * 4] * 2], "rows must be a torch.Tensor or numpy array"),
        (["a"], [[1]], [np.ones((1, 4), dtype=np.longdouble)], f"rows dtype {np.dtype(np.longdouble)} is not supported"),
        (["a"], [[1]], [torch.ones(1, 4, device="meta")], "rows is a meta tensor"),
        (["a", "b"], [[1]], [torch.ones(1, 4)], "lengths differ: 2 ids, 1 token_ids, 1 rows"),
        (["a"], [[1, 2, 3]], [torch.ones(2, 4)], "3 token ids but 2 rows"),
        (["a"], [[1, 2]], [torch.tensor([[0.0, 1, 2, 3], [0, float("nan"), 0, 0]])], "row 1 holds NaN or Inf"),
        (["a"], [[1]], [torch.tensor([[0.0, float("inf"), 0, 0]])], "row 0 holds NaN or Inf"),
        (["a"], [[1, 10]], [torch.ones(2, 4)], r"token id 10 is out of range \[0, 10\)"),
        (["a"], [[-1]], [torch.ones(1, 4)], r"token id -1 is out of range"),
        (["a"], [[1.5]], [torch.ones(1, 4)], "token_ids must be integers"),
        (["a"], [[3, 3]], [torch.ones(2, 4)], "token_ids repeat"),
        ([-1], [[1]], [torch.ones(1, 4)], r"integer ID -1 is out of range"),
        ([True], [[1]], [torch.ones(1, 4)], "is a bool"),
        ([1.0], [[1]], [torch.ones(1, 4)], "has type float"),
        (["x" * 257], [[1]], [torch.ones(1, 4)], "257 UTF-8 bytes"),
        ([""], [[1]], [torch.ones(1, 4)], "empty"),
        (["\ud800"], [[1]], [torch.ones(1, 4)], r"string ID '\\ud800' is not valid Unicode"),
        (["a", "a"], [[1], [2]], [torch.ones(1, 4)] * 2, "duplicate ID 'a': already in this append call"),
        (["keep"], [[1]], [torch.ones(1, 4)], "duplicate ID 'keep'"),
        ("abc", [[1]], [torch.ones(1, 4)], "single string"),
    ],
)
def test_bad_append_is_refused_and_changes_nothing(store, ids, token_ids, rows, message):
    before = snapshot(store)
    with store.writer() as w, pytest.raises(InvalidInputError, match=message):
        w.append(ids, token_ids, rows)
    assert snapshot(store) == before
    reopened = GradStore.open(store.uri)
    assert reopened.ids() == ["keep"]
    assert torch.equal(reopened.get("keep").rows.float(), torch.ones(2, 4))


def test_bad_metadata_is_refused(store):
    with store.writer() as w:
        with pytest.raises(InvalidInputError, match="not JSON-serialisable"):
            w.append(["a"], [[1]], [torch.ones(1, 4)], [{"x": object()}])
        with pytest.raises(InvalidInputError, match="not JSON-serialisable"):
            w.append(["a"], [[1]], [torch.ones(1, 4)], [{"x": float("nan")}])
        with pytest.raises(InvalidInputError, match=r"meta\['tokens'\] holds ids outside"):
            w.append(["a"], [[1]], [torch.ones(1, 4)], [{"tokens": [1, 99]}])
        with pytest.raises(InvalidInputError, match="meta must be a dict"):
            w.append(["a"], [[1]], [torch.ones(1, 4)], ["loss=1"])
    assert GradStore.open(store.uri).ids() == ["keep"]


@pytest.mark.parametrize("tokens", [
    [2**32 + 5],  # wrapped to 5 by a cast to int32 before the range check
    np.array([2**63 + 7], dtype=np.uint64),
    np.array([2**31], dtype=np.int64),
    torch.tensor([-(2**32) + 3]),
])
def test_meta_tokens_are_range_checked_before_the_cast_to_int32(store, tokens):
    bad = int(np.asarray(tokens)[0])
    with store.writer() as w, pytest.raises(InvalidInputError, match=rf"meta\['tokens'\] holds ids outside \[0, 10\): {bad}"):
        w.append(["a"], [[1]], [torch.ones(1, 4)], [{"tokens": tokens}])
    assert GradStore.open(store.uri).ids() == ["keep"]


def test_a_lone_surrogate_id_is_not_in_the_store(store):
    assert "\ud800" not in store
    with pytest.raises(InvalidInputError, match="not valid Unicode"):
        store.get("\ud800")


@pytest.mark.parametrize("rows", [
    np.full((2, 4), 1.5, dtype=">f4"),  # big-endian: converted to native
    np.full((2, 4), 1.5, dtype=">f8"),
    torch.full((2, 4), 1.5).to_sparse(),  # sparse (COO; CSR alike): densified
])
def test_big_endian_and_sparse_rows_are_stored_as_their_values(tmp_path, rows):
    s = GradStore.create(tmp_path / "s", dim=4, vocab_size=10, dtype="float32")
    with s.writer() as w:
        w.append(["x"], [[1, 2]], [rows])
    assert torch.equal(GradStore.open(s.uri).get("x").rows, torch.full((2, 4), 1.5))


@pytest.mark.parametrize("buffer_bytes", [None, -1, 1.5, "1024", True])
def test_writer_buffer_bytes_must_be_a_non_negative_integer(store, buffer_bytes):
    with pytest.raises(InvalidInputError, match="buffer_bytes must be a non-negative integer"):
        store.writer(buffer_bytes=buffer_bytes)


def test_duplicate_is_error_unless_replace(store):
    with store.writer() as w, pytest.raises(DuplicateIdError, match="'keep'") as info:
        w.append(["keep"], [[3]], [torch.ones(1, 4)])
    assert info.value.example_id == "keep"
    with store.writer() as w:
        w.append(["keep"], [[3]], [2 * torch.ones(1, 4)], replace=True)
    reopened = GradStore.open(store.uri)
    assert reopened.get("keep").token_ids.tolist() == [3]
    assert reopened.stats().shadowed_copies == 0 and reopened.stats().segments == 1  # the old copy is gone


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 0}, "dim must be a positive integer"),
        ({"vocab_size": -3}, "vocab_size must be a positive integer"),
        ({"dtype": "float16"}, "unsupported dtype 'float16'"),
        ({"codec": "lz4"}, "unknown codec 'lz4'"),
        ({"chunk_rows": 48, "shard_rows": 100}, "must be a multiple of chunk_rows"),
        ({"capture_policy": "sometimes"}, "unknown capture policy"),
    ],
)
def test_create_validates_configuration(tmp_path, kwargs, message):
    args = {"dim": 4, "vocab_size": 10, **kwargs}
    with pytest.raises(InvalidInputError, match=message):
        GradStore.create(tmp_path / "s", **args)
    assert not (tmp_path / "s" / "gradstore.json").exists()


def test_open_missing_path_and_non_store(tmp_path):
    with pytest.raises(StoreNotFoundError, match="no store at"):
        GradStore.open(tmp_path / "nothing-here")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hello")
    with pytest.raises(NotAStoreError, match="is not a gradstore"):
        GradStore.open(tmp_path / "other")
    with pytest.raises(NotAStoreError, match="not empty"):
        GradStore.create(tmp_path / "other", dim=4, vocab_size=10)
    (tmp_path / "other" / "gradstore.json").write_text('{"format": "something-else"}')
    with pytest.raises(NotAStoreError, match="does not describe a gradstore"):
        GradStore.open(tmp_path / "other")


def test_a_regular_file_is_not_a_store(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(NotAStoreError, match=f"{path} is a file, not a directory"):
        GradStore.open(path)
    with pytest.raises(NotAStoreError, match=f"{path} is a file, not a directory"):
        GradStore.create(path, dim=4, vocab_size=10)
    with pytest.raises(NotAStoreError, match=f"{path / 'store'} lies under {path}, which is a file"):
        GradStore.create(path / "store", dim=4, vocab_size=10)
    assert path.read_text() == "hello"


def test_newer_format_is_refused_with_a_clear_error(store):
    path = Path(store.uri) / "gradstore.json"
    doc = json.loads(path.read_text())
    doc["format_version"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(FormatVersionError, match="format version 99, newer than this gradstore supports"):
        GradStore.open(store.uri)


def test_creating_over_an_existing_store_is_refused(store):
    with pytest.raises(InvalidInputError, match="already exists"):
        GradStore.create(store.uri, dim=4, vocab_size=10)
    assert GradStore.open(store.uri).ids() == ["keep"]


def test_unsupported_uri_scheme(tmp_path):
    with pytest.raises(InvalidInputError, match="unsupported store URI"):
        GradStore.create("gs://bucket/x", dim=4, vocab_size=10)


def test_read_only_store_refuses_mutations(store):
    ro = GradStore.open(store.uri, read_only=True)
    with pytest.raises(Exception, match="read-only"):
        ro.writer()
    with pytest.raises(Exception, match="read-only"):
        ro.erase(["keep"])
