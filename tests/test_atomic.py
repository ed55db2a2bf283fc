"""featurebank._atomic, the one crash-safe writer: files, exclusive creation, directories,
and the temporary files a killed writer leaves behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from featurebank._atomic import (
    TEMP_PREFIX,
    atomic_directory,
    atomic_writer,
    remove_stale_temps,
    temp_path,
    write_bytes_atomic,
)


def _temps(d):
    return sorted(p.name for p in d.iterdir() if p.name.startswith(TEMP_PREFIX))


def test_exclusive_write_creates_once_and_keeps_the_first(tmp_path):
    target = tmp_path / "space.json"
    assert write_bytes_atomic(target, b"first", exclusive=True) == target
    with pytest.raises(FileExistsError):
        write_bytes_atomic(target, b"second", exclusive=True)
    assert target.read_bytes() == b"first"
    write_bytes_atomic(target, b"third")
    assert target.read_bytes() == b"third" and _temps(tmp_path) == []


def test_a_failing_writer_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_writer(target, "w", encoding="utf-8") as fh:
            fh.write("half of the new")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and _temps(tmp_path) == []


def test_atomic_directory_swaps_a_directory_whole(tmp_path):
    out = tmp_path / "index"
    with atomic_directory(out) as d:
        (d / "a").write_text("1")
    with atomic_directory(out) as d:
        (d / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(out) as d:
            (d / "c").write_text("3")
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["b"] and _temps(tmp_path) == []
    (tmp_path / "file").write_text("keep")
    with pytest.raises(NotADirectoryError, match=r"file exists and is not a directory; it is not replaced"):
        with atomic_directory(tmp_path / "file") as d:
            (d / "x").write_text("x")
    assert (tmp_path / "file").read_text() == "keep" and _temps(tmp_path) == []


_KILLED_WRITER = """
import os, signal, sys
from featurebank._atomic import atomic_writer
with atomic_writer(sys.argv[1], "wb") as fh:
    fh.write(b"half")
    fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_writer_leaves_the_old_file_and_a_temp_that_cleanup_removes(tmp_path):
    target = tmp_path / "marker.json"
    target.write_bytes(b"old")
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"old"
    left = _temps(tmp_path)
    assert len(left) == 1 and left[0].endswith(".json")
    live = temp_path(tmp_path)  # this process is alive: its temp stays
    live.write_bytes(b"in progress")
    assert remove_stale_temps(tmp_path) == [tmp_path / left[0]]
    assert _temps(tmp_path) == [live.name]
    os.unlink(live)
