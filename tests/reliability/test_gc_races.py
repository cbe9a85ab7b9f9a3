"""gc runs while writers write: it never deletes what a writer is committing or still holds."""

import os
import time
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

from sdxlpipe.cache_format import open_store

FIELD = "latent.safetensors"
TWO_HOURS_AGO = time.time() - 7200


def _write(root: str, payloads: dict) -> None:
    with open_store(root).writer("vae") as w:
        for key, payload in payloads.items():
            w.add(key, FIELD, payload)


class _CommitsDuringGC(LocalFileSystem):
    """Runs `during` the first time gc dates a shard: a writer commits that shard again
    between gc's first look and its delete."""

    cachable = False

    def __init__(self, during, **kwargs):
        super().__init__(**kwargs)
        self.during = during

    def modified(self, path):
        seen = super().modified(path)
        if str(path).endswith(".tar") and self.during is not None:
            during, self.during = self.during, None
            during()
        return seen


def test_a_shard_committed_again_while_gc_runs_is_kept(tmp_path, payloads):
    root = str(tmp_path / "store")
    _write(root, payloads)
    for fragment in Path(root, "index", "vae").glob("*.parquet"):
        fragment.unlink()  # e.g. compacted away after the items were found bad
    for old in Path(root, "shards", "vae").iterdir():
        os.utime(old, (TWO_HOURS_AGO, TWO_HOURS_AGO))

    store = open_store(root)
    store.fs = _CommitsDuringGC(lambda: _write(root, payloads))
    store.gc(grace_seconds=3600)

    reader = open_store(root)
    assert reader.present("vae") == set(payloads)
    assert dict(reader.read_many("vae", payloads, FIELD)) == payloads
    assert reader.verify() == []


def test_an_idle_writer_keeps_its_temp_file_from_gc_and_commits_later(tmp_path, payloads):
    root = str(tmp_path / "store")
    store = open_store(root)
    first, second = list(payloads)[:2]
    with store.writer("vae", keepalive_seconds=0.05) as w:
        w.add(first, FIELD, payloads[first])
        w.end_item()
        (part,) = Path(root, "tmp").glob("shard-*")
        os.utime(part, (TWO_HOURS_AGO, TWO_HOURS_AGO))  # as if the writer sat idle for 2 hours
        time.sleep(0.3)
        assert open_store(root).gc(grace_seconds=3600) == []
        w.add(second, FIELD, payloads[second])

    store.refresh()
    assert store.present("vae") == {first, second}
    assert store.verify() == []


def test_gc_still_removes_old_temp_files_and_unreferenced_shards(tmp_path, payloads):
    root = str(tmp_path / "store")
    _write(root, payloads)
    stray = Path(root, "tmp", "shard-dead.tar.part")
    stray.write_bytes(b"left by a killed writer")
    os.utime(stray, (TWO_HOURS_AGO, TWO_HOURS_AGO))
    for fragment in Path(root, "index", "vae").glob("*.parquet"):
        fragment.unlink()
    for old in Path(root, "shards", "vae").iterdir():
        os.utime(old, (TWO_HOURS_AGO, TWO_HOURS_AGO))

    removed = open_store(root).gc(grace_seconds=3600)

    assert len(removed) == 3 and not stray.exists()
    assert list(Path(root, "shards", "vae").iterdir()) == []


def _unindexed_old_shard(root: str, payloads: dict) -> tuple[Path, bytes]:
    """A store whose one shard is old and no fragment references: gc's first look deletes it.
    Returns the shard and the fragment bytes that referenced it."""
    _write(root, payloads)
    (fragment,) = Path(root, "index", "vae").glob("*.parquet")
    rows = fragment.read_bytes()
    fragment.unlink()
    for old in Path(root, "shards", "vae").iterdir():
        os.utime(old, (TWO_HOURS_AGO, TWO_HOURS_AGO))
    (shard,) = Path(root, "shards", "vae").glob("*.tar")
    return shard, rows


def test_a_shard_placed_again_but_not_yet_indexed_while_gc_runs_is_kept(tmp_path, payloads):
    """Only the age check before the delete protects it: no fragment names it yet."""
    root = str(tmp_path / "store")
    shard, _ = _unindexed_old_shard(root, payloads)
    data = shard.read_bytes()

    def place_again():  # a writer's step 2 (the same items again): temp file, rename; its fragment comes later
        part = Path(root, "tmp", "shard-again.tar.part")
        part.write_bytes(data)
        os.replace(part, shard)

    store = open_store(root)
    store.fs = _CommitsDuringGC(place_again)
    removed = store.gc(grace_seconds=3600)

    assert shard.exists() and shard.read_bytes() == data
    assert str(shard) not in removed


def test_an_old_shard_indexed_while_gc_runs_is_kept(tmp_path, payloads):
    """Only the reference check before the delete protects it: the shard's own time still says old
    (as on a store whose clock runs behind gc's)."""
    root = str(tmp_path / "store")
    shard, rows = _unindexed_old_shard(root, payloads)
    fragment = Path(root, "index", "vae", "committed-meanwhile.parquet")

    store = open_store(root)
    store.fs = _CommitsDuringGC(lambda: fragment.write_bytes(rows))
    removed = store.gc(grace_seconds=3600)

    assert shard.exists() and str(shard) not in removed
    reader = open_store(root)
    assert dict(reader.read_many("vae", payloads, FIELD)) == payloads
