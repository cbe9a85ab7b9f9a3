"""Content hashes of source files, memoized by file stat (DESIGN §3).

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

import pyarrow as pa
import pyarrow.parquet as pq

from sdxlpipe.cache_format.shards import hash_file
from sdxlpipe.pipeline.atomic import write_parquet_atomic

_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("ctime_ns", pa.int64()),
        ("inode", pa.int64()),
        ("hashed_at_ns", pa.int64()),
        ("xxh3", pa.string()),
    ]
)


def hash_bytes_of_file(path: Path) -> str:
    return hash_file(path)  # the one streaming hasher (cache_format/shards.py)


class ContentMemo:
    """Stat-keyed memo of file content hashes, stored as one parquet file."""

    def __init__(self, memo_path: Path) -> None:
        self.memo_path = memo_path
        self.entries: dict[str, tuple[int, int, int, int, int, str]] = {}
        self.hashed = 0  # files whose bytes were read in this process
        self.dirty = False
        if memo_path.exists():
            t = pq.ParquetFile(memo_path).read().to_pydict()  # not pq.read_table: it imports pyarrow.dataset
            for i, p in enumerate(t["path"]):
                self.entries[p] = (
                    t["size"][i], t["mtime_ns"][i], t["ctime_ns"][i],
                    t["inode"][i], t["hashed_at_ns"][i], t["xxh3"][i],
                )

    def hash_file(self, path: Path | str) -> str:
        path = Path(path).absolute()
        st = os.stat(path)
        stat_key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        known = self.entries.get(str(path))
        if known is not None and known[:4] == stat_key and not _racy(st.st_mtime_ns, known[4]):
            return known[5]
        hashed_at = time.time_ns()
        digest = hash_bytes_of_file(path)
        self.hashed += 1
        self.entries[str(path)] = (*stat_key, hashed_at, digest)
        self.dirty = True
        return digest

    def save(self) -> None:
        if not self.dirty:
            return
        cols: dict[str, list] = {name: [] for name in _SCHEMA.names}
        for p, (size, mtime, ctime, ino, at, digest) in sorted(self.entries.items()):
            for name, value in zip(_SCHEMA.names, (p, size, mtime, ctime, ino, at, digest)):
                cols[name].append(value)
        write_parquet_atomic(pa.table(cols, schema=_SCHEMA), self.memo_path)
        self.dirty = False


def _racy(mtime_ns: int, hashed_at_ns: int) -> bool:
    """A write in the same second as (or after) the hash may be invisible to mtime."""
    return mtime_ns // 1_000_000_000 >= hashed_at_ns // 1_000_000_000
