"""A blip on the store's disk or network is retried or reported; it never marks an item bad."""

from pathlib import Path

import pytest

from sdxlpipe.cache_format import StoreError, open_store

from .conftest import FaultyFS

FIELD = "latent.safetensors"


def _filled(tmp_path: Path, payloads: dict) -> str:
    store = open_store(str(tmp_path / "store"))
    with store.writer("vae") as w:
        for key, payload in payloads.items():
            w.add(key, FIELD, payload)
    return str(tmp_path / "store")


def _faulty(root: str, **faults):
    store = open_store(root)
    store.fs = FaultyFS(**faults)
    store.read_retry_delays = (0.01, 0.01, 0.01)
    return store


def _bad_markers(root: str) -> list[Path]:
    return sorted(Path(root, "index").rglob("bad-*.parquet"))


def test_a_few_failed_opens_and_reads_are_retried_and_every_item_comes_back(tmp_path, payloads):
    root = _filled(tmp_path, payloads)
    store = _faulty(root, fail_opens=2, fail_reads=1)

    assert dict(store.read_many("vae", payloads, FIELD)) == payloads
    store.fs.fail_opens, store.fs.fail_reads = 2, 1
    first = next(iter(payloads))
    assert store.read("vae", first, FIELD) == payloads[first]

    assert _bad_markers(root) == []
    assert open_store(root).present("vae") == set(payloads)


def test_a_store_that_keeps_failing_raises_naming_the_shard_and_marks_nothing_bad(tmp_path, payloads):
    root = _filled(tmp_path, payloads)
    store = _faulty(root, fail_opens=100)
    shard = next(Path(root, "shards", "vae").glob("*.tar"))

    with pytest.raises(StoreError, match=shard.name) as raised:
        dict(store.read_many("vae", payloads, FIELD))
    assert "nothing was marked bad" in str(raised.value)
    with pytest.raises(StoreError, match=shard.name):
        store.read("vae", next(iter(payloads)), FIELD)

    assert _bad_markers(root) == []
    healthy = open_store(root)
    assert healthy.present("vae") == set(payloads)
    assert dict(healthy.read_many("vae", payloads, FIELD)) == payloads
    assert healthy.verify() == [] and healthy.gc(grace_seconds=0) == []


def test_a_read_failing_mid_shard_reopens_it_and_loses_nothing(tmp_path, payloads):
    root = _filled(tmp_path, payloads)
    store = _faulty(root, fail_reads=3)

    assert dict(store.read_many("vae", payloads, FIELD)) == payloads
    assert store.fs.shard_opens == 4  # the first open, then one reopen per failed read
    assert _bad_markers(root) == []


def test_verify_on_a_failing_store_raises_naming_the_shard_and_marks_nothing_bad(tmp_path, payloads):
    root = _filled(tmp_path, payloads)
    store = _faulty(root, fail_reads=100)
    shard = next(Path(root, "shards", "vae").glob("*.tar"))

    with pytest.raises(StoreError, match=shard.name):
        store.verify()

    assert _bad_markers(root) == []
    assert open_store(root).verify() == []
