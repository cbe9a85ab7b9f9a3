"""A stage's index: its fragments read into a `StageIndex`, with its bad markers.

Owns reading the parquet files under `index/<stage>/` into memory: fragments
are immutable, so a `StageIndex` caches each by name and a refresh reads only
the names it has not seen (one listing, `listing.py`). Every row read is
checked against the grammar (`grammar.py`) first; a fragment that fails is
refused whole, with a warning naming it, and none of its rows is used to open
a path. Rows live in numpy segments (`segments.py`): `present` / `missing` /
`locate` are searchsorted lookups. A `StageIndex` may start from the local
index cache (`index_cache.py`) instead of parsing every fragment, and writes
that file again when it falls behind. See README.md for the columns.
"""

from __future__ import annotations

import functools
import logging
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import numpy as np
import pyarrow as pa

from . import index_cache
from .grammar import (
    BAD_PREFIX,
    CODED,
    GROUPED_SCHEMA,
    HEX_LEN,
    Location,
    as_numpy,
    check_markers,
    check_rows,
    dict_codes,
    hex_column,
    is_key,
    plain_name,
    prepare,
    read_parquet_bytes,
    top64,
)
from .listing import list_entries
from .segments import COLUMNS, Segment, concat
from .shards import StoreError

# Fragments are small files; 16 threads hide per-file latency on object stores.
READ_THREADS = 16
# A fragment deleted by `compact` between listing and reading makes us list again, this often.
RELIST_ATTEMPTS = 5
# New fragments are kept as small sorted segments beside the big one; once they hold this
# share of its rows (or there are this many) they are merged, so lookups stay a few
# searchsorted calls and merging costs O(n log n) only every so often.
MERGE_SHARE = 8
MAX_SEGMENTS = 32

# The index cache file is rewritten once the index holds a quarter more rows than the file
# (so a growing stage rewrites it ~5x its final size in all), or this many fragments it lacks
# (each costs ~1 ms to parse on a load; the same count that triggers compaction).
CACHE_GROWTH = 4
CACHE_FRAGMENTS = 256

# Fragments parsed and checked per batch: bounds the Arrow memory held at once while loading.
LOAD_BATCH = 128


class StageIndex:
    """One stage's fragments, cached by name: every location, and which are bad.

    `update(fs, directory)` brings it up to date with one listing, reading only
    fragments (and changed bad-marker files) it has not seen.
    """

    def __init__(self, log: logging.Logger, directory: str = "", cache: tuple[str, str, str] | None = None):
        """cache: (cache file, store url, stage) of the local index cache (index_cache.py), or None."""
        self.log = log
        self.directory = directory
        self.cache = cache
        self.cache_seed = True  # may the first update start from the cache file?
        self.retry_delays: tuple[float, ...] = ()  # waits between attempts at a fragment that fails to read
        self.from_cache = 0  # fragments whose rows came from the index cache (tests and benchmarks watch it)
        self._signature: dict[str, tuple] = {}  # live fragment -> its listing signature
        self._saved: set[str] | None = None  # fragments the cache file covers (None: no usable file)
        self._saved_rows = 0
        self._saved_counts: dict[str, int] = {}  # rows per fragment in the cache file
        self.fragments: list[str] = []  # loaded fragment names; a row's `frag` code indexes it
        self._frag_code: dict[str, int] = {}
        self._live: set[int] = set()  # codes of fragments still listed
        self.bad_fragments: dict[str, tuple] = {}  # bad-marker file -> listing signature when read
        self.bad: set[tuple[str, str, str]] = set()  # (item_key, shard_id, fragment)
        self._bad_by_file: dict[str, list[tuple[str, str, str]]] = {}
        self.unreadable: dict[str, str] = {}  # fragment -> why it was refused
        self.refused: dict[str, tuple] = {}  # refused fragment -> signature (re-read if it changes)
        self.shards: list[str] = []
        self._shard_code: dict[str, int] = {}
        self.field_names: list[str] = []
        self._field_code: dict[str, int] = {}
        self.group_names: list[str] = []
        self._group_code: dict[str, int] = {}
        self.segments: list[Segment] = []
        self.reads = 0  # fragment files read so far (tests and benchmarks watch it)
        self._present_count: int | None = None
        # A published snapshot's rows (snapshots.py): fixed, so `update` never lists the directory.
        self.frozen = False

    # -- loading ---------------------------------------------------------------------------

    def update(self, fs, attempts: int = RELIST_ATTEMPTS) -> list[str]:
        """List the stage once and read what is new; returns the new fragment names.

        A fragment deleted between the listing and its read (a `compact` replaced it)
        makes us list again, for the merged fragment that holds its rows. A frozen index
        (a snapshot's rows) lists nothing and reads nothing.
        """
        if self.frozen:
            return []
        listed = list_entries(fs, self.directory, ".parquet", detail_prefix=BAD_PREFIX,
                              known=self._signature if self.cache is not None else None)
        frags = {n: s for n, s in listed.items() if not n.startswith(BAD_PREFIX)}
        markers = {n: s for n, s in listed.items() if n.startswith(BAD_PREFIX)}
        if self.cache is not None and self.cache_seed and not self.fragments:
            self._seed(frags)
        # A name seen before but compacted away may be written again (the same shard recomputed).
        new = [n for n in frags if not self._is_live(n)
               and not (n in self.refused and self.refused[n] == frags[n])]
        new_markers = [n for n, sig in markers.items() if self.bad_fragments.get(n) != sig]
        vanished = {self._frag_code[n] for n in self.fragments if n not in frags and self._frag_code[n] in self._live}
        gone_markers = [n for n in self.bad_fragments if n not in markers]
        added, segment_cols, lost = [], [], []
        read = functools.partial(_load, fs, self.directory, self.retry_delays, self.log)
        with ThreadPoolExecutor(min(READ_THREADS, max(1, len(new) + len(new_markers)))) as pool:
            results = dict(zip(new_markers, pool.map(read, new_markers)))
            for start in range(0, len(new), LOAD_BATCH):
                batch = new[start:start + LOAD_BATCH]
                tables, names = [], []
                for name, (table, error) in zip(batch, pool.map(read, batch)):
                    if error is _VANISHED:
                        lost.append(name)
                        continue
                    table, why = (None, error) if error else prepare(table)
                    if why is not None:
                        self._refuse(name, why, frags[name])
                        continue
                    tables.append(table)
                    names.append(name)
                kept, parts = self._take(tables, names, frags)
                added += kept
                segment_cols += parts
        self.reads += len(new) + len(new_markers) - len(lost)
        marker_rows = []
        for name in new_markers:
            table, error = results[name]
            if error is _VANISHED:
                lost.append(name)
                continue
            rows, why = (None, error) if error else check_markers(table)
            if why is not None:
                self._refuse(name, why, markers[name])
                continue
            self.bad_fragments[name] = markers[name]
            self._bad_by_file[name] = rows
            marker_rows += rows
        for name in gone_markers:
            self.bad_fragments.pop(name, None)
            self._bad_by_file.pop(name, None)
        for name in [n for n in self.unreadable if n not in listed]:
            self.unreadable.pop(name)
            self.refused.pop(name, None)
        self.bad = {m for rows in self._bad_by_file.values() for m in rows}
        if vanished:
            self._live -= vanished
            self._rebuild(segment_cols)
        elif segment_cols:
            self._add_segment(segment_cols)
        if vanished or gone_markers:
            self._reapply_markers()
        else:
            # New markers apply to every row; known markers to the rows just added.
            self._apply_markers(marker_rows + [m for m in self.bad if m[2] in set(added)])
        if lost:
            if attempts <= 1:
                raise StoreError(
                    f"index fragments in {self.directory} kept vanishing while being read",
                    "another process is compacting this stage; retry when it is done",
                )
            return added + self.update(fs, attempts - 1)  # compacted meanwhile: list again
        self._signature = {n: frags[n] for n in frags if self._is_live(n)}
        if self.cache is not None:
            self._save_if_behind()
        return added

    # -- the local index cache (index_cache.py) -------------------------------------------------

    def _seed(self, frags: dict[str, tuple]) -> None:
        """Start from the cache file's rows instead of parsing fragments, if it checks out.

        Its fragments that are no longer listed stay dead (their rows are dropped by the
        update that follows); one listed with another size or time voids the whole file.
        """
        path, url, stage = self.cache
        got = index_cache.load(path, url, stage)
        if got is None:
            return
        header, cols = got
        try:
            names = [str(f[0]) for f in header["fragments"]]
            sigs = [tuple(f[1]) if f[1] is not None else None for f in header["fragments"]]
            shards, fields, groups = (list(map(str, header[k])) for k in ("shards", "fields", "groups"))
        except (KeyError, TypeError, IndexError):
            return
        n = len(cols["key"])
        ranges = {"shard": len(shards), "field": len(fields), "group": len(groups), "frag": len(names)}
        # "" stands for a null in the name lists (no row that passed the grammar uses it).
        if (len(set(names)) != len(names) or not all(is_key(x) or x == "" for x in shards)
                or not all(plain_name(x) or x == "" for x in fields) or not all(map(plain_name, names))
                or any(n and (cols[c].min() < 0 or cols[c].max() >= size) for c, size in ranges.items())):
            return
        if any(sig is not None and name in frags and frags[name] != sig for name, sig in zip(names, sigs)):
            return  # a listed fragment is not the one the file read: trust the store
        self.fragments, self._frag_code = names, {x: i for i, x in enumerate(names)}
        self._live = {i for i, sig in enumerate(sigs) if sig is not None}
        self.shards, self._shard_code = shards, {x: i for i, x in enumerate(shards)}
        self.field_names, self._field_code = fields, {x: i for i, x in enumerate(fields)}
        self.group_names, self._group_code = groups, {x: i for i, x in enumerate(groups)}
        if n:
            segment = Segment({**cols, "bad": np.zeros(n, bool)})
            if not segment.presorted:
                return self._forget()  # not in key order: not a file this code wrote
            self.segments = [segment]
        self.from_cache = len(self._live)
        self._saved = {x for x, sig in zip(names, sigs) if sig is not None}
        self._saved_rows = n
        counts = np.bincount(cols["frag"], minlength=len(names))
        self._saved_counts = {x: int(counts[i]) for i, x in enumerate(names)}

    def _forget(self) -> None:
        fresh = StageIndex(self.log, self.directory, self.cache)
        fresh.retry_delays = self.retry_delays
        self.__dict__.update(fresh.__dict__)

    def _save_if_behind(self) -> None:
        """Write the cache file when it lacks enough of what is now known: always when there
        is no file; else once the rows it lacks or holds in vanished fragments reach a quarter
        of its rows, or it lacks CACHE_FRAGMENTS fragments."""
        live = set(self._signature)
        saved = self._saved
        if live == (saved or set()):
            return
        rows = self.fragment_rows()
        if saved is not None:
            changed = sum(rows.get(n, 0) for n in live - saved) + sum(self._saved_counts.get(n, 0)
                                                                      for n in saved - live)
            if changed * CACHE_GROWTH < self._saved_rows and len(live - saved) < CACHE_FRAGMENTS:
                return
        segments = self.segments
        # Each segment's rows in key order, then one stable argsort: timsort merges the sorted
        # runs in linear time, and a key's rows stay in fragment order.
        hi = np.concatenate([s.hi_sorted for s in segments] or [np.zeros(0, np.uint64)])
        order = np.argsort(hi, kind="stable") if len(segments) > 1 else np.arange(len(hi))

        def column(name: str) -> np.ndarray:
            if not segments:  # fragments without rows
                return np.zeros(0, dict(index_cache.COLUMNS)[name])
            if len(segments) == 1:
                return segments[0].cols[name][segments[0].order]
            return np.concatenate([s.cols[name][s.order] for s in segments])[order]

        codes = self._live
        fragments = [[n, list(self._signature[n]) if self._frag_code[n] in codes and n in self._signature
                      else None] for n in self.fragments]
        path, url, stage = self.cache
        header = {"store": url, "stage": stage, "fragments": fragments, "shards": self.shards,
                  "fields": self.field_names, "groups": self.group_names}
        index_cache.save(path, header, column, len(hi))
        self._saved, self._saved_rows, self._saved_counts = live, len(hi), rows

    def _refuse(self, name: str, why: str, signature) -> None:
        if self.unreadable.get(name) != why:
            self.log.warning("index fragment %s/%s is refused (%s); its items count as missing. "
                             "Run `sdxlpipe store verify`, then delete or restore that file.",
                             self.directory, name, why)
        self.unreadable[name] = why
        self.refused[name] = signature

    def add_written(self, name: str, table: pa.Table) -> None:
        """A fragment this process just wrote: cached without reading it back."""
        if self._is_live(name):
            return
        table, why = prepare(table)
        added, parts = self._take([table], [name], {name: None}) if why is None else ([], [])
        if not added:
            raise StoreError(f"index fragment {name} this process wrote breaks the grammar: {why}",
                             "this is a bug in sdxlpipe's writer; please report it")
        self._add_segment(parts)
        self._apply_markers([m for m in self.bad if m[2] == name])

    def _is_live(self, name: str) -> bool:
        return name in self._frag_code and self._frag_code[name] in self._live

    def _code(self, names: list[str], codes: dict[str, int], value: str) -> int:
        if value not in codes:
            codes[value] = len(names)
            names.append(value)
        return codes[value]

    def _take(self, tables: list[pa.Table], names: list[str], signatures: dict) -> tuple[list[str], list[dict]]:
        """Check the rows of new fragments in one vectorised pass; refuse the fragments with a
        bad row (whole: none of their rows is used), encode the rest as numpy columns."""
        if not tables:
            return [], []
        table = pa.concat_tables(tables)
        lengths = np.array([t.num_rows for t in tables], np.int64)
        local = np.repeat(np.arange(len(tables), dtype=np.int32), lengths)
        ok, why = check_rows(table, local)
        for code, reason in why.items():
            self._refuse(names[code], reason, signatures[names[code]])
        kept = [n for i, n in enumerate(names) if i not in why]
        if why:
            keep = ~np.isin(local, np.fromiter(why, np.int32, len(why)))
            table, local = table.filter(pa.array(keep)), local[keep]
        for name in kept:
            self.unreadable.pop(name, None)
            self.refused.pop(name, None)
        frag_map = np.full(len(names), -1, np.int32)
        for i, name in enumerate(names):
            if i not in why:
                frag_map[i] = self._code(self.fragments, self._frag_code, name)
                self._live.add(int(frag_map[i]))
        if table.num_rows == 0:
            return kept, []
        table = table.combine_chunks()

        def coded(column: str, names_: list[str], codes_: dict) -> np.ndarray:
            values = table.column(column).chunk(0)
            if values.null_count == len(values):  # e.g. no group column: all ""
                return np.full(len(values), self._code(names_, codes_, ""), np.int32)
            mapping = np.array([self._code(names_, codes_, v) for v in [*values.dictionary.to_pylist(), ""]],
                               np.int32)  # last: a null counts as ""
            return mapping[dict_codes(values)]

        cols = {
            # Copies out of the Arrow buffers, so the parsed fragments can be freed.
            "key": hex_column(table.column("item_key"), checked=True).copy(),
            "shard": coded("shard_id", self.shards, self._shard_code),
            "field": coded("field", self.field_names, self._field_code),
            "offset": as_numpy(table.column("offset").chunk(0)),
            "length": as_numpy(table.column("length").chunk(0)),
            "xxh3": hex_column(table.column("xxh3"), checked=True).copy(),
            "group": coded("group", self.group_names, self._group_code),
            "frag": frag_map[local],
            "bad": np.zeros(table.num_rows, bool),
        }
        return kept, [cols]

    def _add_segment(self, parts: list[dict]) -> None:
        parts = [p for p in parts if len(p["key"])]
        if not parts:
            return
        # Column by column, dropping each column's parts once joined: peak memory ~ one copy.
        cols = {c: np.concatenate([p.pop(c) for p in parts]) if len(parts) > 1 else parts[0][c] for c in COLUMNS}
        self.segments.append(Segment(cols))
        self._present_count = None
        big = max(s.n for s in self.segments)
        small = sum(s.n for s in self.segments) - big
        if small * MERGE_SHARE > big:
            self._rebuild([])
        elif len(self.segments) > MAX_SEGMENTS:
            # Merge the small segments among themselves, not into the big one: an encode adds a
            # segment per chunk, and re-sorting a million rows every 32 chunks cost seconds each.
            # Segments stay in fragment order (a key's first good row is its first location).
            first = max(range(len(self.segments)), key=lambda i: self.segments[i].n)
            if len(self.segments) - first - 1 < 2:
                self._rebuild([])
            else:
                self.segments = self.segments[:first + 1] + [Segment(concat(self.segments[first + 1:]))]

    def _rebuild(self, extra: list[dict]) -> None:
        """Drop vanished fragments' rows, then add `extra` as a segment.

        Segment by segment, without sorting again: a segment without vanished rows stays as
        it is, and filtering keeps the rest in key order (a compaction of the small fragments
        beside a big one must not re-sort the big one's million rows).
        """
        live = np.fromiter(self._live, np.int32, len(self._live))
        segments = []
        for seg in self.segments:
            keep = np.isin(seg.cols["frag"], live)
            if keep.all():
                segments.append(seg)
            elif keep.any():
                new_row = np.cumsum(keep) - 1
                order = new_row[seg.order[keep[seg.order]]]
                segments.append(Segment({c: v[keep] for c, v in seg.cols.items()}, order))
        self.segments = segments
        self._present_count = None
        if extra:
            self._add_segment(extra)

    def fragment_rows(self) -> dict[str, int]:
        """Rows per live fragment."""
        codes = np.concatenate([s.cols["frag"] for s in self.segments] or [np.zeros(0, np.int32)])
        counts = np.bincount(codes, minlength=len(self.fragments))
        return {n: int(counts[self._frag_code[n]]) for n in self.live_fragments}

    def _apply_markers(self, markers: list[tuple[str, str, str]]) -> None:
        """Set `bad` on the rows these markers name: one batched searchsorted per segment."""
        if not markers:
            return
        keys = np.array([m[0].encode() for m in markers], "S32")
        hi = top64(keys)
        for s in self.segments:
            lo, up = np.searchsorted(s.hi_sorted, hi, "left"), np.searchsorted(s.hi_sorted, hi, "right")
            touched = False
            for (key, shard, frag), a, b, k in zip(markers, lo, up, keys):
                shard_code, frag_code = self._shard_code.get(shard), self._frag_code.get(frag)
                if shard_code is None or frag_code is None or a == b:
                    continue
                rows = s.order[a:b]
                hit = rows[(s.cols["key"][rows] == k) & (s.cols["shard"][rows] == shard_code)
                           & (s.cols["frag"][rows] == frag_code)]
                if len(hit):
                    s.cols["bad"][hit] = True
                    touched = True
            if touched:
                s.invalidate()
        self._present_count = None

    def _reapply_markers(self) -> None:
        """Clear every `bad` flag and apply all known markers again (after files vanished)."""
        for s in self.segments:
            s.cols["bad"][:] = False
            s.invalidate()
        self._apply_markers(sorted(self.bad))

    # -- lookups ---------------------------------------------------------------------------

    @property
    def live_fragments(self) -> list[str]:
        """Fragments whose rows are in the index (refused and vanished ones excluded)."""
        return [n for n in self.fragments if self._frag_code[n] in self._live]

    @property
    def row_count(self) -> int:
        return sum(s.n for s in self.segments)

    def present_mask(self, keys: np.ndarray) -> np.ndarray:
        """Per 'S32' key: has it at least one row not marked bad?"""
        hi = top64(keys)
        out = np.zeros(len(keys), bool)
        for s in self.segments:
            todo = np.flatnonzero(~out)
            if len(todo) == 0:
                break
            out[todo] = s.find(keys[todo], hi[todo], None) >= 0
        out &= keys != b""
        return out

    def known_mask(self, keys: np.ndarray) -> np.ndarray:
        """Per 'S32' key: does any row (bad or not) name it?"""
        hi = top64(keys)
        out = np.zeros(len(keys), bool)
        for s in self.segments:
            todo = np.flatnonzero(~out)
            out[todo] = s.find(keys[todo], hi[todo], -1) >= 0
        out &= keys != b""
        return out

    def present_keys(self) -> np.ndarray:
        """Unique 'S32' keys with a good row, sorted by their 128 bits."""
        if not self.segments:
            return np.zeros(0, "S32")
        keys = np.concatenate([s.cols["key"][~s.cols["bad"]] for s in self.segments])
        hi, lo = top64(keys), top64(keys, low=True)
        order = np.lexsort((lo, hi))
        hi, lo = hi[order], lo[order]
        first = np.ones(len(order), bool)
        first[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
        return keys[order[first]]

    def present(self) -> set[str]:
        return {k.decode() for k in self.present_keys()}

    def present_count(self) -> int:
        if self._present_count is None:
            self._present_count = len(self.present_keys())
        return self._present_count

    def first_good(self, keys: np.ndarray, field: str | None) -> list[tuple[int, int]]:
        """Per key, (segment, row) of its first good row of `field` (any field if None), or (-1, -1)."""
        seg, row = self._first_good(keys, field)
        return list(zip(seg.tolist(), row.tolist()))

    def _first_good(self, keys: np.ndarray, field: str | None) -> tuple[np.ndarray, np.ndarray]:
        hi = top64(keys)
        seg = np.full(len(keys), -1, np.int64)
        row = np.full(len(keys), -1, np.int64)
        code = None
        if field is not None:
            code = self._field_code.get(field)
            if code is None:
                return seg, row
        for n, s in enumerate(self.segments):
            todo = np.flatnonzero(seg < 0)
            if len(todo) == 0:
                break
            found = s.find(keys[todo], hi[todo], code)
            hit = found >= 0
            seg[todo[hit]] = n
            row[todo[hit]] = found[hit]
        return seg, row

    def first_good_table(self, keys: np.ndarray, field: str) -> tuple[pa.Table, np.ndarray]:
        """The first good row of each key's `field` as a GROUPED_SCHEMA table (the keys found, in
        their order), and the mask of the keys found: a published snapshot's locations, without a
        Python object per row."""
        seg, row = self._first_good(keys, field)
        found = seg >= 0
        parts = {c: [] for c in ("key", "shard", "field", "offset", "length", "xxh3", "group")}
        order = []
        for n, s in enumerate(self.segments):
            at = np.flatnonzero(seg == n)
            if len(at):
                order.append(at)
                for c in parts:
                    parts[c].append(s.cols[c][row[at]])
        if order:
            back = np.argsort(np.concatenate(order), kind="stable")  # back to the keys' order
            cols = {c: np.concatenate(v)[back] for c, v in parts.items()}
        else:
            cols = {"key": np.zeros(0, "S32"), "xxh3": np.zeros(0, "S32"), "offset": np.zeros(0, np.int64),
                    "length": np.zeros(0, np.int64), **{c: np.zeros(0, np.int32) for c in ("shard", "field", "group")}}
        table = pa.table({
            "item_key": _strings(cols["key"]), "field": _decode(self.field_names, cols["field"]),
            "shard_id": _decode(self.shards, cols["shard"]), "offset": pa.array(cols["offset"], pa.int64()),
            "length": pa.array(cols["length"], pa.int64()), "xxh3": _strings(cols["xxh3"]),
            "group": _decode(self.group_names, cols["group"]),
        }, schema=GROUPED_SCHEMA)
        return table, found

    def location(self, seg: int, row: int) -> Location:
        c = self.segments[seg].cols
        return Location(c["key"][row].decode(), self.field_names[c["field"][row]], self.shards[c["shard"][row]],
                        int(c["offset"][row]), int(c["length"][row]), c["xxh3"][row].decode(),
                        self.fragments[c["frag"][row]], self.group_names[c["group"][row]])

    def locations_of(self, item_key: str) -> list[Location]:
        """Every row of one key (bad ones too), in fragment order."""
        if not is_key(item_key):
            return []
        key = item_key.encode()
        return [self.location(n, r) for n, s in enumerate(self.segments) for r in s.rows_of(key)]

    def is_bad(self, loc: Location) -> bool:
        return (loc.item_key, loc.shard_id, loc.fragment) in self.bad

    def good(self, item_key: str, field: str | None, stage: str) -> list[Location]:
        """Good locations of one field of a key, one per distinct place in a shard."""
        locs = [l for l in self.locations_of(item_key) if not self.is_bad(l)]
        if field is None:
            fields = sorted({l.field for l in locs})
            if len(fields) > 1:
                raise StoreError(
                    f"item {item_key} of stage {stage} has fields {fields}; which one to read?",
                    "pass field=... to read() or read_many()",
                )
        else:
            locs = [l for l in locs if l.field == field]
        seen, unique = set(), []
        for l in locs:
            if (l.shard_id, l.offset) not in seen:
                seen.add((l.shard_id, l.offset))
                unique.append(l)
        return unique

    @property
    def rows(self) -> list[Location]:
        """Every row as a Location: for maintenance commands and tests, not for lookups."""
        return [self.location(n, r) for n, s in enumerate(self.segments) for r in range(s.n)]

    def compacted_table(self, leave: str | None = None) -> pa.Table:
        """The good rows, each distinct row once, in (shard_id, offset, item_key, field) order:
        what `compact` writes (leave: a fragment whose rows stay out). Sorted and deduplicated
        in numpy (pyarrow's group_by took ~5 s CPU for a million rows)."""
        cols = concat(self.segments)
        take = ~cols["bad"]
        if leave is not None:
            take &= cols["frag"] != self._frag_code[leave]
        cols = {c: v[take] for c, v in cols.items()}
        rank = {}
        for name, names in (("shard", self.shards), ("field", self.field_names), ("group", self.group_names)):
            order = np.argsort(np.array(names or [""], dtype=object), kind="stable")
            rank[name] = np.empty(len(order), np.int64)
            rank[name][order] = np.arange(len(order))
            rank[name] = rank[name][cols[name]]
        # Rows are nearly always unique by (shard, offset): sort by those two; only when some
        # share them (the same shard indexed twice) does every column take part, so that equal
        # rows end up next to each other. lexsort's last key leads.
        rows = np.lexsort([cols["offset"], rank["shard"]])
        tied = (rank["shard"][rows][1:] == rank["shard"][rows][:-1]) & (cols["offset"][rows][1:] == cols["offset"][rows][:-1])
        if tied.any():
            sort_keys = [rank["group"], top64(cols["xxh3"], low=True), top64(cols["xxh3"]), cols["length"],
                         rank["field"], top64(cols["key"], low=True), top64(cols["key"]), cols["offset"],
                         rank["shard"]]
            order = np.lexsort(sort_keys)
            keep = np.ones(len(order), bool)
            keep[1:] = np.any([k[order][1:] != k[order][:-1] for k in sort_keys], axis=0)
            rows = order[keep]
        return pa.table({
            "item_key": _strings(cols["key"][rows]),
            "field": _decode(self.field_names, cols["field"][rows]),
            "shard_id": _decode(self.shards, cols["shard"][rows]),
            "offset": pa.array(cols["offset"][rows], pa.int64()),
            "length": pa.array(cols["length"][rows], pa.int64()),
            "xxh3": _strings(cols["xxh3"][rows]),
            "group": _decode(self.group_names, cols["group"][rows]),
        }, schema=GROUPED_SCHEMA)

    def mark_bad(self, pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str, str]]:
        """Bad-marker rows for (item_key, shard_id) pairs: one per fragment that lists the pair.

        Looks up each pair's key; never scans the stage.
        """
        new = set()
        for key, shard in set(pairs):
            for loc in self.locations_of(key):
                if loc.shard_id == shard:
                    new.add((key, shard, loc.fragment))
        return sorted(new - self.bad)

    def remember_markers(self, file_name: str, rows: list[tuple[str, str, str]]) -> None:
        """Markers this process wrote to `file_name` (its whole content), applied now."""
        self._bad_by_file[file_name] = list(rows)
        self.bad_fragments[file_name] = ("written", len(rows))  # re-read once the listing shows it
        self.bad |= set(rows)
        self._apply_markers(list(rows))


def _strings(values: np.ndarray) -> pa.Array:
    """'S32' numpy keys as an Arrow string array, without a Python object per row."""
    n = len(values)
    offsets = pa.py_buffer(np.arange(0, HEX_LEN * (n + 1), HEX_LEN, dtype=np.int32))
    return pa.StringArray.from_buffers(n, offsets, pa.py_buffer(np.ascontiguousarray(values).tobytes()))


def _decode(names: list[str], codes: np.ndarray) -> pa.Array:
    dictionary = pa.array(names or [""], pa.string())
    return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), dictionary).dictionary_decode()


_VANISHED = "vanished"


def _load(fs, directory: str, delays: tuple[float, ...], log: logging.Logger,
          name: str) -> tuple[pa.Table | None, str | None]:
    """(table, None), (None, why the bytes are unusable), or (None, _VANISHED) if it was deleted.

    An I/O error is not damage: it is retried after each of `delays`, then raised as a
    StoreError naming the fragment (its items must not silently count as missing).
    """
    path = posixpath.join(directory, name)
    for delay in (*delays, None):
        try:
            data = fs.cat_file(path)
            break
        except FileNotFoundError:
            return None, _VANISHED
        except OSError as e:
            if delay is None:
                raise StoreError(
                    f"could not read index fragment {path}: {type(e).__name__}: {e} ({len(delays) + 1} attempts)",
                    "the store's disk or network is failing; nothing was refused or marked bad, so "
                    "run the command again once the store is reachable",
                ) from e
            log.warning("reading index fragment %s failed (%s); retrying in %.1f s", path, e, delay)
            time.sleep(delay)
    return _parse(data, () if name.startswith(BAD_PREFIX) else CODED)


def _parse(data: bytes | str, dictionary: tuple[str, ...] = ()) -> tuple[pa.Table | None, str | None]:
    """(table, None), or (None, why) for bytes that are not a parquet file."""
    if isinstance(data, str):
        return None, data
    try:
        return read_parquet_bytes(data, dictionary), None
    except Exception as e:  # noqa: BLE001 - bytes already read: whatever the parser meets, they are unusable
        return None, f"{type(e).__name__}: {e}"
