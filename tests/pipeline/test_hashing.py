import os
import time

from sdxlpipe.pipeline.hashing import ContentMemo, hash_bytes_of_file


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
    assert again.hash_file(f) == first == hash_bytes_of_file(f)
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


def test_racy_file_written_in_the_hashing_second_is_hashed_again(tmp_path):
    f = tmp_path / "a.png"
    f.write_bytes(b"fresh")  # mtime is now: the same second as the hash below
    memo = ContentMemo(tmp_path / "memo.parquet")
    memo.hash_file(f)
    memo.save()
    again = ContentMemo(tmp_path / "memo.parquet")
    again.hash_file(f)
    assert again.hashed == 1
