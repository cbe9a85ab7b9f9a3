import os
import time

import pyarrow as pa
import pyarrow.parquet as pq

from sdxlpipe.cache_format.shards import hash_file
from sdxlpipe.pipeline.hashing import ContentMemo


def _old(path, seconds_ago=10):
    t = time.time() - seconds_ago
    os.utime(path, (t, t))


def test_memo_answers_from_stats_without_reading(tmp_path):
    f = tmp_path / "a.png"
    f.write_bytes(b"x" * 1000)
    _old(f)
    memo = ContentMemo(tmp_path / "memo.parquet")
    first = memo.hash_file(f)
    memo.save()
    again = ContentMemo(tmp_path / "memo.parquet")
    assert again.hash_file(f) == first == hash_file(f)
    assert again.hashed == 0


def test_changed_file_is_hashed_again(tmp_path):
    f = tmp_path / "a.png"
    f.write_bytes(b"one")
    _old(f, 20)
    memo = ContentMemo(tmp_path / "memo.parquet")
    first = memo.hash_file(f)
    f.write_bytes(b"two")
    _old(f, 10)
    assert memo.hash_file(f) != first
    assert memo.hashed == 2


def _as_if_the_stat_did_not_change(memo_path, f):
    """Rewrite the saved memo with f's current stat, as a filesystem with 1-second
    timestamps would show a rewrite in the same second: same size, mtime, ctime, inode."""
    table = pq.read_table(memo_path).to_pydict()
    st = os.stat(f)
    for name, value in (("size", st.st_size), ("mtime_ns", st.st_mtime_ns), ("ctime_ns", st.st_ctime_ns),
                        ("inode", st.st_ino)):
        table[name] = [value]
    pq.write_table(pa.table(table, schema=pq.read_schema(memo_path)), memo_path)


def test_a_change_in_the_hashing_second_that_the_stat_cannot_show_is_detected(tmp_path):
    f = tmp_path / "a.png"
    f.write_bytes(b"first")  # mtime is now: the same second as the hash below
    memo = ContentMemo(tmp_path / "memo.parquet")
    stale = memo.hash_file(f)
    memo.save()
    f.write_bytes(b"other")  # same size, same second
    _as_if_the_stat_did_not_change(tmp_path / "memo.parquet", f)

    assert ContentMemo(tmp_path / "memo.parquet").hash_file(f) == hash_file(f) != stale


def test_a_file_older_than_its_hash_is_trusted_by_stat(tmp_path):
    f = tmp_path / "a.png"
    f.write_bytes(b"first")
    _old(f, 10)
    memo = ContentMemo(tmp_path / "memo.parquet")
    first = memo.hash_file(f)
    memo.save()
    again = ContentMemo(tmp_path / "memo.parquet")
    assert again.hash_file(f) == first and again.hashed == 0
