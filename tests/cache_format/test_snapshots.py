"""Published datasets in the store: a content-named snapshot plus a named ref, read without listing,
refused when crafted, kept by gc while published."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import xxhash

from sdxlpipe.cache_format import StoreError, encode_json, open_store
from sdxlpipe.cache_format.grammar import GROUPED_SCHEMA, table_bytes

LATENT, TEXT = "latent.safetensors", "text.safetensors"
COLUMNS = {"vae_encode": ("latent_key", "latent_flip_key"), "text_encode": ("text_key", "text_variant_keys", "empty_text_key")}


def _key(i: int, salt: str) -> str:
    return xxhash.xxh3_128_hexdigest(f"{salt}{i}".encode())


def dataset(root: Path, n: int = 6) -> tuple:
    """A store holding n latents and n+1 texts, and the samples table that names them."""
    store = open_store(str(root))
    latents = {_key(i, "latent"): os.urandom(200 + i) for i in range(n)}
    texts = {_key(i, "text"): os.urandom(100 + i) for i in range(n + 1)}
    with store.writer("vae_encode", group="vae:x") as w:
        for k, v in latents.items():
            w.add(k, LATENT, v)
    with store.writer("text_encode") as w:
        for k, v in texts.items():
            w.add(k, TEXT, v)
    lkeys, tkeys = list(latents), list(texts)
    samples = pa.table({
        "key": [f"{i:016x}" for i in range(n)], "caption": [f"caption {i}" for i in range(n)],
        "bucket_w": [64] * n, "bucket_h": [64 if i % 2 else 96 for i in range(n)],
        "latent_key": lkeys, "latent_flip_key": pa.array([None] * n, pa.string()),
        "text_key": tkeys[:n], "text_variant_keys": [[k] for k in tkeys[:n]], "empty_text_key": [tkeys[n]] * n,
    })
    return store, samples, latents, texts


def publish(store, samples, name="cats"):
    items = {}
    for stage, field in (("vae_encode", LATENT), ("text_encode", TEXT)):
        keys = [k for c in COLUMNS[stage] for v in samples.column(c).to_pylist()
                for k in (v if isinstance(v, list) else [v]) if k]
        rows, missing = store.locations_table(stage, sorted(set(keys)), field)
        assert missing == []
        items[stage] = (rows, field, COLUMNS[stage])
    return store.publish(name, samples, items, {"vae_encode": {"params": {}}}, {"config": "/a/sdxlpipe.toml"})


def test_a_published_dataset_reads_back_by_name_from_a_store_without_index_or_listing(tmp_path):
    store, samples, latents, texts = dataset(tmp_path / "a")
    snapshot, moved = publish(store, samples)
    assert moved
    # A copy of the store without any index fragment: the snapshot alone locates every item.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "index")
    reader = open_store(str(tmp_path / "b"), create=False, read_only=True)
    snap = reader.dataset("cats")
    assert snap.id == snapshot and snap.samples.equals(samples)
    for stage, rows in snap.items.items():
        reader.pin(stage, rows, f"{snap.id}-{stage}.parquet")
    assert dict(reader.read_many("vae_encode", latents, LATENT)) == latents
    assert dict(reader.read_many("text_encode", texts, TEXT)) == texts
    assert not (tmp_path / "b" / "index").exists(), "a read-only store writes nothing"
    assert reader.dataset(f"cats@{snapshot}").id == snapshot  # pinned: the ref is not even needed


def test_publishing_the_same_rows_again_writes_nothing_and_a_compaction_leaves_the_snapshot_valid(tmp_path):
    store, samples, latents, _ = dataset(tmp_path / "a")
    first, _ = publish(store, samples)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "a" / "datasets").rglob("*") if p.is_file()}
    assert publish(store, samples) == (first, False)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a" / "datasets").rglob("*") if p.is_file()} == before
    store.compact()  # replaces every fragment: the snapshot names shards, not fragments
    reader = open_store(str(tmp_path / "a"), create=False, read_only=True)
    snap = reader.dataset("cats")
    reader.pin("vae_encode", snap.items["vae_encode"], "x.parquet")
    assert dict(reader.read_many("vae_encode", latents, LATENT)) == latents
    changed = samples.set_column(1, "caption", pa.array(["new"] * samples.num_rows))
    second, moved = publish(store, changed)
    assert moved and second != first and open_store(str(tmp_path / "a")).dataset("cats").id == second


def test_gc_keeps_the_shards_a_published_snapshot_names_until_it_is_removed(tmp_path):
    store, samples, _, _ = dataset(tmp_path / "a")
    snapshot, _ = publish(store, samples)
    shutil.rmtree(tmp_path / "a" / "index")  # nothing but the snapshot references the shards now
    store = open_store(str(tmp_path / "a"))
    assert store.gc(grace_seconds=0) == []
    assert len(list((tmp_path / "a" / "shards").rglob("*.tar"))) == 2
    assert store.datasets() == ["cats"]
    assert store.remove_dataset("cats")["snapshot"] == snapshot
    removed = store.gc(grace_seconds=0)
    assert {Path(p).suffix for p in removed} == {".tar", ".json", ".parquet"}
    assert not list((tmp_path / "a" / "shards").rglob("*.tar"))
    assert not list((tmp_path / "a" / "datasets" / "snapshots").iterdir())


def _craft(root: Path, samples: pa.Table, items: dict[str, pa.Table], name: str = "evil") -> str:
    """A snapshot and ref written by hand, hashes consistent, contents as given."""
    directory = root / "datasets" / "snapshots"
    directory.mkdir(parents=True, exist_ok=True)

    def put(table):
        data = table_bytes(table)
        digest = xxhash.xxh3_128_hexdigest(data)
        (directory / f"{digest}.parquet").write_bytes(data)
        return {"xxh3": digest, "bytes": len(data), "rows": table.num_rows}

    fields = {"vae_encode": LATENT, "text_encode": TEXT}
    manifest = {"format": 1, "samples": put(samples), "settings": {}, "summary": {},
                "items": {s: {**put(t), "field": fields[s], "columns": list(COLUMNS[s])} for s, t in items.items()}}
    data = encode_json(manifest)
    snapshot = xxhash.xxh3_128_hexdigest(data)
    (directory / f"{snapshot}.json").write_bytes(data)
    (root / "datasets" / "refs").mkdir(parents=True, exist_ok=True)
    (root / "datasets" / "refs" / f"{name}.json").write_bytes(
        encode_json({"format": 1, "name": name, "snapshot": snapshot, "published": 0}))
    return snapshot


def test_a_crafted_snapshot_is_refused_whole_like_a_crafted_index(tmp_path):
    store, samples, _, _ = dataset(tmp_path / "a")
    snapshot, _ = publish(store, samples)
    snap = store.dataset("cats")
    rows = snap.items["vae_encode"]
    walking = rows.set_column(rows.column_names.index("shard_id"), "shard_id",
                              pa.array(["../../../../etc/passwd"] * rows.num_rows))
    _craft(tmp_path / "a", samples, {"vae_encode": walking, "text_encode": snap.items["text_encode"]})
    with pytest.raises(StoreError, match="shard_id"):
        store.dataset("evil")

    # A sample naming an item the snapshot does not locate could read outside it.
    stray = samples.set_column(samples.column_names.index("latent_key"), "latent_key",
                               pa.array([_key(99, "x")] * samples.num_rows))
    _craft(tmp_path / "a", stray, dict(snap.items))
    with pytest.raises(StoreError, match="not among its items"):
        store.dataset("evil")

    # Bytes changed after publishing: the file no longer hashes to its name.
    table = tmp_path / "a" / "datasets" / "snapshots" / f"{snap.manifest['samples']['xxh3']}.parquet"
    table.write_bytes(table.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(StoreError, match="bad checksum"):
        store.dataset("cats")
    manifest = tmp_path / "a" / "datasets" / "snapshots" / f"{snapshot}.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"format":1', b'"format":1 '))
    with pytest.raises(StoreError, match="bad checksum"):
        store.dataset(f"cats@{snapshot}")

    for spec in ("../cats", "cats/x", f"cats@{'z' * 32}", ""):
        with pytest.raises(StoreError):
            store.dataset(spec)
    ref = tmp_path / "a" / "datasets" / "refs" / "cats.json"
    ref.write_bytes(encode_json({"format": 1, "name": "cats", "snapshot": "../../../FORMAT", "published": 0}))
    with pytest.raises(StoreError, match="snapshot id"):
        store.dataset("cats")


def test_a_snapshot_lists_the_items_whose_shards_are_gone(tmp_path):
    from sdxlpipe.cache_format.snapshots import missing_shards

    store, samples, latents, _ = dataset(tmp_path / "a")
    publish(store, samples)
    snap = store.dataset("cats")
    assert missing_shards(store, snap) == {}
    for tar in (tmp_path / "a" / "shards" / "vae_encode").glob("*.tar"):
        tar.unlink()
    assert missing_shards(store, snap) == {"vae_encode": (len(latents), 1)}


def test_push_copies_a_published_dataset_after_the_shards_it_names(tmp_path):
    store, samples, latents, _ = dataset(tmp_path / "a")
    snapshot, _ = publish(store, samples)
    target = open_store(str(tmp_path / "b"))
    store.copy_missing_to(target)
    assert store.copy_datasets_to(target) == {"copied": ["cats"], "left": {}}
    reader = open_store(str(tmp_path / "b"), create=False, read_only=True)
    snap = reader.dataset("cats")
    assert snap.id == snapshot
    reader.pin("vae_encode", snap.items["vae_encode"], "x.parquet")
    assert dict(reader.read_many("vae_encode", latents, LATENT)) == latents

    # A copy that lacks a shard the snapshot names does not get the dataset (it would not train).
    lacking = open_store(str(tmp_path / "c"))
    store.copy_missing_to(lacking)
    for tar in (tmp_path / "c" / "shards" / "text_encode").glob("*.tar"):
        tar.unlink()
    result = store.copy_datasets_to(lacking)
    assert result["copied"] == [] and "text_encode" in result["left"]["cats"]
    assert lacking.datasets() == []
