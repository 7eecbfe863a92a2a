"""The fast row reader returns exactly what zarr-python returns, for every layout it accepts."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from gradstore._arrays import ChunkedArrayReader, UnsupportedLayout, write_array
from gradstore._format import CodecConfig
from gradstore._objects import LocalObjects
from gradstore.errors import FormatError


@pytest.mark.parametrize("dtype", ["uint16", "float32", "int8", "int32"])
@pytest.mark.parametrize(("chunks", "shards"), [(4, 16), (5, None), (8, 8)])
@pytest.mark.parametrize("compressors", ["blosc", "zstd", None])
def test_parity_with_zarr_python(tmp_path, dtype, chunks, shards, compressors):
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((53, 6)) * 100).astype(dtype)
    data[8:24] = 0  # whole chunks equal to the fill value are never written: they must read back as zeros
    codecs = {"blosc": [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"), Crc32cCodec()],
              "zstd": [ZstdCodec(level=1)], None: None}[compressors]
    array = zarr.create_array(zarr.storage.LocalStore(tmp_path), name="a", shape=data.shape, dtype=dtype,
                              chunks=(chunks, 6), shards=(shards, 6) if shards else None, compressors=codecs,
                              fill_value=0)
    array[...] = data
    reader = ChunkedArrayReader(LocalObjects(tmp_path), "a")
    ranges = [(0, 53), (3, 4), (10, 30), (52, 53), (7, 7), (40, 50), (0, 1)]
    expected = np.concatenate([data[lo:hi] for lo, hi in ranges])
    np.testing.assert_array_equal(reader.read_ranges(ranges), expected)
    np.testing.assert_array_equal(reader.read_all(), array[...])
    with pytest.raises(IndexError):
        reader.read_ranges([(50, 54)])


def test_one_dimensional_arrays(tmp_path):
    data = np.arange(1000, dtype=np.int64)
    array = zarr.create_array(zarr.storage.LocalStore(tmp_path), name="v", shape=data.shape, dtype="int64",
                              chunks=(64,), shards=(256,))
    array[...] = data
    reader = ChunkedArrayReader(LocalObjects(tmp_path), "v")
    np.testing.assert_array_equal(reader.read_ranges([(999, 1000), (0, 3)]), [999, 0, 1, 2])


def test_corruption_is_detected_by_the_checksum(tmp_path):
    data = np.random.default_rng(1).standard_normal((64, 4)).astype(np.float32)
    array = zarr.create_array(zarr.storage.LocalStore(tmp_path), name="a", shape=data.shape, dtype="float32",
                              chunks=(16, 4), shards=(64, 4), compressors=[Crc32cCodec()])
    array[...] = data
    shard = tmp_path / "a" / "c" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="checksum mismatch"):
        ChunkedArrayReader(LocalObjects(tmp_path), "a").read_ranges([(0, 4)])


def test_unsupported_layouts_are_refused(tmp_path):
    array = zarr.create_array(zarr.storage.LocalStore(tmp_path), name="a", shape=(10, 10), dtype="float32",
                              chunks=(5, 5))
    array[...] = 1
    with pytest.raises(UnsupportedLayout):
        ChunkedArrayReader(LocalObjects(tmp_path), "a")


@pytest.mark.parametrize("dtype", ["uint16", "float32", "int8", "int64", "uint8"])
@pytest.mark.parametrize(("rows", "chunk", "shard"), [(0, 4, 4), (1, 4, 4), (53, 4, 16), (64, 8, 64), (70, 8, 32)])
@pytest.mark.parametrize("codec", ["blosc-zstd", "zstd", "none"])
def test_written_arrays_read_back_identically_through_zarr_python(tmp_path, dtype, rows, chunk, shard, codec):
    rng = np.random.default_rng(2)
    shape = (rows, 5) if dtype != "int64" else (rows,)
    data = (rng.standard_normal(shape) * 50).astype(dtype)
    write_array(LocalObjects(tmp_path), "w", data, chunk, shard, CodecConfig(name=codec))
    array = zarr.open_array(zarr.storage.LocalStore(tmp_path), path="w", mode="r")
    assert array.shape == data.shape and array.dtype == data.dtype
    np.testing.assert_array_equal(array[...], data)
    np.testing.assert_array_equal(ChunkedArrayReader(LocalObjects(tmp_path), "w").read_all(), data)
