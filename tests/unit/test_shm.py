"""Object files: layout, alignment, read-only mappings, permissions. In tmp_path, not /dev/shm."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from shoal import _shm
from shoal._serialization import FLAG_ERROR, SerializedValue, deserialize, serialize

pytestmark = pytest.mark.timeout(10)


def value_with_buffers():
    return {
        "floats": np.linspace(0, 1, 10_001),  # an odd size, so the next buffer needs padding
        "ints": np.arange(333, dtype=np.int16),
        "label": "x" * 77,
    }


def write_value(path, value, flags=0):
    sv = serialize(value, flags)
    size = _shm.layout_size(sv)
    _shm.write(str(path), sv, size)
    return sv, size


def load(path):
    data, buffers, flags = _shm.read(str(path))
    return deserialize(data, buffers), flags


def test_round_trip_with_buffers_and_flags(tmp_path):
    path = tmp_path / "obj"
    value = value_with_buffers()
    sv, size = write_value(path, value, FLAG_ERROR)
    assert len(sv.buffers) == 2
    assert os.path.getsize(path) == size

    restored, flags = load(path)
    assert flags == FLAG_ERROR
    np.testing.assert_array_equal(restored["floats"], value["floats"])
    np.testing.assert_array_equal(restored["ints"], value["ints"])
    assert restored["label"] == value["label"]


def test_a_value_without_buffers(tmp_path):
    path = tmp_path / "obj"
    write_value(path, ("plain", 1))
    assert load(path) == (("plain", 1), 0)


def test_buffers_and_data_are_64_byte_aligned(tmp_path):
    path = tmp_path / "obj"
    write_value(path, value_with_buffers())
    data, buffers, _ = _shm.read(str(path))
    for view in [data, *buffers]:
        address = np.frombuffer(view, dtype=np.uint8).ctypes.data
        assert address % _shm.ALIGN == 0
    assert _shm.layout_size(serialize(value_with_buffers())) % _shm.ALIGN == 0


def test_the_mapping_is_read_only(tmp_path):
    path = tmp_path / "obj"
    write_value(path, value_with_buffers())
    data, buffers, _ = _shm.read(str(path))
    assert data.readonly and all(b.readonly for b in buffers)
    restored = deserialize(data, buffers)
    array = restored["floats"]
    assert not array.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        array[0] = 42.0
    assert restored["floats"][0] == 0.0
    assert np.shares_memory(array, np.frombuffer(buffers[0], dtype=np.float64))  # no copy


def test_the_file_is_private_to_its_user(tmp_path):
    path = tmp_path / "obj"
    write_value(path, value_with_buffers())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_reader_keeps_its_data_after_the_file_is_unlinked(tmp_path):
    path = tmp_path / "obj"
    value = value_with_buffers()
    write_value(path, value)
    data, buffers, _ = _shm.read(str(path))
    _shm.unlink(str(path))
    _shm.unlink(str(path))  # a second unlink is harmless
    assert not path.exists()
    np.testing.assert_array_equal(deserialize(data, buffers)["floats"], value["floats"])


def test_a_file_that_is_not_an_object_is_refused(tmp_path):
    path = tmp_path / "junk"
    path.write_bytes(b"NOTSHOAL" + b"\0" * 100)
    with pytest.raises(ValueError, match="not a Shoal object"):
        _shm.read(str(path))


def test_a_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "obj"
    sv = serialize(value_with_buffers())
    with pytest.raises((IndexError, ValueError)):
        _shm.write(str(path), sv, 128)  # far too small for the layout
    assert not path.exists()


def test_copy_file_copies_privately_and_never_overwrites(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    value = value_with_buffers()
    write_value(src, value)
    _shm.copy_file(str(src), str(dst))
    assert dst.read_bytes() == src.read_bytes()
    assert stat.S_IMODE(os.stat(dst).st_mode) == 0o600
    np.testing.assert_array_equal(load(dst)[0]["ints"], value["ints"])
    with pytest.raises(FileExistsError):
        _shm.copy_file(str(src), str(dst))


def test_layout_size_covers_the_header_data_and_every_buffer():
    sv = SerializedValue(b"d" * 10, [b"a" * 65, bytearray(1)], [])
    # header (32) + 2 entries (32) -> 64; data 10 -> 128; 65 -> 256; 1 -> 320
    assert _shm.layout_size(sv) == 320


def test_write_never_uses_a_file_it_did_not_create_privately(tmp_path):
    path = tmp_path / "obj"
    path.write_bytes(b"")
    os.chmod(path, 0o666)  # planted by someone else, readable and writable by all
    try:
        write_value(path, b"secret" * 100_000)
    except OSError:
        return  # refusing is fine
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) & 0o077 == 0 and st.st_uid == os.geteuid()


def test_recycling_a_segment_never_changes_what_a_reader_mapped(tmp_path):
    first, recycled = tmp_path / "first", tmp_path / "recycled"
    write_value(first, np.full(100_000, 1.0))
    array, _ = load(first)
    os.rename(first, recycled)  # the object was freed and its segment pooled, then reused
    try:
        write_value(recycled, np.full(100_000, 2.0))
    except FileExistsError:
        pass  # refusing to reuse the file is fine too
    assert np.all(array == 1.0)
