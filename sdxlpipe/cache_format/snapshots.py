"""Published datasets: immutable, content-named snapshots of training-ready rows, and named refs.

README.md ("Published datasets") is the spec. A snapshot names everything a
training run reads: a samples table (one row per sample, the columns the
publisher chose) and, per store stage, the location of every item the
samples name (shard id, offset, length, xxh3: the index grammar's rows).
Shards are immutable and named by their bytes, so a snapshot stays valid
whatever happens to the index fragments (`store compact` replaces them),
and a reader needs no listing: the ref names the snapshot, the snapshot
names its tables and the shards. Every file of a snapshot is named by the
xxh3 of its bytes and read back against that name; every row is checked
against the grammar before any of it names a path, as a store from
elsewhere is untrusted input. The ref is the one mutable file: rewritten
whole (temp, rename) after every file it names is in place, so it is the
commit point. Imports no torch and nothing of sdxlpipe outside this package.
"""

from __future__ import annotations

import posixpath
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import xxhash

from .codec import decode_json, encode_json
from .grammar import check_rows, dict_codes, hex_column, is_key, keys_array, plain_name, prepare, read_parquet_bytes, table_bytes
from .listing import list_files
from .shards import StoreError, check_stage, is_http, is_local, write_bytes

if TYPE_CHECKING:
    from .store import Store

FORMAT = 1
DATASETS = "datasets"
# A dataset name: what a person types after `dataset show`; never a path.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
# `name@<snapshot id>` pins a dataset source to one snapshot.
PIN = "@"
# Bounds on what is read before it is checked: a ref is a few hundred bytes, a manifest a few KB
# (settings and a bucket histogram); anything far larger is not one.
MAX_REF_BYTES = 64 << 10
MAX_MANIFEST_BYTES = 16 << 20
# An item longer than this is no latent or text embedding (SDXL's largest are ~1 MB); a crafted
# length must not make a reader allocate it.
MAX_ITEM_BYTES = 1 << 30
HINT_FOREIGN = ("the store's datasets/ folder is damaged or was crafted; publish the dataset again "
                "(`sdxlpipe run encode` on the machine that has its images) or ask whoever serves the store")


@dataclass(frozen=True)
class Snapshot:
    """A verified snapshot: its id, manifest, samples, and per stage its item locations (GROUPED_SCHEMA)."""

    id: str
    manifest: dict
    samples: pa.Table
    items: dict[str, pa.Table]
    ref: dict  # the ref it was reached through ({} when opened by id alone)

    def key_columns(self, stage: str) -> tuple[str, ...]:
        return tuple(self.manifest["items"][stage]["columns"])

    def field(self, stage: str) -> str:
        return self.manifest["items"][stage]["field"]


def check_name(name: str, where: str = "dataset name") -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise StoreError(f"{where} {name!r} is not a dataset name",
                         "use 1-100 letters, digits, '_', '-' and '.', starting with a letter or digit")
    return name


def parse_spec(spec: str) -> tuple[str, str | None]:
    """`name` or `name@<snapshot id>` -> (name, id or None)."""
    name, _, pinned = spec.partition(PIN)
    check_name(name)
    if _ and not is_key(pinned):
        raise StoreError(f"dataset {spec!r}: {pinned!r} is not a snapshot id",
                         "a snapshot id is the 32 lowercase hex digits `sdxlpipe dataset show NAME` prints")
    return name, pinned or None


def _ref_path(store: Store, name: str) -> str:
    return store._path(DATASETS, "refs", f"{check_name(name)}.json")


def _snapshot_path(store: Store, file_name: str) -> str:
    return store._path(DATASETS, "snapshots", file_name)


# -- writing --------------------------------------------------------------------------------------

def publish(store: Store, name: str, samples: pa.Table, items: dict[str, tuple[pa.Table, str, tuple[str, ...]]],
            settings: dict, about: dict) -> tuple[str, bool]:
    """Write a snapshot of `samples` and the item locations, then point `name` at it.

    items: stage -> (GROUPED_SCHEMA rows, the field they are, the samples' columns holding
    that stage's keys). settings: what made the rows (stage params, model fingerprints);
    about: the ref's free fields (config, model). Returns (snapshot id, whether the ref moved).
    The same rows give the same bytes, so an unchanged dataset writes nothing.
    """
    check_name(name)
    files: dict[str, bytes] = {}

    def add(table: pa.Table) -> dict:
        data = table_bytes(table)
        digest = xxhash.xxh3_128_hexdigest(data)
        files[f"{digest}.parquet"] = data
        return {"xxh3": digest, "bytes": len(data), "rows": table.num_rows}

    manifest = {
        "format": FORMAT, "samples": add(samples),
        "items": {stage: {**add(rows), "field": field, "columns": list(columns)}
                  for stage, (rows, field, columns) in sorted(items.items())},
        "settings": settings, "summary": _summary(samples, items),
    }
    data = encode_json(manifest)
    snapshot = xxhash.xxh3_128_hexdigest(data)
    current = _read_ref(store, name, missing_ok=True)
    if current and current.get("snapshot") == snapshot and store.fs.exists(_snapshot_path(store, f"{snapshot}.json")):
        return snapshot, False
    # Content-named files are written again even when present: a fresh time keeps them from a
    # gc that found them unreferenced a moment ago (gc re-checks age right before deleting).
    for file_name, payload in files.items():
        write_bytes(store.fs, _snapshot_path(store, file_name), payload, store._tmp)
    write_bytes(store.fs, _snapshot_path(store, f"{snapshot}.json"), data, store._tmp)
    ref = {"format": FORMAT, "name": name, "snapshot": snapshot, "published": int(time.time()), **about}
    write_bytes(store.fs, _ref_path(store, name), encode_json(ref), store._tmp)  # the commit point
    return snapshot, True


def _summary(samples: pa.Table, items: dict) -> dict:
    """What `dataset list|show` prints: samples, buckets, items, shards and payload bytes per stage."""
    buckets: dict[str, int] = {}
    if {"bucket_w", "bucket_h"} <= set(samples.column_names):
        for w, h in zip(samples.column("bucket_w").to_pylist(), samples.column("bucket_h").to_pylist()):
            buckets[f"{w}x{h}"] = buckets.get(f"{w}x{h}", 0) + 1
    stages = {}
    for stage, (rows, _, _) in items.items():
        shards = rows.column("shard_id")
        stages[stage] = {"items": rows.num_rows,
                         "shards": len(set(shards.to_pylist())) if rows.num_rows else 0,
                         "bytes": int(sum(rows.column("length").to_pylist()))}
    return {"samples": samples.num_rows, "buckets": dict(sorted(buckets.items())), "stages": stages}


def copy_to(snapshot: Snapshot, src: Store, dst: Store, name: str) -> None:
    """Write a verified snapshot of `src` into `dst`, bytes checked against their names again, then its ref."""
    entries = [snapshot.manifest["samples"], *snapshot.manifest["items"].values()]
    wanted = [(f"{e['xxh3']}.parquet", e["xxh3"]) for e in entries] + [(f"{snapshot.id}.json", snapshot.id)]
    for file_name, digest in wanted:  # the manifest last, the ref after it: the commit point
        data = src._retrying(f"snapshot file {file_name}", lambda: src.fs.cat_file(_snapshot_path(src, file_name)))
        if xxhash.xxh3_128_hexdigest(data) != digest:
            raise StoreError(f"snapshot file {_snapshot_path(src, file_name)} changed while it was copied", HINT_FOREIGN)
        write_bytes(dst.fs, _snapshot_path(dst, file_name), data, dst._tmp)
    write_bytes(dst.fs, _ref_path(dst, name), encode_json(snapshot.ref), dst._tmp)


def remove(store: Store, name: str) -> dict:
    """Delete the ref `name` (its snapshot and the shards only it kept become collectable by gc)."""
    if is_http(store.fs):
        raise StoreError(f"a store served over HTTP ({store.url}) is read-only",
                         "remove the dataset where the store's files are: `sdxlpipe dataset rm NAME --store PATH`")
    ref = _read_ref(store, name)
    store.fs.rm(_ref_path(store, name))
    return ref


# -- reading --------------------------------------------------------------------------------------

def _read_small(store: Store, path: str, limit: int, what: str) -> bytes:
    """A small file, refusing one longer than `limit` before holding it; FileNotFoundError passes."""
    def attempt() -> bytes:
        with store.fs.open(path, "rb", **({"block_size": 0} if is_http(store.fs) else {})) as f:
            return f.read(limit + 1)

    data = store._retrying(f"{what} {path}", attempt)
    if len(data) > limit:
        raise StoreError(f"{what} {path} is over {limit} bytes: not one sdxlpipe wrote", HINT_FOREIGN)
    return data


def _read_ref(store: Store, name: str, missing_ok: bool = False) -> dict | None:
    path = _ref_path(store, name)
    try:
        data = _read_small(store, path, MAX_REF_BYTES, "dataset ref")
    except FileNotFoundError:
        if missing_ok:
            return None
        raise StoreError(f"no dataset {name!r} in store {store.url} ({path} does not exist)",
                         "`sdxlpipe dataset list --store URL` lists the published datasets; "
                         "`sdxlpipe run encode` publishes the config's dataset") from None
    try:
        ref = decode_json(data)
    except ValueError as e:
        raise StoreError(f"dataset ref {path} is not JSON: {e}", HINT_FOREIGN) from e
    if (not isinstance(ref, dict) or ref.get("format") != FORMAT or ref.get("name") != name
            or not is_key(ref.get("snapshot"))):
        raise StoreError(f"dataset ref {path} is not a format-{FORMAT} ref naming a snapshot id", HINT_FOREIGN)
    return ref


def read_ref(store: Store, name: str) -> dict:
    """The ref `name`: {"format", "name", "snapshot", "published", "config", "model", ...}."""
    return _read_ref(store, name)


def open_snapshot(store: Store, spec: str) -> Snapshot:
    """The snapshot `name` means now, or `name@<id>` pins; verified whole, or StoreError naming the file."""
    name, pinned = parse_spec(spec)
    ref = {} if pinned else _read_ref(store, name)
    return read_snapshot(store, pinned or ref["snapshot"], ref)


def read_snapshot(store: Store, snapshot: str, ref: dict | None = None) -> Snapshot:
    """Read and check snapshot `snapshot` (its id): manifest, samples and item tables."""
    if not is_key(snapshot):
        raise StoreError(f"{snapshot!r} is not a snapshot id", HINT_FOREIGN)
    manifest = read_manifest(store, snapshot)
    samples = _read_table(store, manifest["samples"], "samples")
    items = {stage: _check_items(store, snapshot, stage, entry, _read_table(store, entry, f"{stage} items"))
             for stage, entry in manifest["items"].items()}
    _check_samples(store, snapshot, manifest, samples, items)
    return Snapshot(snapshot, manifest, samples, items, ref or {})


def read_manifest(store: Store, snapshot: str) -> dict:
    path = _snapshot_path(store, f"{snapshot}.json")
    try:
        data = _read_small(store, path, MAX_MANIFEST_BYTES, "snapshot manifest")
    except FileNotFoundError:
        raise StoreError(f"snapshot {snapshot} is not in store {store.url} ({path} does not exist)",
                         "publish the dataset again (`sdxlpipe run encode` where its images are), or name a "
                         "snapshot `sdxlpipe dataset show NAME` lists") from None
    if xxhash.xxh3_128_hexdigest(data) != snapshot:
        raise StoreError(f"snapshot manifest {path} does not hash to its name {snapshot} (bad checksum)", HINT_FOREIGN)
    try:
        manifest = decode_json(data)
    except ValueError as e:
        raise StoreError(f"snapshot manifest {path} is not JSON: {e}", HINT_FOREIGN) from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"snapshot manifest {path} is not format {FORMAT}",
                         "read it with the sdxlpipe version that published it, or publish it again")
    why = _manifest_problem(manifest)
    if why:
        raise StoreError(f"snapshot manifest {path}: {why}", HINT_FOREIGN)
    return manifest


def _manifest_problem(m: dict) -> str | None:
    def table_entry(e) -> bool:
        return (isinstance(e, dict) and is_key(e.get("xxh3")) and all(type(e.get(k)) is int and e[k] >= 0
                                                                      for k in ("bytes", "rows")))

    if not table_entry(m.get("samples")):
        return "`samples` does not name a table (xxh3, bytes, rows)"
    if not isinstance(m.get("items"), dict):
        return "`items` is not an object of stages"
    for stage, e in m["items"].items():
        if not (isinstance(stage, str) and stage and all(c.isalnum() or c in "_-" for c in stage)):
            return f"stage {stage!r} cannot name a store directory"
        if not table_entry(e) or not plain_name(e.get("field")) or not isinstance(e.get("columns"), list) \
                or not all(isinstance(c, str) for c in e["columns"]):
            return f"items of {stage} do not name a table (xxh3, bytes, rows, field, columns)"
    if not isinstance(m.get("settings"), dict) or not isinstance(m.get("summary"), dict):
        return "`settings` or `summary` is not an object"
    return None


def _read_table(store: Store, entry: dict, what: str) -> pa.Table:
    path = _snapshot_path(store, f"{entry['xxh3']}.parquet")
    try:
        data = store._retrying(f"snapshot file {path}", lambda: store.fs.cat_file(path))
    except FileNotFoundError:
        raise StoreError(f"the {what} table of a snapshot is missing from store {store.url}: {path}",
                         "publish the dataset again (`sdxlpipe run encode` where its images are)") from None
    if len(data) != entry["bytes"] or xxhash.xxh3_128_hexdigest(data) != entry["xxh3"]:
        raise StoreError(f"snapshot file {path} ({what}) does not hash to its name (bad checksum)", HINT_FOREIGN)
    try:
        table = read_parquet_bytes(data)
    except (OSError, pa.ArrowException) as e:
        raise StoreError(f"snapshot file {path} ({what}) is not parquet: {e}", HINT_FOREIGN) from e
    if table.num_rows != entry["rows"]:
        raise StoreError(f"snapshot file {path} ({what}) has {table.num_rows} rows, its manifest says {entry['rows']}",
                         HINT_FOREIGN)
    return table


def _check_items(store: Store, snapshot: str, stage: str, entry: dict, table: pa.Table) -> pa.Table:
    """The rows against the index grammar (README.md), one field, bounded lengths, each key once."""
    where = f"snapshot {snapshot} of store {store.url}, {stage} items"
    check_stage(stage)
    table, why = prepare(table)
    if why is None:
        ok, reasons = check_rows(table, np.zeros(table.num_rows, np.int32))
        why = reasons.get(0)
    if why is None:
        fields = table.column("field").combine_chunks()
        if table.num_rows and (len(fields.dictionary) != 1 or fields.dictionary[0].as_py() != entry["field"]):
            why = f"rows of another field than {entry['field']!r}"
    if why is None and table.num_rows and max(table.column("length").to_pylist()) > MAX_ITEM_BYTES:
        why = f"an item longer than {MAX_ITEM_BYTES} bytes"
    if why is None:
        keys = hex_column(table.column("item_key"))
        if len(np.unique(keys)) != len(keys):
            why = "a key located twice"
    if why is not None:
        raise StoreError(f"{where}: refused ({why})", HINT_FOREIGN)
    # Back to plain strings: `Store.pin` reads it like a fragment this process wrote.
    return pa.table({name: (table.column(name).cast(pa.string()) if pa.types.is_dictionary(table.schema.field(name).type)
                            else table.column(name)) for name in table.column_names})


def _check_samples(store: Store, snapshot: str, manifest: dict, samples: pa.Table, items: dict) -> None:
    """Every key a sample names is located by the snapshot (so no sample reads outside it)."""
    for stage, entry in manifest["items"].items():
        located = np.sort(hex_column(items[stage].column("item_key")))
        for column in entry["columns"]:
            if column not in samples.column_names:
                raise StoreError(f"snapshot {snapshot} of store {store.url}: samples lack column {column!r}, "
                                 f"which its manifest says holds {stage} keys", HINT_FOREIGN)
            keys = sample_keys(samples.column(column))
            if keys is None:
                raise StoreError(f"snapshot {snapshot} of store {store.url}: column {column} holds no item keys",
                                 HINT_FOREIGN)
            wanted = keys_array(keys)
            at = np.minimum(np.searchsorted(located, wanted), max(len(located) - 1, 0))
            absent = int((~((len(located) > 0) & (located[at] == wanted) & (wanted != b""))).sum()) if len(wanted) else 0
            if absent:
                raise StoreError(f"snapshot {snapshot} of store {store.url}: {absent} {stage} key(s) in column "
                                 f"{column} are not among its items (or are not item keys)", HINT_FOREIGN)


def sample_keys(column) -> list[str] | None:
    """The non-null keys a samples column holds (a string or list-of-strings column), or None."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        arr = arr.flatten()
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(pa.string())
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) or pa.types.is_null(arr.type)):
        return None
    return [k for k in arr.to_pylist() if k is not None]


# -- listing, gc ----------------------------------------------------------------------------------

def names(store: Store) -> list[str]:
    """The published dataset names (a listing: not over HTTP, where no listing is reliable)."""
    if is_http(store.fs):
        raise StoreError(f"a store served over HTTP ({store.url}) cannot be listed reliably",
                         "read one dataset by name: `sdxlpipe dataset show NAME --store URL`")
    return sorted(n[: -len(".json")] for n in list_files(store.fs, store._path(DATASETS, "refs"), ".json")
                  if NAME.fullmatch(n[: -len(".json")]))


def describe(store: Store, spec: str) -> dict:
    """One dataset (NAME, or NAME@SNAPSHOT) as `dataset list|show` and the report show it: its ref and its
    snapshot's manifest. The snapshot is verified whole: a broken dataset is a StoreError, not half-shown."""
    snapshot = open_snapshot(store, spec)
    name = spec.partition(PIN)[0]
    ref, manifest = snapshot.ref, snapshot.manifest
    if not ref:  # pinned: the ref tells when and from where, if it still names this snapshot
        try:
            current = read_ref(store, name)
            ref = current if current.get("snapshot") == snapshot.id else {}
        except StoreError:
            ref = {}
    return {
        "name": name, "snapshot": snapshot.id, "published": ref.get("published"),
        "config": ref.get("config"), "model": ref.get("model"), "vae": ref.get("vae"),
        "samples": manifest["summary"].get("samples"), "buckets": manifest["summary"].get("buckets", {}),
        "stages": manifest["summary"].get("stages", {}), "settings": manifest["settings"],
        "source": f'{{kind = "dataset", name = "{spec}", store = "{store.url}"}}',
    }


def describe_all(store: Store) -> list[dict]:
    """Every published dataset as `describe` gives it, by name; one that cannot be read is {"name", "error"}
    (one unreadable dataset does not hide the others)."""
    found = []
    for name in names(store):
        try:
            found.append(describe(store, name))
        except StoreError as e:
            found.append({"name": name, "error": e.what})
    return found


def live(store: Store) -> tuple[set[tuple[str, str]], set[str]]:
    """What the published datasets keep: {(stage, shard id)} their snapshots name, and the names of
    the snapshot files (manifests and tables) under datasets/snapshots/. For gc; raises StoreError
    when a ref or snapshot cannot be read, as gc cannot know what that one keeps."""
    shards: set[tuple[str, str]] = set()
    files: set[str] = set()
    for name in names(store):
        try:
            ref = _read_ref(store, name, missing_ok=True)
            if ref is None:
                continue  # removed meanwhile
            manifest = read_manifest(store, ref["snapshot"])
            files.add(f"{ref['snapshot']}.json")
            files.add(f"{manifest['samples']['xxh3']}.parquet")
            for stage, entry in manifest["items"].items():
                files.add(f"{entry['xxh3']}.parquet")
                table = _check_items(store, ref["snapshot"], stage, entry, _read_table(store, entry, f"{stage} items"))
                shards |= {(stage, s) for s in set(table.column("shard_id").to_pylist())}
        except StoreError as e:
            raise StoreError(f"gc stopped: dataset {name!r} in {store.url} cannot be read: {e.what}",
                             "fix or remove it (`sdxlpipe dataset rm NAME`), then gc again") from e
    return shards, files


def snapshot_files(store: Store) -> list[str]:
    """Paths of every file under datasets/snapshots/ (gc's candidates)."""
    directory = store._path(DATASETS, "snapshots")
    return [posixpath.join(directory, n) for n in list_files(store.fs, directory, "")]


def missing_shards(store: Store, snapshot: Snapshot) -> dict[str, tuple[int, int]]:
    """{stage: (items, shards)} the snapshot names whose shard file is not in the store.

    One existence check per distinct shard (a stat on a local disk, a HEAD request elsewhere)."""
    out = {}
    for stage, table in snapshot.items.items():
        if not table.num_rows:
            continue
        shard_col = table.column("shard_id").combine_chunks().dictionary_encode()
        ids = shard_col.dictionary.to_pylist()
        gone = [not _exists(store, store.shard_path(stage, s)) for s in ids]
        if any(gone):
            codes = dict_codes(shard_col)
            out[stage] = (int(np.asarray(gone)[codes].sum()), sum(gone))
    return out


def _exists(store: Store, path: str) -> bool:
    import os

    if is_local(store.fs):
        return os.path.isfile(path)
    return store.fs.exists(path)
