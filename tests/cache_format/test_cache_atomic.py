"""Every durable local write goes through one atomic write: temp, fsync file, rename, fsync directory."""

import os
import stat

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdxlpipe.cache_format import open_store
from sdxlpipe.cache_format.shards import write_atomic
from sdxlpipe.pipeline.atomic import write_json_atomic, write_parquet_atomic


@pytest.fixture
def fsynced(monkeypatch):
    """The real paths os.fsync was called on (a spy on the standard library, calling through)."""
    seen: list[str] = []
    real = os.fsync

    def spy(fd):
        seen.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


@pytest.mark.parametrize("how", ["bytes", "json", "parquet", "store"])
def test_each_writer_fsyncs_the_file_and_its_directory_and_leaves_no_temp(tmp_path, fsynced, how):
    folder = tmp_path / "dir"
    if how == "store":
        store = open_store(str(folder))
        fsynced.clear()
        with store.writer("vae") as w:
            w.add("a" * 32, "json", b"{}")
        target = next((folder / "index" / "vae").iterdir())
    else:
        target = folder / "out"
        {"bytes": lambda: write_atomic(target, b"data"),
         "json": lambda: write_json_atomic({"a": 1}, target),
         "parquet": lambda: write_parquet_atomic(pa.table({"a": [1, 2]}), target)}[how]()
    real_dir = os.path.realpath(target.parent)
    assert real_dir in fsynced  # the rename itself survives a power cut
    # The file's bytes were fsynced (under its temp name) before the directory was.
    assert any(os.path.dirname(p) in (real_dir, os.path.realpath(folder / "tmp")) and p != real_dir
               for p in fsynced[: fsynced.index(real_dir)])
    assert [p.name for p in target.parent.iterdir() if p.name.endswith(".tmp")] == []
    if how == "parquet":
        assert pq.ParquetFile(target).read().to_pydict() == {"a": [1, 2]}


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "table.parquet"
    write_atomic(target, b"old")

    def half(f):
        f.write(b"half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(target, half)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.parquet"]


def test_mode_is_kept_private_unless_asked(tmp_path):
    write_atomic(tmp_path / "private", b"x")
    write_atomic(tmp_path / "shared", b"x", mode=0o644)
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o644
