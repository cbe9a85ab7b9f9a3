"""Flipped bits and truncation in shards and index fragments: found, named, recomputed."""

import random
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sdxlpipe.cache_format import open_store
from sdxlpipe.cache_format.grammar import GROUPED_SCHEMA, to_parquet

FIELD = "latent.safetensors"


def _write(store, payloads):
    with store.writer("vae", target_shard_bytes=4096) as w:
        for key, payload in payloads.items():
            w.add(key, FIELD, payload)
    return w.shard_ids


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_truncated_fragment_is_named_and_its_items_are_recomputed(tmp_path, payloads, caplog):
    root = tmp_path / "store"
    first, *_ = _write(open_store(str(root)), payloads)
    fragment = root / "index" / "vae" / f"{first}.parquet"
    fragment.write_bytes(fragment.read_bytes()[:-40])

    store = open_store(str(root))
    lost = store.missing("vae", payloads)
    assert lost and fragment.name in caplog.text
    assert any(fragment.name in p["problem"] for p in store.verify())

    _write(store, {k: payloads[k] for k in lost})
    store.refresh()
    assert store.missing("vae", payloads) == []
    assert dict(store.read_many("vae", payloads, FIELD)) == payloads


def test_a_flipped_bit_anywhere_in_a_fragment_never_serves_wrong_bytes(tmp_path, payloads):
    root = tmp_path / "store"
    first, *_ = _write(open_store(str(root)), payloads)
    fragment = root / "index" / "vae" / f"{first}.parquet"
    intact = fragment.read_bytes()
    shutil.copytree(root, tmp_path / "intact")
    for at in random.Random(12).sample(range(len(intact)), 24):
        shutil.rmtree(root)
        shutil.copytree(tmp_path / "intact", root)
        _flip(fragment, at)
        store = open_store(str(root))
        got = dict(store.read_many("vae", payloads, FIELD))
        assert all(data in (None, payloads[key]) for key, data in got.items()), at
        lost = store.missing("vae", payloads)
        _write(store, {k: payloads[k] for k in lost})  # what a rerun recomputes
        store.refresh()
        assert dict(store.read_many("vae", payloads, FIELD)) == payloads, at


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_shard_loses_only_the_items_it_touches_and_names_them(tmp_path, payloads, damage):
    root = tmp_path / "store"
    first, *_ = _write(open_store(str(root)), payloads)
    shard = root / "shards" / "vae" / f"{first}.tar"
    store = open_store(str(root))
    in_shard = sorted(loc.item_key for loc in store._index("vae").rows if loc.shard_id == first)
    last = store.locate("vae", [in_shard[-1]], FIELD)[0]
    if damage == "flip":
        _flip(shard, last.offset + 1)  # inside the last item's payload only
    else:
        shard.write_bytes(shard.read_bytes()[:last.offset + 10])

    problems = store.verify()
    assert {p["item_key"] for p in problems if p["item_key"]} == {in_shard[-1]}
    store.refresh()
    assert store.missing("vae", payloads) == [in_shard[-1]]
    _write(store, {in_shard[-1]: payloads[in_shard[-1]]})
    store.refresh()
    assert dict(store.read_many("vae", payloads, FIELD)) == payloads
    assert store.verify() == []


@pytest.mark.parametrize("column", ["offset", "length"])
def test_a_flipped_bit_in_a_rows_offset_or_length_never_serves_wrong_bytes(tmp_path, payloads, column):
    root = tmp_path / "store"
    first, *_ = _write(open_store(str(root)), payloads)
    fragment = root / "index" / "vae" / f"{first}.parquet"
    table = pq.read_table(fragment).to_pydict()
    table[column] = [v ^ 0x40 for v in table[column]]  # the bit flipped after compression's check
    fragment.write_bytes(to_parquet(zip(*table.values()), GROUPED_SCHEMA))

    store = open_store(str(root))
    got = dict(store.read_many("vae", payloads, FIELD))
    assert all(got[key] in (None, payloads[key]) for key in payloads)
    lost = store.missing("vae", payloads)
    assert lost and set(lost) <= set(table["item_key"])  # (a row may still point at equal bytes)
    _write(store, {k: payloads[k] for k in lost})
    store.refresh()
    assert dict(store.read_many("vae", payloads, FIELD)) == payloads
