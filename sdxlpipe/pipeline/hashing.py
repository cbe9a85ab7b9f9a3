"""Content hashes of source files, memoized by file stat.

The memo maps an absolute path to (size, mtime_ns, ctime_ns, inode) and the
xxh3-128 of the bytes. A no-op rerun answers every file from `os.stat` and
never reads a byte. git's racy rule applies: a file whose mtime falls in the
same second as the moment it was hashed may have changed again unseen, so it
is hashed again next time.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from sdxlpipe.cache_format.shards import hash_file
from sdxlpipe.pipeline.atomic import write_parquet_atomic


def _schema(column: str) -> pa.Schema:
    return pa.schema([
        ("path", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("ctime_ns", pa.int64()),
        ("inode", pa.int64()),
        ("hashed_at_ns", pa.int64()),
        (column, pa.string()),
    ])


class ContentMemo:
    """Stat-keyed memo of a string computed from a file's bytes, stored as one parquet file.

    By default the string is the xxh3 of the bytes (`hash_file`); ingest also keeps the
    text of caption sidecars this way (`compute=read_sidecar`, `column="text"`), so a rerun
    opens no caption file either. `compute` returning None is not remembered (a broken
    sidecar is read, and warned about, again).
    """

    def __init__(self, memo_path: Path, compute: Callable[[Path], str | None] = hash_file,
                 column: str = "xxh3") -> None:
        self.memo_path = memo_path
        self.compute = compute
        self.schema = _schema(column)
        self.entries: dict[str, tuple[int, int, int, int, int, str]] = {}
        self.hashed = 0  # files whose bytes were read in this process
        self.dirty = False
        if memo_path.exists():
            t = pq.ParquetFile(memo_path).read().to_pydict()  # not pq.read_table: it imports pyarrow.dataset
            if column in t:
                for i, p in enumerate(t["path"]):
                    self.entries[p] = (
                        t["size"][i], t["mtime_ns"][i], t["ctime_ns"][i],
                        t["inode"][i], t["hashed_at_ns"][i], t[column][i],
                    )

    def hash_file(self, path: Path | str) -> str:
        return self.get(path)

    def get(self, path: Path | str, st: os.stat_result | None = None) -> str | None:
        """The memoized value for `path`; `st`: its os.stat if the caller has it already."""
        path = Path(path).absolute()
        st = st or os.stat(path)
        stat_key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        known = self.entries.get(str(path))
        if known is not None and known[:4] == stat_key and not _racy(st.st_mtime_ns, known[4]):
            return known[5]
        hashed_at = time.time_ns()
        value = self.compute(path)
        self.hashed += 1
        if value is not None:
            self.entries[str(path)] = (*stat_key, hashed_at, value)
            self.dirty = True
        return value

    def save(self) -> None:
        if not self.dirty:
            return
        names = self.schema.names
        cols: dict[str, list] = {name: [] for name in names}
        for p, (size, mtime, ctime, ino, at, value) in sorted(self.entries.items()):
            for name, v in zip(names, (p, size, mtime, ctime, ino, at, value)):
                cols[name].append(v)
        write_parquet_atomic(pa.table(cols, schema=self.schema), self.memo_path)
        self.dirty = False


def _racy(mtime_ns: int, hashed_at_ns: int) -> bool:
    """A write in the same second as (or after) the hash may be invisible to mtime."""
    return mtime_ns // 1_000_000_000 >= hashed_at_ns // 1_000_000_000
