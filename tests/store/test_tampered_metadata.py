"""Tampered or corrupted metadata (gradstore.json, manifests, the arrays' zarr.json) is a `FormatError` naming
the file and what is wrong, never silently reinterpreted bytes, a fresh salt, or a raw KeyError/ValueError."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gradstore import FormatError, GradStore
from gradstore._arrays import write_array
from gradstore._format import StoreConfig
from gradstore._objects import LocalObjects
from gradstore._segment import Manifest, SegmentReader


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One float32 store (dim 4) with one example: 2 rows, a 3-token sequence. Copied by each test."""
    uri = tmp_path_factory.mktemp("pristine") / "store"
    store = GradStore.create(uri, dim=4, vocab_size=100, dtype="float32", model_id="m")
    with store.writer() as w:
        w.append(["a"], [[1, 2]], [torch.full((2, 4), 1.5)], [{"tokens": [1, 2, 3]}])
    return uri


@pytest.fixture
def copy(pristine, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(pristine, dst)
    return dst


def edit_json(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def only(root: Path, pattern: str) -> Path:
    (path,) = root.glob(pattern)
    return path


# ------------------------------------------------------------------------------------------ gradstore.json
@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(id_salt="zz"), "id_salt must be 32 hex characters, got 'zz'"),
    (lambda d: d.update(id_salt=12), "id_salt must be 32 hex characters"),
    (lambda d: d.pop("id_salt"), "id_salt is missing"),
    (lambda d: d.update(capture="first"), "capture must be an object, got 'first'"),
    (lambda d: d.update(format_version=0), "format_version must be an integer >= 1, got 0"),
    (lambda d: d.update(format_version=-3), "format_version must be an integer >= 1, got -3"),
    (lambda d: d.update(format_version="1"), "format_version must be an integer >= 1, got '1'"),
    (lambda d: d.update(format_version=True), "format_version must be an integer >= 1, got True"),
    (lambda d: d.update(codec="blosc"), "codec must be an object"),
    (lambda d: d["codec"].update(level="3"), "codec level must be an integer"),
    (lambda d: d.update(created="today"), "created must be a time"),
    (lambda d: d.pop("dim"), "dim"),
])
def test_invalid_gradstore_json_is_a_format_error_naming_file_and_field(copy, change, message):
    edit_json(copy / "gradstore.json", change)
    with pytest.raises(FormatError, match="gradstore.json: .*" + message):
        GradStore.open(copy)


def test_a_missing_salt_is_refused_not_redrawn(copy):
    """A redrawn salt would make every tombstone unmatchable: erased IDs would read as never known."""
    store = GradStore.open(copy)
    store.erase(["a"])
    edit_json(copy / "gradstore.json", lambda d: d.pop("id_salt"))
    with pytest.raises(FormatError, match="id_salt is missing"):
        GradStore.open(copy)


def test_config_round_trips_and_keeps_its_salt():
    config = StoreConfig(dim=4, vocab_size=10, dtype="int8", model_id="m")
    again = StoreConfig.from_json(config.to_json(), "x")
    assert again == config and again.id_salt == config.id_salt


# ----------------------------------------------------------------------- arrays' zarr.json vs. the store
@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(dtype="bfloat16"), r"rows/zarr.json: array 'rows' is float32 .* should be uint16"),
    (lambda d: d.update(dim=8), r"rows/zarr.json: array 'rows' is float32 of shape \[2, 4\]; .* shape \[2, 8\]"),
])
def test_gradstore_json_disagreeing_with_the_arrays_is_refused_on_read(copy, change, message):
    edit_json(copy / "gradstore.json", change)
    store = GradStore.open(copy)
    with pytest.raises(FormatError, match=message):
        store.get("a")


ROWS = "segments/*/rows/zarr.json"


@pytest.mark.parametrize(("pattern", "text", "change", "message"), [
    (ROWS, "{not json", None, "unreadable array metadata .*JSONDecodeError"),
    (ROWS, "[1, 2]", None, "unreadable array metadata .*not an object"),
    (ROWS, "{}", None, "unreadable array metadata"),
    (ROWS, None, lambda d: d.pop("codecs"), r"unreadable array metadata \(KeyError: 'codecs'\)"),
    (ROWS, None, lambda d: d.update(zarr_format=2), "unreadable array metadata"),
    (ROWS, None, lambda d: d.update(shape=[2, 8]), r"array 'rows' is float32 of shape \[2, 8\]"),
    (ROWS, None, lambda d: d.update(shape=[1, 4]), r"array 'rows' is float32 of shape \[1, 4\].* shape \[2, "),
    (ROWS, None, lambda d: d.update(data_type="float64"), "array 'rows' is float64"),
    (ROWS, None, lambda d: d.update(data_type="int32"), "array 'rows' is int32"),
    ("segments/*/token_ids/zarr.json", None, lambda d: d.update(shape=[3]), r"array 'token_ids' is int32 of shape \[3\]"),
    ("segments/*/token_ids/zarr.json", None, lambda d: d.update(data_type="int64"), "array 'token_ids' is int64"),
])
def test_tampered_array_metadata_is_a_format_error_naming_the_array(copy, pattern, text, change, message):
    path = only(copy, pattern)
    if text is not None:
        path.write_text(text)
    else:
        edit_json(path, change)
    store = GradStore.open(copy)
    with pytest.raises(FormatError, match=message) as info:
        store.get("a")
    assert str(path.relative_to(copy)) in str(info.value)


def test_offsets_that_disagree_with_their_values_are_refused(copy):
    (segment,) = (copy / "segments").glob("*-*")
    # seq_tokens holds 3 ids; offsets claiming 5 would read past the end.
    write_array(LocalObjects(copy), f"segments/{segment.name}/seq_offsets", np.array([0, 5], np.int64), 1024, 1024,
                StoreConfig(dim=4, vocab_size=100, dtype="float32", model_id="m").codec)
    with pytest.raises(FormatError, match="seq_offsets must rise from 0 to 3"):
        GradStore.open(copy).get_sequences(["a"])


def test_the_reader_checks_rows_against_the_store_config_it_is_given(copy):
    """Reads into the caller's buffer are checked without a config; whole-segment reads (erasure rewrites,
    compaction) need the config."""
    objects = LocalObjects(copy)
    manifest_path = only(copy, "manifests/*.json")
    manifest = Manifest.from_json(manifest_path.read_bytes(), str(manifest_path))
    config = StoreConfig.from_json((copy / "gradstore.json").read_bytes(), str(copy))
    assert SegmentReader(objects, manifest, config).read_all().rows.shape == (2, 4)
    for wrong, message in ((dict(dtype="bfloat16"), "from the manifest and gradstore.json it should be uint16"),
                           (dict(dim=8), r"should be float32 of shape \[2, 8\]")):
        tampered = StoreConfig(**{**config.__dict__, **wrong})
        with pytest.raises(FormatError, match=message):
            SegmentReader(objects, manifest, tampered).read_all()


# ------------------------------------------------------------------------------------------------ manifests
MANIFEST_CASES = [
    ("{oops", None, "not valid JSON"),
    ("[1, 2]", None, "a JSON list, not an object"),
    (None, lambda d: d.update(ids=[["a"]]), r"ids\[0\]: ID \['a'\] has type list"),
    (None, lambda d: d.update(ids=[1.5]), r"ids\[0\]: ID 1.5 has type float"),
    (None, lambda d: d.update(ids=[-4]), r"ids\[0\]: integer ID -4 is out of range"),
    (None, lambda d: d.update(ids=[""]), r"ids\[0\]: ID '' is empty"),
    (None, lambda d: d.update(ids="a"), "ids must be a list"),
    (None, lambda d: d.update(row_offsets=[2, 0]), "row_offsets must start at 0, got 2"),
    (None, lambda d: d.update(ids=["a", "b"], row_offsets=[0, 2, 1]), r"row_offsets decrease at example 1 \(2 -> 1\)"),
    (None, lambda d: d.update(row_offsets=[0]), "1 ids need 2 row_offsets, got 1"),
    (None, lambda d: d.update(row_offsets=[0, 1.5]), "row_offsets must be a list of integers"),
    (None, lambda d: d.update(row_offsets=[0, True]), "row_offsets must be a list of integers"),
    (None, lambda d: d.update(row_offsets=[0, 2**64]), "row_offsets do not fit int64"),
    (None, lambda d: d.update(segment="../../elsewhere"), "segment '../../elsewhere' is not a segment name"),
    (None, lambda d: d.update(replaces=["../x"]), "replaces must be a list of segment names"),
    (None, lambda d: d.update(order=-1), "order must be a non-negative integer"),
]


@pytest.mark.parametrize(("text", "change", "message"), MANIFEST_CASES)
def test_malformed_manifest_is_a_format_error_on_open(copy, text, change, message):
    path = only(copy, "manifests/*.json")
    if text is not None:
        path.write_text(text)
    else:
        edit_json(path, change)
    with pytest.raises(FormatError, match=f"{path.name}: malformed manifest: {message}"):
        GradStore.open(copy)


def test_a_lone_surrogate_id_in_a_manifest_is_refused(copy):
    path = only(copy, "manifests/*.json")
    path.write_text(path.read_text().replace('"ids":["a"]', '"ids":["\\ud800"]'))
    with pytest.raises(FormatError, match=r"ids\[0\]: string ID .* is not valid Unicode"):
        GradStore.open(copy)


def test_offsets_beyond_the_arrays_are_refused_on_read(copy):
    edit_json(only(copy, "manifests/*.json"), lambda d: d.update(row_offsets=[0, 5]))
    store = GradStore.open(copy)
    with pytest.raises(FormatError, match=r"array '(rows|token_ids)' is .* of shape \[2"):
        store.get("a")


def test_a_manifest_naming_another_segment_than_its_file_is_refused(copy):
    path = only(copy, "manifests/*.json")
    other = "00000000000000000001-0123456789ab"
    with pytest.raises(FormatError, match=f"names segment .* but is the manifest of '{other}'"):
        Manifest.from_json(path.read_bytes(), str(path), segment=other)
    assert Manifest.from_json(path.read_bytes(), str(path), segment=path.stem).segment == path.stem
