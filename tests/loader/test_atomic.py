"""atomic_write puts files in place whole or not at all."""
import os

import pytest

from maskstream.loader.atomic import atomic_open, atomic_write


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "f.json"
    atomic_write(path, "one")
    atomic_write(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(path.parent) == ["f.json"]


def test_atomic_open_failure_keeps_old_file_and_removes_temp(tmp_path):
    path = tmp_path / "f"
    atomic_write(path, b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write(b"half")
            raise RuntimeError("crash")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]
