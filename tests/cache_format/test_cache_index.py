"""The index at scale: cached fragments, incremental refresh, vectorised lookups, hostile rows."""

import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdxlpipe.cache_format import open_store

FIELD = "latent.safetensors"


def write(store, items: dict[str, bytes], stage: str = "vae") -> None:
    with store.writer(stage) as w:
        for key, payload in items.items():
            w.add(key, FIELD, payload)


def test_a_refresh_after_another_writers_commit_reads_only_the_new_fragment(tmp_path, payloads):
    keys = sorted(payloads)
    reader = open_store(str(tmp_path))
    for key in keys[:5]:  # five fragments, one per shard
        write(open_store(str(tmp_path)), {key: payloads[key]})
    assert reader.missing("vae", keys) == keys[5:]
    index = reader._index("vae")
    assert index.reads == 5

    write(open_store(str(tmp_path)), {keys[5]: payloads[keys[5]]})
    assert reader.missing("vae", keys) == keys[5:]  # cached until refresh
    reader.refresh()
    assert reader.missing("vae", keys) == keys[6:]
    assert index.reads == 6  # the one new fragment, not all six again
    assert reader.read("vae", keys[5], FIELD) == payloads[keys[5]]


def test_a_writers_own_commit_is_seen_without_reading_it_back(tmp_path, payloads):
    store = open_store(str(tmp_path))
    keys = sorted(payloads)
    assert store.missing("vae", keys) == keys
    write(store, {k: payloads[k] for k in keys[:4]})
    assert store.missing("vae", keys) == keys[4:]
    assert store._index("vae").reads == 0


def test_lookups_agree_with_locations_across_many_fragments(tmp_path, payloads):
    keys = sorted(payloads)
    store = open_store(str(tmp_path))
    for key in keys[:8]:
        write(store, {key: payloads[key]})
    store.refresh()
    absent = ["f" * 32, "not-a-key", keys[9]]
    assert store.missing("vae", keys + absent) == keys[8:] + ["f" * 32, "not-a-key"]
    located = store.locate("vae", keys[:8] + absent, FIELD)
    assert [l.item_key for l in located[:8]] == keys[:8] and located[8:] == [None, None, None]
    for loc in located[:8]:
        with open(tmp_path / "shards" / "vae" / f"{loc.shard_id}.tar", "rb") as f:
            f.seek(loc.offset)
            assert f.read(loc.length) == payloads[loc.item_key]


def _forge(tmp_path, name: str, **column) -> None:
    """An index fragment whose first row has the given column values."""
    good = pq.read_table(next((tmp_path / "index" / "vae").glob("*.parquet")))
    rows = good.to_pylist()
    rows[0].update(column)
    pq.write_table(pa.Table.from_pylist(rows, schema=good.schema), tmp_path / "index" / "vae" / name)


def test_a_fragment_with_a_row_outside_the_grammar_is_refused_whole(tmp_path, payloads, caplog):
    keys = sorted(payloads)
    write(open_store(str(tmp_path)), {k: payloads[k] for k in keys[:3]})
    hostile = {
        "path.parquet": {"shard_id": "../../../../etc/passwd"},
        "key.parquet": {"item_key": keys[7][:-1] + "/"},
        "field.parquet": {"field": "../x"},
        "offset.parquet": {"offset": -5},
        "upper.parquet": {"item_key": keys[8].upper()},
    }
    for name, column in hostile.items():
        _forge(tmp_path, name, **column)
    with caplog.at_level(logging.WARNING, "sdxlpipe.store"):
        store = open_store(str(tmp_path))
        assert store.missing("vae", keys) == keys[3:]
    for name in hostile:
        assert any(name in r.getMessage() and "refused" in r.getMessage() for r in caplog.records), name
    index = store._index("vae")
    assert sorted(index.unreadable) == sorted(hostile)
    assert {loc.shard_id for loc in index.rows} == {loc.shard_id for loc in store.locate("vae", keys[:3], FIELD)}
    assert all(".." not in loc.shard_id and "/" not in loc.field for loc in index.rows)
    # Refused once per file: a refresh does not read (or warn about) the same bytes again.
    caplog.clear()
    reads = index.reads
    store.refresh()
    store.missing("vae", keys)
    assert index.reads == reads and not caplog.records


def test_bad_markers_from_one_store_go_into_one_file(tmp_path, payloads):
    keys = sorted(payloads)
    store = open_store(str(tmp_path))
    for key in keys[:4]:
        write(store, {key: payloads[key]})
    for shard in (tmp_path / "shards" / "vae").glob("*.tar"):
        shard.unlink()
    for key in keys[:4]:
        assert store.read("vae", key, FIELD) is None
    markers = list((tmp_path / "index" / "vae").glob("bad-*.parquet"))
    assert len(markers) == 1 and pq.read_table(markers[0]).num_rows == 4
    assert open_store(str(tmp_path)).damaged("vae", keys) == keys[:4]


def test_housekeeping_compacts_past_the_threshold_and_keeps_a_later_commit(tmp_path, payloads):
    keys = sorted(payloads)
    a, b = open_store(str(tmp_path)), open_store(str(tmp_path))
    for key in keys[:6]:
        write(a, {key: payloads[key]})
    assert a.housekeep("vae", max_fragments=6) is None  # at the threshold: nothing to do
    a.refresh()
    a.missing("vae", keys)  # a lists the stage ...
    write(b, {keys[6]: payloads[keys[6]]})  # ... then b commits, unseen by a
    result = a.housekeep("vae", max_fragments=4)
    assert result["fragments_before"] == 6 and result["fragments_after"] == 1
    names = sorted(p.name for p in (tmp_path / "index" / "vae").glob("*.parquet"))
    assert len(names) == 2 and any(n.startswith("compact-") for n in names)  # merged + b's
    fresh = open_store(str(tmp_path))
    assert fresh.missing("vae", keys) == keys[7:]
    assert all(fresh.read("vae", k, FIELD) == payloads[k] for k in keys[:7])
    a.refresh()
    assert a.missing("vae", keys) == keys[7:]


WRITER = """
import sys
from sdxlpipe.cache_format import open_store
store = open_store(sys.argv[1])
for i in range(20):
    with store.writer("vae") as w:
        w.add(f"{i:032x}", "latent.safetensors", bytes([i]) * 500)
"""


@pytest.mark.slow  # ~12 s on the shared 2-core machine: a second process commits 20 shards
def test_auto_compaction_beside_a_concurrent_writer_loses_nothing(tmp_path):
    import os
    import subprocess
    import sys
    import time

    store = open_store(str(tmp_path))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], env=env)
    compactions = 0
    while writer.poll() is None or compactions == 0:
        store.refresh()
        store.missing("vae", [])
        compactions += store.housekeep("vae", max_fragments=2) is not None
        time.sleep(0.02)
    assert writer.wait() == 0
    keys = [f"{i:032x}" for i in range(20)]
    fresh = open_store(str(tmp_path))
    assert fresh.missing("vae", keys) == []
    assert all(fresh.read("vae", k, FIELD) == bytes([i]) * 500 for i, k in enumerate(keys))
    assert compactions >= 1


def test_housekeeping_leaves_the_big_fragment_and_merges_the_small_ones(tmp_path, payloads):
    keys = sorted(payloads)
    store = open_store(str(tmp_path))
    write(store, {k: payloads[k] for k in keys[:6]})  # one fragment of six rows
    big = {p.name for p in (tmp_path / "index" / "vae").glob("*.parquet")}
    for key in keys[6:9]:
        write(store, {key: payloads[key]})
    store.refresh()
    result = store.housekeep("vae", max_fragments=2)
    assert result["fragments_before"] == 4 and result["fragments_after"] == 2 and result["rows_after"] == 9
    names = {p.name for p in (tmp_path / "index" / "vae").glob("*.parquet")}
    assert big < names and len(names) == 2  # the big one untouched, the three small ones merged
    for reader in (store, open_store(str(tmp_path))):
        assert reader.missing("vae", keys) == keys[9:]
        assert all(reader.read("vae", k, FIELD) == payloads[k] for k in keys[:9])

    write(store, {keys[9]: payloads[keys[9]]})  # with a bad marker, everything is merged
    store.refresh()
    (tmp_path / "shards" / "vae" / f"{store.locate('vae', [keys[9]], FIELD)[0].shard_id}.tar").unlink()
    assert store.read("vae", keys[9], FIELD) is None  # writes a bad marker
    assert store.housekeep("vae", max_fragments=2)["fragments_after"] == 1
    assert [p.name.startswith("compact-") for p in (tmp_path / "index" / "vae").glob("*.parquet")] == [True]
    assert open_store(str(tmp_path)).missing("vae", keys) == keys[9:]
