"""Writing and reading the store: items come back byte-exact, from any process or backend."""

import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest
import webdataset

from sdxlpipe.cache_format import FORMAT_LINE, StoreError, encode_json, open_store

FIELD = "latent.safetensors"


def write(store, items, stage="vae", **kw):
    with store.writer(stage, **kw) as w:
        for key, payload in items.items():
            w.add(key, FIELD, payload)
    return w.shard_ids


def test_items_written_are_read_back_byte_exact_from_a_reopened_store(tmp_path, payloads):
    ids = write(open_store(str(tmp_path)), payloads)

    store = open_store(str(tmp_path), create=False)

    assert (tmp_path / "FORMAT").read_text() == FORMAT_LINE
    assert len(ids) == 1
    assert store.present("vae") == set(payloads)
    assert {k: store.read("vae", k) for k in payloads} == payloads
    assert store.read("vae", "f" * 32) is None
    assert store.verify() == []


def test_shards_are_plain_tars_that_webdataset_reads(tmp_path, payloads):
    store = open_store(str(tmp_path))
    with store.writer("vae") as w:
        for key, payload in payloads.items():
            w.add(key, FIELD, payload)
            w.add(key, "json", encode_json({"key": key}))
    tar_path = tmp_path / "shards" / "vae" / f"{w.shard_ids[0]}.tar"
    key = next(iter(payloads))

    samples = list(webdataset.WebDataset(str(tar_path), shardshuffle=False))

    assert [s["__key__"] for s in samples] == list(payloads)
    assert [s[FIELD] for s in samples] == list(payloads.values())
    with tarfile.open(tar_path) as tar:
        for info in tar.getmembers():
            assert (info.mtime, info.uid, info.gid, info.mode) == (0, 0, 0, 0o644)
        first = tar.getmember(f"{key}.{FIELD}")
    row = next(loc for loc in store._index("vae").rows if loc.item_key == key and loc.field == FIELD)
    assert (row.offset, row.length) == (first.offset_data, first.size)
    assert store.read("vae", key, field="json") == encode_json({"key": key})
    with pytest.raises(StoreError, match="field="):
        store.read("vae", key)


def test_the_same_items_give_the_same_shard_id(tmp_path, payloads):
    first = write(open_store(str(tmp_path / "a")), payloads)
    again = write(open_store(str(tmp_path / "a")), payloads)
    elsewhere = write(open_store(str(tmp_path / "b")), payloads)

    assert first == again == elsewhere
    assert (tmp_path / "a" / "shards" / "vae" / f"{first[0]}.tar").read_bytes() == (
        tmp_path / "b" / "shards" / "vae" / f"{first[0]}.tar"
    ).read_bytes()
    assert open_store(str(tmp_path / "a")).present("vae") == set(payloads)


def test_the_writer_rolls_shards_at_the_target_size_keeping_items_whole(tmp_path, payloads):
    store = open_store(str(tmp_path))
    with store.writer("vae", target_shard_bytes=4096) as w:
        for key, payload in payloads.items():
            w.add(key, FIELD, payload)
            w.add(key, "json", b"{}")

    assert len(w.shard_ids) > 3
    for shard_id in w.shard_ids:
        with tarfile.open(tmp_path / "shards" / "vae" / f"{shard_id}.tar") as tar:
            names = tar.getnames()
        keys = [n.split(".")[0] for n in names]
        assert all(keys.count(k) == 2 for k in keys)  # both fields of each item in one shard
    assert store.present("vae") == set(payloads)
    assert len(list((tmp_path / "index" / "vae").glob("*.parquet"))) == len(w.shard_ids)


def test_a_store_on_memory_works_end_to_end(payloads):
    url = f"memory://store-{uuid.uuid4().hex}"
    write(open_store(url), payloads)

    store = open_store(url, create=False)

    assert store.url == url
    assert store.missing("vae", ["x" * 32, *payloads]) == ["x" * 32]
    assert dict(store.read_many("vae", reversed(list(payloads)))) == payloads
    assert store.verify() == []
    assert store.du()["stages"]["vae"]["items"] == len(payloads)


def test_file_urls_and_paths_name_the_same_store(tmp_path, payloads):
    write(open_store(f"file://{tmp_path}"), payloads)

    assert open_store(str(tmp_path)).present("vae") == set(payloads)


WRITE_HALF = """
import sys
from sdxlpipe.cache_format import open_store
half = int(sys.argv[2])
with open_store(sys.argv[1]).writer("vae", target_shard_bytes=8192) as w:
    for i in range(half * 50, half * 50 + 50):
        w.add(f"{i:032x}", "latent.safetensors", bytes([i]) * 1000)
"""


def test_two_processes_fill_one_store_at_once(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", WRITE_HALF, str(tmp_path), str(h)]) for h in (0, 1)]
    assert [p.wait(60) for p in procs] == [0, 0]

    store = open_store(str(tmp_path))

    assert store.present("vae") == {f"{i:032x}" for i in range(100)}
    assert store.read("vae", f"{77:032x}") == bytes([77]) * 1000
    assert store.verify() == []


def test_two_store_objects_writing_interleaved_both_commit(tmp_path, payloads):
    a, b = open_store(str(tmp_path)), open_store(str(tmp_path))
    keys = list(payloads)
    with a.writer("vae") as wa, b.writer("vae") as wb:
        for i, key in enumerate(keys):
            (wa if i % 2 else wb).add(key, FIELD, payloads[key])

    assert a.present("vae") == set(payloads)  # a's own write drops a's cache
    assert len(b.present("vae")) == len(payloads)


def test_missing_keeps_order_and_drops_duplicates(tmp_path, payloads):
    store = open_store(str(tmp_path))
    write(store, dict(list(payloads.items())[:2]))
    k0, k1 = list(payloads)[:2]

    assert store.missing("vae", ["c" * 32, k0, "a" * 32, "c" * 32, k1]) == ["c" * 32, "a" * 32]


def test_present_is_cached_until_refresh(tmp_path, payloads):
    reader = open_store(str(tmp_path))
    assert reader.present("vae") == set()
    write(open_store(str(tmp_path)), payloads)

    assert reader.present("vae") == set()
    reader.refresh()
    assert reader.present("vae") == set(payloads)


def test_a_failing_run_keeps_the_items_it_finished_drops_the_half_made_one_and_reraises(tmp_path, payloads):
    store = open_store(str(tmp_path))
    keys = list(payloads)
    with pytest.raises(RuntimeError, match="boom"):
        with store.writer("vae") as w:
            for key in keys[:3]:
                w.add(key, FIELD, payloads[key])  # finished by the next item's first add
            w.add(keys[3], FIELD, payloads[keys[3]])
            w.end_item()
            w.add(keys[4], FIELD, payloads[keys[4]])  # its second field never comes
            raise RuntimeError("boom")

    store.refresh()
    assert store.present("vae") == set(keys[:4])
    assert store.missing("vae", keys) == keys[4:]
    assert store.read("vae", keys[4], FIELD) is None
    assert store.verify() == []


def test_a_writer_without_items_writes_nothing(tmp_path):
    store = open_store(str(tmp_path))
    with store.writer("vae") as w:
        pass

    assert w.shard_ids == []
    assert not (tmp_path / "shards").exists() and not (tmp_path / "index").exists()


def test_item_keys_that_would_break_webdataset_are_refused(tmp_path):
    store = open_store(str(tmp_path))
    with store.writer("vae") as w:
        with pytest.raises(StoreError, match="item key"):
            w.add("a.b", FIELD, b"x")
        with pytest.raises(StoreError, match="field"):
            w.add("ab" * 16, "sub/dir", b"x")
        with pytest.raises(StoreError, match="item key"):
            w.add("ab", FIELD, b"x")  # not an xxh3-128 hex digest: readers would refuse its fragment
        w.add("ab" * 16, FIELD, b"x")
        w.add("cd" * 16, FIELD, b"x")
        with pytest.raises(StoreError, match="added again"):
            w.add("ab" * 16, "json", b"{}")
    with pytest.raises(StoreError, match="stage name"):
        store.present("../etc")


def test_another_format_or_a_foreign_directory_is_refused(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "FORMAT").write_text("sdxlpipe-store 0\n")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")

    with pytest.raises(StoreError) as wrong:
        open_store(str(tmp_path / "old"))
    with pytest.raises(StoreError, match="not an sdxlpipe store"):
        open_store(str(tmp_path / "home"))
    with pytest.raises(StoreError, match="does not exist"):
        open_store(str(tmp_path / "new"), create=False)

    assert "sdxlpipe-store 0" in wrong.value.what and str(tmp_path / "old") in wrong.value.what
    assert wrong.value.hint
    assert not (Path(tmp_path / "home") / "FORMAT").exists()


def test_a_chunk_of_chunk_size_items_fills_one_shard(tmp_path):
    # The encode stages size each chunk of work with chunk_size, so that it becomes one shard.
    store = open_store(str(tmp_path))
    store.shard_bytes = 64 * 1024
    for size in (100, 3000, 20_000, 100_000):
        n = store.chunk_size(size)
        items = {f"{size:016x}{i:016x}": bytes([i % 256]) * size for i in range(n)}
        (shard_id,) = write(store, items)
        tar_bytes = (tmp_path / "shards" / "vae" / f"{shard_id}.tar").stat().st_size
        assert tar_bytes > store.shard_bytes // 2 or n == 1  # and not a wastefully small one


def test_a_local_store_builds_a_shard_in_tmp_and_renames_it_into_place(tmp_path, payloads):
    store = open_store(str(tmp_path))
    key = sorted(payloads)[0]
    with store.writer("vae") as w:
        w.add(key, FIELD, payloads[key])
        w.end_item()
        (part,) = (tmp_path / "tmp").iterdir()  # the unfinished shard: in tmp/, never under shards/
        assert part.name.endswith(".tar.part") and not (tmp_path / "shards" / "vae").exists()
        inode = part.stat().st_ino
    (shard_id,) = w.shard_ids
    assert (tmp_path / "shards" / "vae" / f"{shard_id}.tar").stat().st_ino == inode  # renamed, not copied
    assert list((tmp_path / "tmp").iterdir()) == []
