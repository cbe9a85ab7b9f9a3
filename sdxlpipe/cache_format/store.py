"""The artifact store: `open_store`, `Store` and its shard writer.

Owns the operations on the layout that README.md specifies: writing items
(shard, then manifest, then index fragment: the fragment is the commit
point), reading them back with checksums, recording bad locations, and the
maintenance commands verify, gc, compact and du. Works on a local path or
any fsspec URL. Imports no torch: status and no-op runs stay cheap.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import secrets
import threading
import time
from typing import BinaryIO, Iterable, Iterator

import fsspec
import xxhash

from . import index_cache
from .codec import decode_json, encode_json
import numpy as np
import pyarrow as pa

from .index import (
    BAD_PREFIX,
    BAD_SCHEMA,
    GROUPED_SCHEMA,
    HEX_LEN,
    Location,
    StageIndex,
    is_key,
    keys_array,
    list_detail,
    list_files,
    list_names,
    table_bytes,
    to_parquet,
)
from .shards import (
    SHARD_BYTES,
    ShardBuilder,
    StoreError,
    check_item_name,
    check_stage,
    hash_stream,
    is_local,
    manifest,
    member_bytes,
    place_file,
    read_range,
    retry_io,
    write_bytes,
)

FORMAT_LINE = "sdxlpipe-store 1\n"
# What a store directory may hold; anything else means the path is not a store.
STORE_ENTRIES = {"FORMAT", "shards", "index", "tmp"}
# One hour: far longer than a writer needs between renaming its shard and writing its index
# fragment; shorten only when no writer can be running.
DEFAULT_GRACE_SECONDS = 3600.0
# A live writer touches its temp file this often, so gc never takes an idle writer's file
# (the Ray driver holds one builder for a whole stream); well under the grace period.
DEFAULT_KEEPALIVE_SECONDS = 300.0
# Waits between attempts when a shard read fails with an I/O error (a network blip, a
# throttled object store): ~8 s in all before the error is raised. Never marks anything bad.
READ_RETRY_DELAYS = (0.2, 1.0, 2.0, 5.0)
# A shard id is the xxh3-128 hex of the tar: anything else never becomes a path.
SHARD_ID = re.compile(r"[0-9a-f]{32}")
# Past this many index fragments in a stage, the run that notices compacts it (housekeep):
# loading costs ~1.5 ms per fragment however small, a compacted million rows ~0.5 s.
COMPACT_FRAGMENTS = 256
# Past this many bad-marker files (one per run that found damage), compact too.
COMPACT_MARKERS = 16

log = logging.getLogger("sdxlpipe.store")


def open_store(url_or_path: str, create: bool = True, missing_ok: bool = False) -> "Store":
    """Open the store at a local path or fsspec URL; with create, start one in a new or empty dir.

    missing_ok (for `status` and dry runs): a store that does not exist yet opens as an
    empty one, and nothing is created.
    """
    fs, root = fsspec.core.url_to_fs(url_or_path)
    root = root.rstrip("/") or "/"
    url = root if is_local(fs) and "://" not in url_or_path else url_or_path.rstrip("/")
    format_path = posixpath.join(root, "FORMAT")
    try:
        line = fs.cat_file(format_path).decode("utf-8", "replace")
    except FileNotFoundError:
        line = None
    if line is None:
        if missing_ok and not create:
            return Store(fs, root, url)
        if not create:
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
    return Store(fs, root, url)


def _check(f: BinaryIO, loc: Location) -> tuple[bytes | None, str | None]:
    """The payload at a location, or None and what is wrong with it. I/O errors propagate."""
    if loc.offset < 0 or loc.length < 0:
        return None, f"index row gives offset {loc.offset}, length {loc.length}"
    data = read_range(f, loc.offset, loc.length)
    if len(data) != loc.length:
        return None, f"truncated: {len(data)} of {loc.length} bytes"
    if xxhash.xxh3_128_hexdigest(data) != loc.xxh3:
        return None, "checksum mismatch"
    return data, None


class Store:
    """One artifact store; see README.md for the format. Caches each stage's index until refresh()."""

    def __init__(self, fs, root: str, url: str):
        self.fs = fs
        self.root = root
        self.url = url
        self._indexes: dict[str, StageIndex] = {}
        # Set it shorter (or empty) where waiting on a failing backend is pointless, e.g. tests.
        self.read_retry_delays: tuple[float, ...] = READ_RETRY_DELAYS
        # What writers aim a shard at and chunk_size plans for; why 256 MiB: shards.py.
        self.shard_bytes = SHARD_BYTES
        self._stale: set[str] = set()  # stages to list again before the next lookup
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

    def _shard(self, stage: str, shard_id: str, ext: str = "tar") -> str:
        if not isinstance(shard_id, str) or not SHARD_ID.fullmatch(shard_id):
            raise StoreError(
                f"store {self.url}: refusing shard id {shard_id!r} of stage {stage}: "
                "not 32 lowercase hex digits",
                "an index fragment or manifest of this store is damaged or crafted; run "
                "`sdxlpipe store verify` and delete the fragment that names it",
            )
        return self._path("shards", check_stage(stage), f"{shard_id}.{ext}")

    def stages(self) -> list[str]:
        """The stages this store holds shards or index fragments of."""
        names = set(list_names(self.fs, self._path("shards"), dirs_only=True))
        names |= set(list_names(self.fs, self._path("index"), dirs_only=True))
        return sorted(names)

    # -- index -----------------------------------------------------------------------------

    def refresh(self, stage: str | None = None) -> None:
        """Make the next lookup see what other writers committed: one listing, then only the
        fragments not read before (fragments are immutable, so each is read once)."""
        self._stale |= set(self._indexes) if stage is None else {stage}

    def _index(self, stage: str, cached: bool = True) -> StageIndex:
        """cached: may start from the local index cache (index_cache.py); verify, gc and
        compact read every fragment from the store instead."""
        check_stage(stage)
        index = self._indexes.get(stage)
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
                "store %s: item %s (%s) in shard %s is unusable (%s); treating it as missing, "
                "so it is recomputed", self.url, loc.item_key, loc.field,
                self._shard(stage, loc.shard_id), why,
            )
        rows = index.mark_bad((loc.item_key, loc.shard_id) for loc, _ in news)
        if rows:
            mine = self._bad_rows.setdefault(stage, [])
            mine += rows
            write_bytes(self.fs, self._path("index", stage, self._bad_name), to_parquet(mine, BAD_SCHEMA), self._tmp)
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

    def _new_builder(self) -> ShardBuilder:
        return ShardBuilder(self.temp_dir())

    def _commit(self, stage: str, builder: ShardBuilder, group: str = "") -> str:
        """Shard, then manifest, then index fragment (the commit point). Returns the shard id."""
        try:
            return self._commit_steps(stage, builder, group)
        except OSError as e:
            raise _write_error(self, stage, e) from e

    def _commit_steps(self, stage: str, builder: ShardBuilder, group: str) -> str:
        try:
            shard_id, nbytes = builder.finish()
            names = [m["name"].split(".", 1) for m in builder.members]
            table = pa.table({
                "item_key": [n[0] for n in names], "field": [n[1] for n in names],
                "shard_id": [shard_id] * len(names), "offset": [m["offset"] for m in builder.members],
                "length": [m["length"] for m in builder.members], "xxh3": [m["xxh3"] for m in builder.members],
                "group": [group] * len(names),
            }, schema=GROUPED_SCHEMA)
            return self.add_shard(stage, builder.path, manifest(stage, shard_id, nbytes, builder.members), table)
        finally:
            builder.discard()

    def add_shard(self, stage: str, local_path: str, doc: dict, rows: pa.Table, tag: str = "") -> str:
        """Commit a finished tar at `local_path` (moved into the store): the shard, then its
        manifest `doc`, then an index fragment of `rows` (GROUPED_SCHEMA), the commit point.

        The caller has checked that the tar hashes to `doc["xxh3"]` (its shard id). `tag`
        names the fragment `<shard_id>-<tag>-<token>.parquet` (`pull` for copies from another
        store); without one it is `<shard_id>.parquet`. Returns the shard id.
        """
        shard_id = doc["xxh3"]
        place_file(self.fs, local_path, self._shard(stage, shard_id), self._tmp)
        write_bytes(self.fs, self._shard(stage, shard_id, "json"), encode_json(doc), self._tmp)
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
        return self.fs.open(self._shard(stage, shard_id), "rb")

    def read_manifest(self, stage: str, shard_id: str) -> dict:
        """A shard's manifest; FileNotFoundError when absent, ValueError when not a JSON object.
        Untrusted like the rest of a store: check `xxh3` against the shard id before use."""
        doc = decode_json(self.fs.cat_file(self._shard(stage, shard_id, "json")))
        if not isinstance(doc, dict):
            raise ValueError(f"manifest of shard {shard_id} is a JSON {type(doc).__name__}, not an object")
        return doc

    def _retrying(self, what: str, attempt):
        """attempt() again after an I/O error, waiting read_retry_delays; then a StoreError (shards.retry_io)."""
        return retry_io(attempt, self.read_retry_delays, f"{what} in store {self.url}",
                        "the store's disk or network is failing; nothing was marked bad, so "
                        "run the command again once the store is reachable")

    def _read_checked(self, stage: str, loc: Location,
                      f: BinaryIO | None) -> tuple[bytes | None, str | None, BinaryIO | None]:
        """(payload, None, f) or (None, why the location is bad, f); f is the open shard to reuse.

        Only a missing shard, a short payload or a checksum mismatch is damage; an I/O
        error reopens the shard and tries again, then raises StoreError naming the shard.
        """
        path = self._shard(stage, loc.shard_id)
        handle = [f]

        def attempt():
            if handle[0] is None:
                handle[0] = self.fs.open(path, "rb")
            try:
                return _check(handle[0], loc)
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

    def locate(self, stage: str, keys: Iterable[str], field: str | None = None) -> list[Location | None]:
        """The first good location of each key's field, in the keys' order (None when absent).

        For readers that fetch payloads themselves by (shard_id, offset, length) and check
        them against xxh3, such as training's per-batch reads. `locate_table` gives the same
        as Arrow columns, without a Python object per key.
        """
        keys = list(keys)
        index = self._index(stage)
        if field is None and len(index.field_names) > 1:
            return [next(iter(index.good(key, None, stage)), None) for key in keys]
        return [index.location(s, r) if s >= 0 else None for s, r in index.first_good(keys_array(keys), field)]

    def locate_table(self, stage: str, keys, field: str | None = None) -> pa.Table:
        """`locate` as a table: item_key, shard_id, offset, length, xxh3 per key (null when absent).

        `keys` may be a list of str or a numpy 'S32' array; one row per key, in order.
        """
        index = self._index(stage)
        wanted = keys_array(keys)
        pos = np.array(index.first_good(wanted, field), np.int64).reshape(-1, 2)
        n = len(wanted)
        shard = np.zeros(n, np.int32)
        offset, length = np.zeros(n, np.int64), np.zeros(n, np.int64)
        xxh3 = np.zeros(n, "S32")
        for seg_no, seg in enumerate(index.segments):
            sel = np.flatnonzero(pos[:, 0] == seg_no)
            rows = pos[sel, 1]
            shard[sel] = seg.cols["shard"][rows]
            offset[sel], length[sel] = seg.cols["offset"][rows], seg.cols["length"][rows]
            xxh3[sel] = seg.cols["xxh3"][rows]
        absent = pa.array(pos[:, 0] < 0)
        shard_ids = pa.DictionaryArray.from_arrays(pa.array(shard), pa.array(index.shards or [""], pa.string()))
        return pa.table({
            "item_key": pa.array(wanted).cast(pa.string()),
            "shard_id": pa.compute.if_else(absent, None, shard_ids.dictionary_decode()),
            "offset": pa.compute.if_else(absent, None, pa.array(offset)),
            "length": pa.compute.if_else(absent, None, pa.array(length)),
            "xxh3": pa.compute.if_else(absent, None, pa.array(xxh3).cast(pa.string())),
        })

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

    # -- maintenance -----------------------------------------------------------------------

    def verify(self, stage: str | None = None) -> list[dict]:
        """Re-hash every shard and every indexed item; record bad items; return the problems."""
        problems: list[dict] = []
        for st in [check_stage(stage)] if stage else self.stages():
            index = self._fresh_index(st)
            for name, error in index.unreadable.items():
                problems.append(_problem(st, None, None, f"index fragment {name} unreadable: {error}"))
            by_shard: dict[str, dict[tuple, Location]] = {}
            for loc in index.rows:
                by_shard.setdefault(loc.shard_id, {})[(loc.item_key, loc.field, loc.offset)] = loc
            on_disk = {n[: -len(".tar")] for n in list_files(self.fs, self._path("shards", st), ".tar")}
            failures: list[tuple[Location, str]] = []
            for shard_id in sorted(on_disk | by_shard.keys()):
                if not SHARD_ID.fullmatch(shard_id):
                    problems.append(_problem(st, None, None, f"shard name {shard_id!r} is not a shard id; "
                                                             "the file or index row was not written by sdxlpipe"))
                    continue
                locs = list(by_shard.get(shard_id, {}).values())
                problems += self._verify_shard(st, shard_id, locs, failures)
            if failures:
                self._record_bad(st, failures)
        return problems

    def _verify_shard(self, stage: str, shard_id: str, locs: list[Location], failures: list) -> list[dict]:
        problems = []
        doc: dict = {}
        try:
            doc = self.read_manifest(stage, shard_id)
            if doc.get("xxh3") != shard_id:
                problems.append(_problem(stage, shard_id, None, f"manifest says xxh3 {doc.get('xxh3')}, "
                                                                 "not the shard's name"))
        except FileNotFoundError:
            if locs:  # else a writer stopped between shard and manifest: unused, gc takes it
                problems.append(_problem(stage, shard_id, None, "manifest missing"))
        except (OSError, ValueError) as e:
            problems.append(_problem(stage, shard_id, None, f"manifest unreadable: {e}"))
        path = self._shard(stage, shard_id)
        try:
            f, why = self._retrying(f"shard {path}", lambda: self.fs.open(path, "rb")), None
        except FileNotFoundError:
            f, why = None, "shard file missing"
        if f is None:
            problems.append(_problem(stage, shard_id, None, why))
            for loc in locs:
                failures.append((loc, why))
                problems.append(_problem(stage, shard_id, loc.item_key, why))
            return problems
        index = self._index(stage)
        present = index.present()
        try:
            with f:
                return problems + self._verify_items(stage, shard_id, locs, failures, f, doc, index, present)
        except OSError as e:  # not damage: say which shard could not be read, mark nothing
            raise StoreError(f"verify could not read shard {path}: {e}",
                             "the store's disk or network is failing; run verify again once it is reachable") from e

    def _verify_items(self, stage: str, shard_id: str, locs: list[Location], failures: list, f: BinaryIO,
                      doc: dict, index: StageIndex, present: set[str]) -> list[dict]:
        """Problems of one open shard: its hash and size, and each indexed item's checksum."""
        problems: list[dict] = []
        digest, size = hash_stream(f)
        item_problems, repaired = [], 0
        for loc in locs:
            _, why = _check(f, loc)
            if why is None:
                continue
            if index.is_bad(loc) and loc.item_key in present:
                repaired += 1  # found before, and recomputed into another shard since
                continue
            failures.append((loc, why))
            item_problems.append(_problem(stage, shard_id, loc.item_key, why))
        # A shard whose only damage is in items already recomputed elsewhere is repaired:
        # its intact items stay usable, and verify stays clean.
        known_damage = repaired and not item_problems
        if digest != shard_id and not known_damage:
            problems.append(_problem(stage, shard_id, None, f"tar hashes to {digest}, not its name"))
        if "bytes" in doc and doc["bytes"] != size and not known_damage:
            why = f"tar has {size} bytes, manifest says {doc['bytes']}"
            problems.append(_problem(stage, shard_id, None, why))
        problems += item_problems
        return problems

    def gc(self, dry_run: bool = False, grace_seconds: float = DEFAULT_GRACE_SECONDS) -> list[str]:
        """Remove shards and manifests no index fragment references, and stale temp files,
        once older than grace_seconds. Returns the paths removed (or, dry_run, to remove).

        Writers run meanwhile, so each file's reference and age are checked again right
        before it is deleted: a shard committed again under the same content name, or a
        temp file a live writer touched, since the first look is kept.
        """
        referenced = self._referenced_shards()
        now = time.time()
        removed = [p for p in self._gc_candidates(referenced) if self._age(p, now) > grace_seconds]
        if dry_run or not removed:
            return removed
        referenced = self._referenced_shards()  # what writers committed since the first look
        kept = []
        for path in removed:
            if self._shard_key(path) in referenced or self._age(path, time.time()) <= grace_seconds:
                kept.append(path)
                continue
            try:
                self.fs.rm(path)
            except FileNotFoundError:
                pass  # another gc got there first
        return [p for p in removed if p not in kept]

    def _referenced_shards(self) -> set[tuple[str, str]]:
        referenced: set[tuple[str, str]] = set()
        for st in self.stages():
            index = self._fresh_index(st)
            if index.unreadable:
                raise StoreError(
                    f"gc stopped: index fragments of stage {st} in {self.url} are unreadable: "
                    f"{sorted(index.unreadable)}",
                    "run `sdxlpipe store verify`, restore or delete those fragments, then gc again",
                )
            codes = np.unique(np.concatenate([s.cols["shard"] for s in index.segments] or [np.zeros(0, np.int32)]))
            referenced |= {(st, index.shards[c]) for c in codes.tolist()}
        return referenced

    def _gc_candidates(self, referenced: set[tuple[str, str]]) -> list[str]:
        candidates = [
            self._path("shards", st, name)
            for st in list_names(self.fs, self._path("shards"), dirs_only=True)
            for name in list_files(self.fs, self._path("shards", st), "")
            if (st, name.split(".", 1)[0]) not in referenced
        ]
        return candidates + [posixpath.join(self._tmp, n) for n in list_files(self.fs, self._tmp, "")]

    def _shard_key(self, path: str) -> tuple[str, str] | None:
        """(stage, shard_id) of a path under shards/, None for a temp file."""
        parent, name = posixpath.split(path)
        if posixpath.dirname(parent) != self._path("shards"):
            return None
        return posixpath.basename(parent), name.split(".", 1)[0]

    def _age(self, path: str, now: float) -> float:
        try:
            return now - self.fs.modified(path).timestamp()
        except (NotImplementedError, OSError, AttributeError):
            return 0.0  # unknown age: treat as young, never delete what we cannot date

    def compact(self, stage: str | None = None) -> dict:
        """Merge each stage's fragments into one without bad or duplicate rows.

        The merged fragment is written before the old ones are deleted, so readers never
        see an item vanish. Returns {stage: {"fragments_before", "fragments_after",
        "rows_before", "rows_after"}}.
        """
        return {st: self._compact(st, self._fresh_index(st))
                for st in ([check_stage(stage)] if stage else self.stages())}

    def housekeep(self, stage: str, max_fragments: int = COMPACT_FRAGMENTS,
                  max_markers: int = COMPACT_MARKERS) -> dict | None:
        """Compact a stage if this Store's view of it holds more than max_fragments fragments
        or max_markers bad-marker files; the result of compact for it, or None.

        Uses the index as last listed (call refresh first to include others' commits): a
        fragment committed after that listing is neither merged nor deleted, so a writer
        running meanwhile loses nothing.
        """
        index = self._index(stage)
        if len(index.live_fragments) <= max_fragments and len(index.bad_fragments) <= max_markers:
            return None
        log.info("store %s: stage %s holds %d index fragments and %d bad-marker files; compacting",
                 self.url, stage, len(index.live_fragments), len(index.bad_fragments))
        # Without bad markers, a fragment holding most rows (the last compaction's) is left as
        # it is and the small ones beside it are merged: an encode then rewrites its million
        # rows once, not every 256 chunks. Markers name fragments, so with any, merge all.
        leave = None
        if not index.bad_fragments:
            rows = index.fragment_rows()
            biggest = max(rows, key=rows.get) if rows else None
            if biggest is not None and rows[biggest] * 2 > index.row_count:
                leave = biggest
        return self._compact(stage, index, leave)

    def _compact(self, st: str, index: StageIndex, leave: str | None = None) -> dict:
        """leave: a fragment that stays as it is (housekeeping's; there are no bad markers)."""
        old = [n for n in index.live_fragments if n != leave] + list(index.bad_fragments)
        rows_before = index.row_count
        result = {"fragments_before": len(index.live_fragments) + len(index.bad_fragments),
                  "fragments_after": len(index.live_fragments) + len(index.bad_fragments),
                  "rows_before": rows_before, "rows_after": rows_before}
        if len(old) <= 1 and not index.bad_fragments:
            return result
        # Distinct rows (the same shard indexed twice lists each item twice), in shard order.
        table = index.compacted_table(leave)
        merged = None
        if table.num_rows:
            merged = f"compact-{secrets.token_hex(8)}.parquet"
            write_bytes(self.fs, self._path("index", st, merged), table_bytes(table), self._tmp)
        for name in old:
            try:
                self.fs.rm(self._path("index", st, name))
            except FileNotFoundError:
                pass  # a concurrent compact removed it
        kept = index.fragment_rows().get(leave, 0) if leave else 0
        if leave is not None:
            # The view keeps its rows; the next lookup lists once, dropping the merged names' rows.
            if merged is not None:
                index.add_written(merged, table)
        else:
            # The new view: the merged fragment as written; the next lookup lists once for the rest.
            fresh = self._new_index(st, cached=False)
            if merged is not None:
                fresh.add_written(merged, table)
            self._indexes[st] = fresh
        self._stale.add(st)
        self._bad_rows.pop(st, None)  # our markers were merged (their rows dropped)
        result.update(fragments_after=(1 if table.num_rows else 0) + (1 if leave else 0),
                      rows_after=table.num_rows + kept)
        return result

    def _group_bytes(self, stage: str) -> dict[str, int]:
        """Bytes of the good rows per group, each distinct (shard, offset) counted once."""
        index = self._index(stage)
        parts = [(s.cols["shard"], s.cols["offset"], s.cols["length"], s.cols["group"], s.cols["bad"])
                 for s in index.segments]
        if not parts:
            return {}
        shard, offset, length, group, bad = (np.concatenate(c) for c in zip(*parts))
        good = ~bad
        shard, offset, length, group = shard[good], offset[good], length[good], group[good]
        order = np.lexsort((offset, shard))
        first = np.ones(len(order), bool)
        first[1:] = (shard[order][1:] != shard[order][:-1]) | (offset[order][1:] != offset[order][:-1])
        take = order[first]
        sums = np.bincount(group[take], weights=length[take], minlength=len(index.group_names))
        return {index.group_names[g]: int(sums[g]) for g in np.unique(group[take]).tolist()}

    def copy_missing_to(self, other: "Store") -> dict:
        """Copy every item `other` lacks into it, verified (`store push|pull`); see sync.py."""
        from .sync import copy_missing

        return copy_missing(self, other, log)

    def du(self) -> dict:
        """{"stages": {stage: {"shards", "items", "bytes", "groups"}}, "bytes": total of all shards}.

        "groups": bytes of present items per model fingerprint their writer named ("" if none).
        """
        stages = {}
        for st in self.stages():
            tars = [e for e in list_detail(self.fs, self._path("shards", st)) if e["name"].endswith(".tar")]
            stages[st] = {
                "shards": len(tars),
                "items": self._index(st).present_count(),
                "bytes": sum(int(e.get("size") or 0) for e in tars),
                "groups": self._group_bytes(st),
            }
        return {"stages": stages, "bytes": sum(s["bytes"] for s in stages.values())}


def _write_error(store: Store, stage: str, e: OSError) -> StoreError:
    return StoreError(
        f"could not write to store {store.url} (stage {stage}): {e.strerror or e}"
        + (f": {e.filename}" if e.filename else ""),
        "free space (or fix permissions) where the store and its tmp/ live, then run the same "
        "command again: items committed so far are kept, the unfinished shard is never visible",
    )


def _close_quietly(f) -> None:
    if f is not None:
        try:
            f.close()
        except OSError:
            pass  # a read-only handle: nothing to lose


def _problem(stage: str, shard_id: str | None, item_key: str | None, problem: str) -> dict:
    return {"stage": stage, "shard_id": shard_id, "item_key": item_key, "problem": problem}


class Writer:
    """Packs items into shards for one stage; use as `with store.writer(stage) as w: w.add(...)`.

    All fields of an item go into the same shard, added one after another, so that
    webdataset sees each item as one sample. An item is committed whole or not at all:
    its fields wait in memory until the next item starts, `end_item()` or `close()`, and a
    writer left by an exception commits the finished items and drops the one in progress.
    """

    def __init__(self, store: Store, stage: str, target_shard_bytes: int, group: str = "",
                 keepalive_seconds: float = DEFAULT_KEEPALIVE_SECONDS):
        if target_shard_bytes <= 0:
            raise StoreError(f"target_shard_bytes must be positive, got {target_shard_bytes}",
                             "leave it at the default unless shards must be smaller")
        self._store = store
        self.stage = stage
        self.group = group  # recorded in the index beside each item (model fingerprint, for du)
        self.target_shard_bytes = target_shard_bytes
        self.keepalive_seconds = keepalive_seconds
        self.shard_ids: list[str] = []
        self._builder: ShardBuilder | None = None
        self._keepalive: threading.Event | None = None  # set to stop touching the builder's file
        self._key: str | None = None  # the item being added
        self._pending: list[tuple[str, str, bytes]] = []  # its (name, field, payload) so far
        self._done: set[str] = set()  # items already complete in the current shard

    def add(self, item_key: str, field: str, payload: bytes) -> None:
        if not is_key(item_key):
            raise StoreError(f"item key {item_key!r} of stage {self.stage} is not {HEX_LEN} lowercase hex digits",
                             "item keys are xxh3-128 hex digests: make them with sdxlpipe.pipeline.keys.xxh3_hex")
        name = check_item_name(item_key, field)
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload of {name} must be bytes, got {type(payload).__name__}; "
                            "encode it with encode_tensors or encode_json")
        if item_key != self._key:
            self.end_item()
            if item_key in self._done:
                raise StoreError(
                    f"item {item_key} of stage {self.stage} was added again after other items",
                    "add all fields of an item one after another",
                )
            self._key = item_key
        if any(f == field for _, f, _ in self._pending):
            raise StoreError(f"field {field} of item {item_key} was added twice",
                             "add each field of an item once")
        self._pending.append((name, field, bytes(payload)))

    def end_item(self) -> None:
        """The item being added is complete: it goes into the shard (and is kept on errors)."""
        pending, key = self._pending, self._key
        self._pending, self._key = [], None
        if not pending:
            return
        size = sum(member_bytes(len(p)) for _, _, p in pending)
        if self._builder is not None and self._builder.members and \
                self._builder.size + size > self.target_shard_bytes:
            self._flush()
        try:
            if self._builder is None:
                self._builder = self._store._new_builder()
                self._start_keepalive(self._builder.path)
            for name, _, payload in pending:
                self._builder.add(name, payload)
        except OSError as e:
            # The temp tar may now end mid-member: nothing of it can be committed.
            self._discard()
            raise _write_error(self._store, self.stage, e) from e
        self._done.add(key)

    def _discard(self) -> None:
        builder, self._builder = self._builder, None
        self._stop_keepalive()
        self._done = set()
        if builder is not None:
            builder.discard()

    def _stop_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive.set()
            self._keepalive = None

    def _start_keepalive(self, path: str) -> None:
        # Only a local store keeps the builder in its tmp/, where gc looks.
        if not is_local(self._store.fs) or self.keepalive_seconds <= 0:
            return
        stop = self._keepalive = threading.Event()

        def touch() -> None:
            while not stop.wait(self.keepalive_seconds):
                try:
                    os.utime(path)
                except OSError:
                    return  # renamed into place or discarded meanwhile

        threading.Thread(target=touch, name="sdxlpipe-writer-keepalive", daemon=True).start()

    def _flush(self) -> None:
        builder, self._builder = self._builder, None
        self._stop_keepalive()
        self._done = set()
        if builder is not None and builder.members:
            self.shard_ids.append(self._store._commit(self.stage, builder, self.group))
        elif builder is not None:
            builder.discard()

    def close(self) -> None:
        """Write the shard in progress; a writer that got no items writes nothing."""
        self.end_item()
        self._flush()

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
            return False
        # Keep what was finished before the error, so a rerun resumes instead of redoing it;
        # the item in progress may lack fields, so it is dropped and recomputed.
        if self._pending:
            log.warning("store %s: dropping item %s of stage %s, unfinished when %s stopped the writer",
                        self._store.url, self._key, self.stage, exc_type.__name__)
        self._pending, self._key = [], None
        try:
            self._flush()
        except Exception:
            log.exception("store %s: could not save the items of stage %s added before the error",
                          self._store.url, self.stage)
        return False
