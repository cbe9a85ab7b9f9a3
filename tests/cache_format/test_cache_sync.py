"""store push/pull: copy what the other side lacks, verified."""

from __future__ import annotations

from sdxlpipe.cache_format import open_store

FIELD = "latent.safetensors"


def write(store, items, stage="vae"):
    with store.writer(stage) as w:
        for key, payload in items.items():
            w.add(key, FIELD, payload)
    return w.shard_ids


def test_pull_copies_only_what_is_missing_and_the_copy_verifies(tmp_path, payloads):
    src, dst = open_store(str(tmp_path / "a")), open_store("memory://sync-test-dst")
    keys = list(payloads)
    write(src, {k: payloads[k] for k in keys[:5]})
    write(src, {k: payloads[k] for k in keys[5:]})
    write(dst, {k: payloads[k] for k in keys[:5]})
    report = src.copy_missing_to(dst)
    assert report["vae"]["shards"] == 1 and report["vae"]["items"] == 5
    assert dst.present("vae") == set(keys)
    assert dict(dst.read_many("vae", keys, FIELD)) == payloads
    assert dst.verify() == []
    assert src.copy_missing_to(dst)["vae"]["items"] == 0  # nothing left to copy


def test_a_damaged_shard_is_not_copied_as_is_and_its_bad_items_are_named(tmp_path, payloads):
    src, dst = open_store(str(tmp_path / "a")), open_store(str(tmp_path / "b"))
    (shard_id,) = write(src, payloads)
    victim = sorted(payloads)[2]
    loc = next(l for l in src.locations("vae") if l.item_key == victim)
    path = tmp_path / "a" / "shards" / "vae" / f"{shard_id}.tar"
    data = bytearray(path.read_bytes())
    data[loc.offset] ^= 0xFF
    path.write_bytes(bytes(data))
    report = src.copy_missing_to(dst)
    assert report["vae"]["damaged"] == [victim]
    assert dst.present("vae") == set(payloads) - {victim}
    assert dst.verify() == []


def test_a_manifest_that_is_not_a_json_object_is_reported_and_rebuilt_on_pull(tmp_path, payloads):
    src, dst = open_store(str(tmp_path / "a")), open_store(str(tmp_path / "b"))
    (shard_id,) = write(src, payloads)
    (tmp_path / "a" / "shards" / "vae" / f"{shard_id}.json").write_text("[1, 2]")  # from a hostile store
    assert [p["problem"] for p in src.verify()] == ["manifest unreadable: manifest of shard "
                                                    f"{shard_id} is a JSON list, not an object"]
    assert src.copy_missing_to(dst)["vae"]["shards"] == 1
    assert dst.verify() == [] and dict(dst.read_many("vae", list(payloads), FIELD)) == payloads
