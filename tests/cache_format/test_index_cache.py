"""The local index cache (index_cache.py): derived data that saves parsing, never an answer."""

import errno
from pathlib import Path

import pytest
from fsspec.implementations.local import LocalFileSystem

from sdxlpipe.cache_format import StoreError, open_store

FIELD = "latent.safetensors"
ABSENT = ["f" * 32, "not-a-key"]


def write(store, items: dict[str, bytes]) -> None:
    with store.writer("vae") as w:
        for key, payload in items.items():
            w.add(key, FIELD, payload)


def answers(root: Path, keys: list[str]) -> tuple[tuple, object]:
    """Everything a lookup says about `keys`, from a Store opened now; and its stage index."""
    store = open_store(str(root))
    located = store.locate("vae", keys + ABSENT, FIELD)
    return (sorted(store.present("vae")), store.missing("vae", keys + ABSENT), store.damaged("vae", keys),
            [l and (l.item_key, l.shard_id, l.offset, l.length, l.xxh3) for l in located]), store._index("vae")


def cached_and_not(root: Path, keys: list[str], monkeypatch, cache: Path) -> tuple:
    """(answers without the cache, answers with it, the cached Store's index)."""
    monkeypatch.setenv("SDXLPIPE_INDEX_CACHE", "off")
    truth, _ = answers(root, keys)
    monkeypatch.setenv("SDXLPIPE_INDEX_CACHE", str(cache))
    got, index = answers(root, keys)
    return truth, got, index


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SDXLPIPE_INDEX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_cache_gives_the_stores_answers_after_a_commit_damage_and_compaction(tmp_path, payloads,
                                                                                 monkeypatch, cache):
    root, keys = tmp_path / "store", sorted(payloads)
    for key in keys[:4]:
        write(open_store(str(root)), {key: payloads[key]})
    first = open_store(str(root))
    first.missing("vae", keys)
    assert first._index("vae").reads == 4 and len(list(cache.rglob("vae.idx"))) == 1

    truth, got, index = cached_and_not(root, keys, monkeypatch, cache)
    assert got == truth and truth[1] == keys[4:] + ABSENT
    assert (index.from_cache, index.reads) == (4, 0)  # all four fragments from the file, none parsed

    write(open_store(str(root)), {keys[4]: payloads[keys[4]]})  # another writer commits
    truth, got, index = cached_and_not(root, keys, monkeypatch, cache)
    assert got == truth and truth[1] == keys[5:] + ABSENT
    assert index.reads == 1  # only the new fragment is read from the store

    next(root.glob(f"shards/vae/{got[3][0][1]}.tar")).unlink()  # damage: keys[0]'s shard is lost
    assert open_store(str(root)).read("vae", keys[0], FIELD) is None  # writes a bad marker
    truth, got, index = cached_and_not(root, keys, monkeypatch, cache)
    assert got == truth and truth[2] == [keys[0]]  # markers are always read from the store

    open_store(str(root)).compact("vae")  # every fragment the file names is deleted
    write(open_store(str(root)), {keys[5]: payloads[keys[5]]})
    truth, got, index = cached_and_not(root, keys, monkeypatch, cache)
    assert got == truth and truth[1] == [keys[0]] + keys[6:] + ABSENT
    assert open_store(str(root)).read("vae", keys[5], FIELD) == payloads[keys[5]]


def test_a_damaged_or_outdated_cache_file_is_rebuilt_from_the_store(tmp_path, payloads, monkeypatch, cache):
    root, keys = tmp_path / "store", sorted(payloads)
    for key in keys[:3]:
        write(open_store(str(root)), {key: payloads[key]})
    open_store(str(root)).missing("vae", [])
    (path,) = cache.rglob("vae.idx")
    good = path.read_bytes()

    for broken in (good[:-40] + bytes(40), good[: len(good) // 2], b"", good[:30] + b"{" + good[31:]):
        path.write_bytes(broken)
        truth, got, index = cached_and_not(root, keys, monkeypatch, cache)
        assert got == truth and truth[1] == keys[3:] + ABSENT
        assert (index.from_cache, index.reads) == (0, 3)

    # A fragment the file covers, rewritten under the same name with other rows (a store
    # replaced from elsewhere): its size differs, so the file is not used.
    path.write_bytes(good)
    fragment = next(p for p in (root / "index" / "vae").glob("*.parquet"))
    other = tmp_path / "other"
    write(open_store(str(other)), {k: payloads[k] for k in keys[6:9]})
    fragment.write_bytes(next((other / "index" / "vae").glob("*.parquet")).read_bytes())
    truth, got, index = cached_and_not(root, keys, monkeypatch, cache)
    assert got == truth and keys[6] in truth[0]
    assert index.from_cache == 0


def test_a_stage_of_empty_fragments_is_cached_as_empty(tmp_path, monkeypatch, cache):
    import pyarrow.parquet as pq

    from sdxlpipe.cache_format.grammar import GROUPED_SCHEMA

    root = tmp_path / "store"
    open_store(str(root))
    (root / "index" / "vae").mkdir(parents=True)
    pq.write_table(GROUPED_SCHEMA.empty_table(), root / "index" / "vae" / "empty.parquet")
    for _ in range(2):  # writes the cache, then reads it
        truth, got, index = cached_and_not(root, ["a" * 32], monkeypatch, cache)
        assert got == truth and truth[1] == ["a" * 32] + ABSENT
    assert index.from_cache == 1


class FlakyIndexFS(LocalFileSystem):
    """Index fragment reads fail with a connection reset, `failures` times."""

    cachable = False

    def __init__(self, failures: int, **kwargs):
        super().__init__(**kwargs)
        self.failures = failures

    def cat_file(self, path, *args, **kwargs):
        if str(path).endswith(".parquet") and self.failures > 0:
            self.failures -= 1
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer (injected)")
        return super().cat_file(path, *args, **kwargs)


def test_a_fragment_that_fails_to_read_is_retried_then_named_never_counted_missing(tmp_path, payloads,
                                                                                   monkeypatch):
    monkeypatch.setenv("SDXLPIPE_INDEX_CACHE", "off")
    root, keys = tmp_path / "store", sorted(payloads)
    write(open_store(str(root)), {k: payloads[k] for k in keys[:3]})
    fragment = next((root / "index" / "vae").glob("*.parquet")).name

    blip = open_store(str(root))
    blip.fs, blip.read_retry_delays = FlakyIndexFS(2), (0.01, 0.01, 0.01)
    assert blip.missing("vae", keys) == keys[3:]
    assert blip._index("vae").unreadable == {}

    down = open_store(str(root))
    down.fs, down.read_retry_delays = FlakyIndexFS(100), (0.01,)
    with pytest.raises(StoreError, match=fragment) as raised:
        down.missing("vae", keys)
    assert "nothing was refused" in str(raised.value)
    assert open_store(str(root)).missing("vae", keys) == keys[3:]
