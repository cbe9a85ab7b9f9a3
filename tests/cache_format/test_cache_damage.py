"""Damage and upkeep: bad bytes become missing items, verify finds them, gc and compact tidy up."""

import logging
import os
import time

import pytest

from sdxlpipe.cache_format import StoreError, open_store

FIELD = "latent.safetensors"
HOUR = 3600


def write(store, items, stage="vae", **kw):
    with store.writer(stage, **kw) as w:
        for key, payload in items.items():
            w.add(key, FIELD, payload)
    return w.shard_ids


def location(store, key, stage="vae"):
    return next(loc for loc in store._index(stage).rows if loc.item_key == key)


def shard_path(root, shard_id, ext="tar", stage="vae"):
    return root / "shards" / stage / f"{shard_id}.{ext}"


def age(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_a_flipped_byte_loses_exactly_that_item_until_it_is_written_again(tmp_path, payloads, caplog):
    store = open_store(str(tmp_path))
    (shard_id,) = write(store, payloads)
    victim = list(payloads)[3]
    loc = location(store, victim)
    with open(shard_path(tmp_path, shard_id), "r+b") as f:
        f.seek(loc.offset + 10)
        byte = f.read(1)
        f.seek(loc.offset + 10)
        f.write(bytes([byte[0] ^ 0xFF]))

    with caplog.at_level(logging.WARNING, logger="sdxlpipe.store"):
        assert store.read("vae", victim) is None
    others = {k: store.read("vae", k) for k in payloads if k != victim}
    problems = store.verify()

    assert others == {k: v for k, v in payloads.items() if k != victim}
    assert victim in caplog.text and shard_id in caplog.text
    assert {(p["shard_id"], p["item_key"]) for p in problems} == {(shard_id, None), (shard_id, victim)}
    assert open_store(str(tmp_path)).missing("vae", payloads) == [victim]  # recorded on disk

    write(open_store(str(tmp_path)), {victim: payloads[victim]})
    again = open_store(str(tmp_path))

    assert again.present("vae") == set(payloads)
    assert again.read("vae", victim) == payloads[victim]


def test_a_truncated_shard_makes_its_items_missing(tmp_path, payloads):
    store = open_store(str(tmp_path))
    keys = list(payloads)
    first = write(store, {k: payloads[k] for k in keys[:5]})[0]
    write(store, {k: payloads[k] for k in keys[5:]})
    cut = location(store, keys[2]).offset + 5
    os.truncate(shard_path(tmp_path, first), cut)

    got = dict(store.read_many("vae", keys))

    assert {k for k, v in got.items() if v is None} == set(keys[2:5])
    assert {k: v for k, v in got.items() if v is not None} == {k: payloads[k] for k in keys[:2] + keys[5:]}
    assert open_store(str(tmp_path)).missing("vae", keys) == keys[2:5]
    assert {p["item_key"] for p in store.verify() if p["item_key"]} == set(keys[2:5])


def test_a_shard_rewritten_with_identical_bytes_is_present_again(tmp_path, payloads):
    store = open_store(str(tmp_path))
    (shard_id,) = write(store, payloads)
    os.truncate(shard_path(tmp_path, shard_id), 2000)
    assert store.verify() != []
    assert store.missing("vae", payloads) != []

    assert write(store, payloads) == [shard_id]  # recomputed deterministically: same name

    assert store.present("vae") == set(payloads)
    assert dict(store.read_many("vae", payloads)) == payloads
    store.compact()
    assert [p for p in store.verify() if p["item_key"]] == []


def test_a_missing_shard_falls_back_to_another_copy(tmp_path, payloads):
    store = open_store(str(tmp_path))
    (lost,) = write(store, payloads)
    write(store, dict(reversed(payloads.items())))  # the same items in another shard
    os.remove(shard_path(tmp_path, lost))

    assert dict(store.read_many("vae", payloads)) == payloads
    assert store.present("vae") == set(payloads)
    assert all(store._index("vae").is_bad(loc) for loc in store._index("vae").rows if loc.shard_id == lost)


def test_gc_removes_only_old_unreferenced_shards(tmp_path, payloads):
    store = open_store(str(tmp_path))
    keys = list(payloads)
    (kept,) = write(store, {k: payloads[k] for k in keys[:3]})
    (orphan_old,) = write(store, {k: payloads[k] for k in keys[3:6]})
    (orphan_young,) = write(store, {k: payloads[k] for k in keys[6:]})
    for orphan in (orphan_old, orphan_young):  # as if the writer died before indexing them
        os.remove(tmp_path / "index" / "vae" / f"{orphan}.parquet")
    for shard_id in (kept, orphan_old):
        age(shard_path(tmp_path, shard_id), 2 * HOUR)
        age(shard_path(tmp_path, shard_id, "json"), 2 * HOUR)
    (tmp_path / "tmp" / "shard-dead.tar.part").write_bytes(b"half")
    age(tmp_path / "tmp" / "shard-dead.tar.part", 2 * HOUR)
    expected = {
        str(shard_path(tmp_path, orphan_old)),
        str(shard_path(tmp_path, orphan_old, "json")),
        str(tmp_path / "tmp" / "shard-dead.tar.part"),
    }

    assert set(store.gc(dry_run=True)) == expected
    assert shard_path(tmp_path, orphan_old).exists()
    assert set(store.gc()) == expected

    assert not shard_path(tmp_path, orphan_old).exists()
    assert shard_path(tmp_path, orphan_young).exists() and shard_path(tmp_path, kept).exists()
    assert open_store(str(tmp_path)).present("vae") == set(keys[:3])
    assert store.gc() == []


def test_gc_refuses_to_run_when_a_fragment_is_unreadable(tmp_path, payloads):
    store = open_store(str(tmp_path))
    (shard_id,) = write(store, payloads)
    (tmp_path / "index" / "vae" / f"{shard_id}.parquet").write_bytes(b"not parquet")
    age(shard_path(tmp_path, shard_id), 2 * HOUR)

    with pytest.raises(StoreError, match="unreadable"):
        store.gc()
    assert shard_path(tmp_path, shard_id).exists()


def test_compact_leaves_one_fragment_and_the_same_readable_items(tmp_path, payloads):
    store = open_store(str(tmp_path))
    keys = list(payloads)
    write(store, payloads, target_shard_bytes=2048)
    write(store, {k: payloads[k] for k in keys[:4]})  # duplicates in a new shard
    victim = keys[8]
    os.remove(shard_path(tmp_path, location(store, victim).shard_id))
    assert store.read("vae", victim) is None
    before = {k: store.read("vae", k) for k in keys}

    result = store.compact("vae")
    after = open_store(str(tmp_path))

    assert list((tmp_path / "index" / "vae").iterdir()) == [
        p for p in (tmp_path / "index" / "vae").iterdir() if p.name.startswith("compact-")
    ]
    assert result["vae"]["fragments_after"] == 1
    assert result["vae"]["rows_after"] < result["vae"]["rows_before"]
    assert {k: after.read("vae", k) for k in keys} == before
    assert after.missing("vae", keys) == [victim]
    assert after.compact()["vae"]["fragments_after"] == 1  # nothing more to do


def test_du_counts_shards_items_and_bytes_per_stage(tmp_path, payloads):
    store = open_store(str(tmp_path))
    ids = write(store, payloads, target_shard_bytes=4096)
    write(store, dict(list(payloads.items())[:2]), stage="text")

    usage = store.du()

    assert usage["stages"]["vae"] == {
        "shards": len(ids),
        "items": len(payloads),
        "bytes": sum(shard_path(tmp_path, s).stat().st_size for s in ids),
        "groups": {"": sum(len(p) for p in payloads.values())},  # the writer named no fingerprint
    }
    assert usage["stages"]["text"]["items"] == 2
    assert usage["bytes"] == usage["stages"]["vae"]["bytes"] + usage["stages"]["text"]["bytes"]


def test_upkeep_works_on_a_memory_store(payloads):
    import uuid

    import fsspec

    url = f"memory://upkeep-{uuid.uuid4().hex}"
    store = open_store(url)
    keys = list(payloads)
    write(store, {k: payloads[k] for k in keys[:5]})
    (orphan,) = write(store, {k: payloads[k] for k in keys[5:]})
    fs = fsspec.filesystem("memory")
    fs.rm(f"{store.root}/index/vae/{orphan}.parquet")

    removed = store.gc(grace_seconds=0)
    store.refresh()

    assert sorted(p.rsplit("/", 1)[1] for p in removed) == [f"{orphan}.json", f"{orphan}.tar"]
    assert store.present("vae") == set(keys[:5])
    assert store.compact()["vae"]["fragments_after"] == 1
    assert dict(store.read_many("vae", keys[:5])) == {k: payloads[k] for k in keys[:5]}
    assert store.verify() == []
