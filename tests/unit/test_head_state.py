"""The head's records of detached actors on disk (_head_state.HeadState)."""

from __future__ import annotations

import os

import pytest
from shoal._head_state import HeadState

pytestmark = pytest.mark.timeout(10)


def record(aid: bytes) -> dict:
    return {
        "aid": aid,
        "cls": "C",
        "res": {"CPU": 0},
        "meta": {},
        "body": {"x": 1},
        "frames": [b"\x00pickled"],
    }


def test_records_are_saved_loaded_and_forgotten(tmp_path):
    state = HeadState(str(tmp_path / "state"))
    state.save_actor(record(b"a" * 16))
    state.save_actor(record(b"b" * 16))
    state.save_actor({**record(b"a" * 16), "cls": "D"})  # replaces the first
    loaded = {r["aid"]: r for r in HeadState(str(tmp_path / "state")).load_actors()}
    assert set(loaded) == {b"a" * 16, b"b" * 16}
    assert loaded[b"a" * 16]["cls"] == "D" and loaded[b"b" * 16]["frames"] == [b"\x00pickled"]
    state.forget_actor(b"a" * 16)
    state.forget_actor(b"a" * 16)  # twice: nothing to do
    assert [r["aid"] for r in state.load_actors()] == [b"b" * 16]
    files = os.listdir(tmp_path / "state" / "actors")
    assert all(os.stat(tmp_path / "state" / "actors" / f).st_mode & 0o077 == 0 for f in files)


def test_cut_short_and_unreadable_records_are_skipped(tmp_path):
    state = HeadState(str(tmp_path / "state"))
    state.save_actor(record(b"a" * 16))
    (tmp_path / "state" / "actors" / "x.msgpack.tmp").write_bytes(b"half")
    (tmp_path / "state" / "actors" / "y.msgpack").write_bytes(b"\xc1 not msgpack")
    assert [r["aid"] for r in state.load_actors()] == [b"a" * 16]
    assert not (tmp_path / "state" / "actors" / "x.msgpack.tmp").exists()


def test_a_directory_others_can_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    with pytest.raises(PermissionError, match="chmod 700"):
        HeadState(str(shared))
