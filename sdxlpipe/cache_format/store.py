"""The artifact store: `open_store` and `Store`.

Owns the operations on the layout that README.md specifies: presence and
lookups over each stage's index (`index.py`), committing a finished shard
(shard, then manifest, then index fragment: the fragment is the commit
point; `writer.py` packs items into shards), reading items back with
checksums, and recording bad locations. The maintenance commands (verify,
gc, compact, du) live in `maintenance.py`, copying between stores in
`sync.py`; the Store's methods of the same names call them. Works on a local
path or any fsspec URL. Imports no torch: status and no-op runs stay cheap.
"""

from __future__ import annotations

import logging
import os
import posixpath
import secrets
from typing import BinaryIO, Iterable, Iterator

import fsspec
import numpy as np
import pyarrow as pa

from . import index_cache, maintenance, snapshots, sync
from .codec import decode_json, encode_json
from .grammar import BAD_PREFIX, BAD_SCHEMA, Location, is_key, keys_array, table_bytes, to_parquet
from .index import StageIndex
from .listing import list_names
from .shards import (
    SHARD_BYTES,
    StoreError,
    check_payload,
    check_stage,
    is_local,
    manifest_problem,
    member_bytes,
    open_for_ranges,
    place_file,
    retry_io,
    write_bytes,
)
from .writer import DEFAULT_KEEPALIVE_SECONDS, Writer

FORMAT_LINE = "sdxlpipe-store 1\n"
# What a store directory may hold; anything else means the path is not a store.
STORE_ENTRIES = {"FORMAT", "shards", "index", "datasets", "tmp"}
# Waits between attempts when a shard read fails with an I/O error (a network blip, a
# throttled object store): ~8 s in all before the error is raised. Never marks anything bad.
READ_RETRY_DELAYS = (0.2, 1.0, 2.0, 5.0)
# What a read that failed every retry tells the user (Store._retrying, opening FORMAT).
READ_HINT = ("the store's disk or network is failing; nothing was marked bad, so run the command again once "
             "the store is reachable")

log = logging.getLogger("sdxlpipe.store")


def open_store(url_or_path: str, create: bool = True, missing_ok: bool = False, read_only: bool = False) -> "Store":
    """Open the store at a local path or fsspec URL; with create, start one in a new or empty dir.

    missing_ok (for `status` and dry runs): a store that does not exist yet opens as an
    empty one, and nothing is created. read_only: nothing is ever written or listed; its
    stages are served only from rows given to `pin` (a published snapshot's, snapshots.py),
    so a static web server or a CDN works as the store. Opening reads one file, FORMAT.
    """
    fs, root = fsspec.core.url_to_fs(url_or_path)
    root = root.rstrip("/") or "/"
    url = root if is_local(fs) and "://" not in url_or_path else url_or_path.rstrip("/")
    format_path = posixpath.join(root, "FORMAT")
    try:
        line = retry_io(lambda: fs.cat_file(format_path), READ_RETRY_DELAYS, f"{format_path} of store {url}",
                        READ_HINT).decode("utf-8", "replace")
    except FileNotFoundError:
        line = None
    if line is None:
        if missing_ok and not create:
            return Store(fs, root, url, read_only)
        if not create or read_only:
            raise StoreError(
                f"no sdxlpipe store at {url}: {format_path} does not exist",
                "check the store path, or open it with create=True to start a new store there",
            )
        strangers = sorted(set(list_names(fs, root)) - STORE_ENTRIES)
        if strangers:
            raise StoreError(
                f"{url} is not an sdxlpipe store (no FORMAT file) and is not empty: {strangers[:5]}",
                "point the store at a new or empty directory",
            )
        write_bytes(fs, format_path, FORMAT_LINE.encode(), posixpath.join(root, "tmp"))
    elif line != FORMAT_LINE:
        raise StoreError(
            f"{format_path} says {line.strip()!r}; this sdxlpipe reads {FORMAT_LINE.strip()!r}",
            "open it with the sdxlpipe version that wrote it, or point the store at a new directory",
        )
    return Store(fs, root, url, read_only)


class Store:
    """One artifact store; see README.md for the format. Caches each stage's index until refresh()."""

    def __init__(self, fs, root: str, url: str, read_only: bool = False):
        self.fs = fs
        self.root = root
        self.url = url
        # Reading a published snapshot (`pin`): no listing, no write, bad copies remembered in memory only.
        self.read_only = read_only
        self._indexes: dict[str, StageIndex] = {}
        # Set it shorter (or empty) where waiting on a failing backend is pointless, e.g. tests.
        self.read_retry_delays: tuple[float, ...] = READ_RETRY_DELAYS
        # What writers aim a shard at and chunk_size plans for; why 256 MiB: shards.py.
        self.shard_bytes = SHARD_BYTES
        self._stale: set[str] = set()  # stages to list again before the next lookup
        self.odd_folders: set[str] = set()  # folders under shards/ or index/ that are not stages (see stages)
        # This Store's bad markers, one file per stage for its whole life (a run), rewritten whole.
        self._bad_name = f"{BAD_PREFIX}{secrets.token_hex(8)}.parquet"
        self._bad_rows: dict[str, list[tuple[str, str, str]]] = {}

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # -- paths ---------------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    @property
    def _tmp(self) -> str:
        return self._path("tmp")

    def shard_path(self, stage: str, shard_id: str, ext: str = "tar") -> str:
        """Where a shard (ext "json": its manifest) lives in the store: a local path for a
        local store. The only place a shard id becomes a path, so it is checked here."""
        if not is_key(shard_id):
            raise StoreError(
                f"store {self.url}: refusing shard id {shard_id!r} of stage {stage}: "
                "not 32 lowercase hex digits",
                "an index fragment or manifest of this store is damaged or crafted; run "
                "`sdxlpipe store verify` and delete the fragment that names it",
            )
        return self._path("shards", check_stage(stage), f"{shard_id}.{ext}")

    def stages(self) -> list[str]:
        """The stages this store holds shards or index fragments of.

        A folder whose name is not a stage name (README.md: letters, digits, `_`, `-`; e.g. a
        `.ipynb_checkpoints` copied along) holds nothing of the store: it is skipped, with a
        warning the first time, and listed in `odd_folders` for `verify`.
        """
        names = set(list_names(self.fs, self._path("shards"), dirs_only=True))
        names |= set(list_names(self.fs, self._path("index"), dirs_only=True))
        odd = {n for n in names if not n or not all(c.isalnum() or c in "_-" for c in n)}
        for name in sorted(odd - self.odd_folders):
            log.warning("store %s: folder %r under shards/ or index/ is not a stage name; ignored",
                        self.url, name)
        self.odd_folders |= odd
        return sorted(names - odd)

    # -- index -----------------------------------------------------------------------------

    def refresh(self, stage: str | None = None) -> None:
        """Make the next lookup see what other writers committed: one listing, then only the
        fragments not read before (fragments are immutable, so each is read once)."""
        self._stale |= set(self._indexes) if stage is None else {stage}

    def pin(self, stage: str, rows: pa.Table, name: str) -> None:
        """Serve `stage` from these rows alone (GROUPED_SCHEMA, checked against the grammar by the
        caller; a published snapshot's item locations): its index never lists the store, so
        nothing is read but the shards the rows name. `name` stands for the fragment they came from."""
        index = StageIndex(log, self._path("index", check_stage(stage)))
        index.frozen = True
        index.add_written(name, rows)
        self._indexes[stage] = index

    def _index(self, stage: str, cached: bool = True) -> StageIndex:
        """cached: may start from the local index cache (index_cache.py); verify, gc and
        compact read every fragment from the store instead."""
        check_stage(stage)
        index = self._indexes.get(stage)
        if index is None and self.read_only:
            index = self._indexes[stage] = StageIndex(log, self._path("index", stage))
            index.frozen = True  # a stage no snapshot pinned: empty, and never listed
        if index is None:
            index = self._new_index(stage, cached)
            index.retry_delays = self.read_retry_delays
            index.update(self.fs)
            self._indexes[stage] = index
            self._stale.discard(stage)
        elif stage in self._stale:
            self._stale.discard(stage)
            index.retry_delays = self.read_retry_delays
            index.update(self.fs)
        return index

    def _new_index(self, stage: str, cached: bool = True) -> StageIndex:
        cache_file = index_cache.path_for(self.fs, self.url, stage)
        index = StageIndex(log, self._path("index", stage),
                           (cache_file, self.url, stage) if cache_file else None)
        if not cached:
            index._saved = set()  # read everything from the store, and then refresh the file
            index.cache_seed = False
        return index

    def _fresh_index(self, stage: str) -> StageIndex:
        """Every fragment read again from the store: for verify, gc and compact."""
        self._indexes.pop(stage, None)
        return self._index(stage, cached=False)

    def present(self, stage: str) -> set[str]:
        """Item keys of a stage with at least one location not known to be bad."""
        return self._index(stage).present()

    def present_count(self, stage: str) -> int:
        """How many items of a stage are present, without a Python object per item."""
        return self._index(stage).present_count()

    def missing(self, stage: str, keys: Iterable[str]) -> list[str]:
        """The keys that are not present, in their order, each once."""
        keys = keys if isinstance(keys, list) else list(keys)
        present = self._index(stage).present_mask(keys_array(keys))
        # A Python object only per missing key, and deduplicate only those: usually few.
        return list(dict.fromkeys([keys[i] for i in np.flatnonzero(~present).tolist()]))

    def damaged(self, stage: str, keys: Iterable[str]) -> list[str]:
        """The keys that were written but whose every copy is known bad (checksum, truncation, lost shard)."""
        index = self._index(stage)
        unique = list(dict.fromkeys(keys))
        wanted = keys_array(unique)
        lost = index.known_mask(wanted) & ~index.present_mask(wanted)
        return [k for k, bad in zip(unique, lost.tolist()) if bad]

    def _record_bad(self, stage: str, failures: list[tuple[Location, str]]) -> None:
        """Warn about bad locations and add them to this Store's one bad-marker file of the stage."""
        index = self._index(stage)
        news = [(loc, why) for loc, why in failures if not index.is_bad(loc)]
        for loc, why in news:
            log.warning(
                "store %s: item %s (%s) in shard %s is unusable (%s); %s", self.url, loc.item_key, loc.field,
                self.shard_path(stage, loc.shard_id), why,
                "its other copies are tried" if self.read_only else "treating it as missing, so it is recomputed",
            )
        rows = index.mark_bad((loc.item_key, loc.shard_id) for loc, _ in news)
        if rows:
            mine = self._bad_rows.setdefault(stage, [])
            mine += rows
            if not self.read_only:  # a read-only store remembers its bad copies for this run only
                write_bytes(self.fs, self._path("index", stage, self._bad_name), to_parquet(mine, BAD_SCHEMA),
                            self._tmp)
            index.remember_markers(self._bad_name, mine)

    # -- writing ---------------------------------------------------------------------------

    def chunk_size(self, item_bytes: int) -> int:
        """How many items of one field whose payload is about `item_bytes` fill one shard of
        this store (tar headers and padding included): the encode stages' chunk size, so
        that each chunk of work becomes one shard."""
        return max(1, self.shard_bytes // member_bytes(max(0, item_bytes)))

    def writer(self, stage: str, target_shard_bytes: int | None = None, group: str = "",
               keepalive_seconds: float = DEFAULT_KEEPALIVE_SECONDS) -> "Writer":
        """A context manager that packs added items into shards of about target_shard_bytes
        (None: the store's shard_bytes)."""
        size = self.shard_bytes if target_shard_bytes is None else target_shard_bytes
        return Writer(self, check_stage(stage), size, group, keepalive_seconds)

    def temp_dir(self) -> str | None:
        """Where to build a local file that add_shard will place: the store's tmp/ for a local
        store (so placing it is a rename within one filesystem), None (the system's temp
        directory) for a remote one."""
        if not is_local(self.fs):
            return None
        os.makedirs(self._tmp, exist_ok=True)
        return self._tmp

    def add_shard(self, stage: str, local_path: str, doc: dict, rows: pa.Table, tag: str = "") -> str:
        """Commit a finished tar at `local_path` (moved into the store): the shard, then its
        manifest `doc`, then an index fragment of `rows` (GROUPED_SCHEMA), the commit point.

        The caller has checked that the tar hashes to `doc["xxh3"]` (its shard id). `tag`
        names the fragment `<shard_id>-<tag>-<token>.parquet` (`pull` for copies from another
        store); without one it is `<shard_id>.parquet`. Returns the shard id.
        """
        if self.read_only:
            raise StoreError(f"store {self.url} is open read-only (a published dataset's store)",
                             "write to the config's own store; a dataset source is only read")
        shard_id = doc["xxh3"]
        place_file(self.fs, local_path, self.shard_path(stage, shard_id), self._tmp)
        write_bytes(self.fs, self.shard_path(stage, shard_id, "json"), encode_json(doc), self._tmp)
        fragment = self._path("index", stage, f"{shard_id}-{tag}-{secrets.token_hex(4)}.parquet" if tag
                              else f"{shard_id}.parquet")
        if not tag and self.fs.exists(fragment):
            # The same shard again (e.g. recomputed after it was found bad): a fresh fragment
            # name, because bad markers name the fragment whose locations went bad.
            fragment = self._path("index", stage, f"{shard_id}-{secrets.token_hex(4)}.parquet")
        write_bytes(self.fs, fragment, table_bytes(rows), self._tmp)
        if stage in self._indexes:
            # Our own commit goes into the cache as it is; the next lookup lists once for others'.
            self._indexes[stage].add_written(posixpath.basename(fragment), rows)
            self._stale.add(stage)
        return shard_id

    # -- reading ---------------------------------------------------------------------------

    def locations(self, stage: str, good_only: bool = True) -> list[Location]:
        """Every index row of a stage as a Location (only those not known bad, with good_only):
        for copying whole shards. Lookups by key are `locate`, `present` and `missing`."""
        index = self._index(stage)
        return [loc for loc in index.rows if not good_only or not index.is_bad(loc)]

    def open_shard(self, stage: str, shard_id: str) -> BinaryIO:
        """A shard's raw tar for copying it whole; not verified (its id is the xxh3 of its
        bytes: hash what you read). FileNotFoundError when it is gone."""
        return self.fs.open(self.shard_path(stage, shard_id), "rb")

    def read_manifest(self, stage: str, shard_id: str) -> dict:
        """A shard's manifest; FileNotFoundError when absent, ValueError when it is not one as
        README.md has it (untrusted like the rest of a store: not JSON, a key missing or of
        another type, another shard's or stage's)."""
        data = self.fs.cat_file(self.shard_path(stage, shard_id, "json"))
        try:
            doc = decode_json(data)
        except RecursionError:  # JSON nested deeper than Python's stack: not a manifest either
            raise ValueError(f"manifest of shard {shard_id} nests too deep to be one") from None
        problem = manifest_problem(doc, stage, shard_id)
        if problem:
            raise ValueError(f"manifest of shard {shard_id} {problem}")
        return doc

    def _retrying(self, what: str, attempt):
        """attempt() again after an I/O error, waiting read_retry_delays; then a StoreError (shards.retry_io)."""
        return retry_io(attempt, self.read_retry_delays, f"{what} in store {self.url}", READ_HINT)

    def _read_checked(self, stage: str, loc: Location,
                      f: BinaryIO | None) -> tuple[bytes | None, str | None, BinaryIO | None]:
        """(payload, None, f) or (None, why the location is bad, f); f is the open shard to reuse.

        Only a missing shard, a short payload or a checksum mismatch is damage; an I/O
        error reopens the shard and tries again, then raises StoreError naming the shard.
        """
        path = self.shard_path(stage, loc.shard_id)
        handle = [f]

        def attempt():
            if handle[0] is None:
                handle[0] = open_for_ranges(self.fs, path)
            try:
                return check_payload(handle[0], loc)
            except OSError:
                _close_quietly(handle[0])
                handle[0] = None  # reopen on the next attempt: the connection may be dead
                raise

        try:
            data, why = self._retrying(f"shard {path}", attempt)
        except FileNotFoundError:
            return None, "shard file missing", None
        return data, why, handle[0]

    def _read_at(self, stage: str, loc: Location) -> tuple[bytes | None, str | None]:
        data, why, f = self._read_checked(stage, loc, None)
        _close_quietly(f)
        return data, why

    def read(self, stage: str, item_key: str, field: str | None = None) -> bytes | None:
        """The checked payload of an item, or None if it is absent or no copy of it is intact.

        field may be left out when the stage writes one field per item. Raises StoreError
        when the store keeps failing to answer (nothing is marked bad then).
        """
        failures = []
        try:
            for loc in self._index(stage).good(item_key, field, stage):
                data, why = self._read_at(stage, loc)
                if why is None:
                    return data
                failures.append((loc, why))
            return None
        finally:
            if failures:
                self._record_bad(stage, failures)

    def locations_table(self, stage: str, keys: Iterable[str], field: str) -> tuple[pa.Table, list[str]]:
        """The first good location of each key's `field` as GROUPED_SCHEMA rows (each key once, in
        the keys' order), and the keys that have none: what a published snapshot records."""
        unique = list(dict.fromkeys(keys))
        wanted = keys_array(unique)
        table, found = self._index(stage).first_good_table(wanted, field)
        return table, [unique[i] for i in np.flatnonzero(~found).tolist()]

    def locate(self, stage: str, keys: Iterable[str], field: str | None = None) -> list[Location | None]:
        """The first good location of each key's field, in the keys' order (None when absent).

        For readers that fetch payloads themselves by (shard_id, offset, length) and check
        them against xxh3, such as training's per-batch reads.
        """
        keys = list(keys)
        index = self._index(stage)
        if field is None and len(index.field_names) > 1:
            return [next(iter(index.good(key, None, stage)), None) for key in keys]
        return [index.location(s, r) if s >= 0 else None for s, r in index.first_good(keys_array(keys), field)]

    def read_many(
        self, stage: str, keys: Iterable[str], field: str | None = None
    ) -> Iterator[tuple[str, bytes | None]]:
        """(key, payload or None) for each distinct key, shard by shard in offset order.

        Each shard is opened once. Absent keys come last, with None.
        """
        index = self._index(stage)
        by_shard: dict[str, list[Location]] = {}
        absent = []
        for key in dict.fromkeys(keys):
            locs = index.good(key, field, stage)
            if locs:
                by_shard.setdefault(locs[0].shard_id, []).append(locs[0])
            else:
                absent.append(key)
        for shard_id, locs in by_shard.items():
            failures: list[tuple[Location, str]] = []
            f = None
            try:
                for loc in sorted(locs, key=lambda l: l.offset):
                    data, problem, f = self._read_checked(stage, loc, f)
                    if problem is not None:
                        failures.append((loc, problem))
                        data = self._fallback(stage, loc, field, failures)
                    yield loc.item_key, data
            finally:
                _close_quietly(f)
                if failures:
                    self._record_bad(stage, failures)
        for key in absent:
            yield key, None

    def _fallback(self, stage: str, failed: Location, field: str | None, failures: list) -> bytes | None:
        """Another intact copy of a key whose first location failed, if any."""
        for loc in self._index(stage).good(failed.item_key, field, stage):
            if loc.shard_id == failed.shard_id:
                continue
            data, why = self._read_at(stage, loc)
            if why is None:
                return data
            failures.append((loc, why))
        return None

    # -- published datasets (snapshots.py) -----------------------------------------------------

    def publish(self, name: str, samples: pa.Table, items: dict, settings: dict, about: dict) -> tuple[str, bool]:
        """Write a snapshot and point dataset `name` at it; (snapshot id, whether the ref moved)."""
        if self.read_only:
            raise StoreError(f"store {self.url} is open read-only", "publish into a store you can write")
        return snapshots.publish(self, name, samples, items, settings, about)

    def dataset(self, spec: str) -> "snapshots.Snapshot":
        """The verified snapshot of `name` or `name@<id>`; StoreError naming what is wrong."""
        return snapshots.open_snapshot(self, spec)

    def datasets(self) -> list[str]:
        """The published dataset names (lists datasets/refs/)."""
        return snapshots.names(self)

    def remove_dataset(self, name: str) -> dict:
        """Un-publish `name` (delete its ref); returns the ref it had."""
        return snapshots.remove(self, name)

    # -- maintenance (maintenance.py, sync.py) ------------------------------------------------

    def verify(self, stage: str | None = None, repair: bool = False) -> list[dict]:
        """Re-hash every shard and every indexed item and check payloads against their schema; record bad
        items (repair: schema-breaking ones too); return the problems."""
        return maintenance.verify(self, stage, repair)

    def gc(self, dry_run: bool = False, grace_seconds: float = maintenance.DEFAULT_GRACE_SECONDS) -> list[str]:
        """Remove unreferenced shards and stale temp files older than grace_seconds; the paths."""
        return maintenance.gc(self, dry_run, grace_seconds)

    def compact(self, stage: str | None = None) -> dict:
        """Merge each stage's fragments into one without bad or duplicate rows; counts per stage."""
        return maintenance.compact(self, stage)

    def housekeep(self, stage: str, max_fragments: int = maintenance.COMPACT_FRAGMENTS,
                  max_markers: int = maintenance.COMPACT_MARKERS) -> dict | None:
        """Compact a stage that holds too many fragments or bad-marker files; compact's result or None."""
        return maintenance.housekeep(self, stage, max_fragments, max_markers)

    def du(self) -> dict:
        """Shards, items and bytes per stage, bytes per model fingerprint, and the total."""
        return maintenance.du(self)

    def copy_missing_to(self, other: "Store") -> dict:
        """Copy every item `other` lacks into it, verified (`store push|pull`); see sync.py."""
        return sync.copy_missing(self, other, log)

    def copy_datasets_to(self, other: "Store") -> dict:
        """Publish in `other` the datasets whose shards it holds (after copy_missing_to); see sync.py."""
        return sync.copy_datasets(self, other, log)


def _close_quietly(f) -> None:
    if f is not None:
        try:
            f.close()
        except OSError:
            pass  # a read-only handle: nothing to lose

