"""The one atomic-write helper (harness/core/io.py): readers never see a torn file, and modes are normal."""

from __future__ import annotations

import os

from harness.core import io


def test_atomic_writes_honour_the_process_umask(tmp_path):
    io.write_json_atomic(tmp_path / "r.json", {"a": 1})
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~io._UMASK  # not mkstemp's 0600
    assert io.read_json(tmp_path / "r.json", "result") == {"a": 1}
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
