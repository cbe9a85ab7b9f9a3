"""Index fragments: where each item's bytes are, and which locations went bad.

Owns the parquet files under `index/<stage>/`: writing one fragment, reading
a stage's fragments into a `StageIndex`, and the bad markers (`bad-*.parquet`).
Fragments are immutable, so a `StageIndex` caches each by name and a refresh
reads only the names it has not seen (one listing). Rows live in numpy
columns, never as one Python object per row: `present` / `missing` /
`locate` are searchsorted lookups over the keys' top 64 bits. Every row read
is checked against the grammar in README.md (hex keys and shard ids, plain
field names, non-negative offsets); a fragment that fails is refused whole,
with a warning naming it, and none of its rows is used to open a path.
See README.md for the columns.
"""

from __future__ import annotations

import functools
import logging
import os
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import index_cache
from .shards import StoreError, is_local

BAD_PREFIX = "bad-"
INDEX_SCHEMA = pa.schema(
    [
        ("item_key", pa.string()),
        ("field", pa.string()),
        ("shard_id", pa.string()),
        ("offset", pa.int64()),
        ("length", pa.int64()),
        ("xxh3", pa.string()),
    ]
)
# Optional 7th column: the model fingerprint the item was made with (for `store du`).
GROUPED_SCHEMA = INDEX_SCHEMA.append(pa.field("group", pa.string()))
# Fragments are read with these columns as dictionaries: parquet stores them so, and the
# codes come without `dictionary_encode`, whose first call imports pyarrow.compute (0.45 s)
# on every no-op run.
CODED = ("shard_id", "field", "group")
_DICT = pa.dictionary(pa.int32(), pa.string())
READ_SCHEMA = pa.schema([pa.field(f.name, _DICT) if f.name in CODED else f for f in GROUPED_SCHEMA])
BAD_SCHEMA = pa.schema([("item_key", pa.string()), ("shard_id", pa.string()), ("fragment", pa.string())])
# Fragments are small files; 16 threads hide per-file latency on object stores.
READ_THREADS = 16
# A fragment deleted by `compact` between listing and reading makes us list again, this often.
RELIST_ATTEMPTS = 5
# Item keys, shard ids and checksums are xxh3-128 in lowercase hex (README.md, "Index fragments").
HEX_LEN = 32
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


class Location(NamedTuple):
    item_key: str
    field: str
    shard_id: str
    offset: int
    length: int
    xxh3: str
    fragment: str  # file name of the fragment that listed this row
    group: str = ""  # the model fingerprint it was made with, when the writer said

    def row(self) -> tuple:
        """The row as GROUPED_SCHEMA writes it."""
        return (*self[:6], self.group)


def to_parquet(rows: Iterable[tuple], schema: pa.Schema) -> bytes:
    columns = list(zip(*rows)) or [[] for _ in schema]
    table = pa.table([pa.array(list(c), type=f.type) for c, f in zip(columns, schema)], schema=schema)
    return table_bytes(table)


def table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def read_parquet_bytes(data: bytes, dictionary: tuple[str, ...] = ()) -> pa.Table:
    """dictionary: columns to read as dictionary arrays (see CODED)."""
    # ParquetFile, not pq.read_table: the latter imports pyarrow.dataset (0.5 s) on every no-op run.
    # use_threads=False: fragments are small and are read many at once on our own threads.
    return pq.ParquetFile(pa.BufferReader(data), read_dictionary=list(dictionary) or None).read(use_threads=False)


def list_entries(fs, directory: str, suffix: str, detail_prefix: str = "",
                 known: dict[str, tuple] | None = None) -> dict[str, tuple]:
    """{base name: (size, modified)} of the files in `directory` ending with `suffix`.

    On a local disk only names starting with `detail_prefix` are stat'ed (the rest get
    (None, "")): a stage of a thousand immutable fragments lists in a millisecond.
    known: immutable files' signatures from an earlier listing; on a local disk every
    other name is stat'ed too (the index cache compares signatures; ~3 ms per 1,000).
    """
    if is_local(fs):
        try:
            names = sorted(n for n in os.listdir(directory) if n.endswith(suffix))
        except FileNotFoundError:
            return {}
        out = {}
        for n in names:
            if known is not None and n in known and not (detail_prefix and n.startswith(detail_prefix)):
                out[n] = known[n]
            elif known is not None or (detail_prefix and n.startswith(detail_prefix)):
                try:
                    st = os.stat(os.path.join(directory, n))
                except FileNotFoundError:
                    continue
                out[n] = (st.st_size, str(st.st_mtime_ns))
            elif detail_prefix or os.path.isfile(os.path.join(directory, n)):
                out[n] = (None, "")  # index dirs hold only files: no stat per fragment
        return out
    out = {}
    for e in list_detail(fs, directory):
        name = posixpath.basename(e["name"].rstrip("/"))
        if e.get("type") != "directory" and name.endswith(suffix):
            out[name] = (e.get("size"), str(e.get("mtime") or e.get("LastModified") or e.get("updated") or ""))
    return dict(sorted(out.items()))


def list_files(fs, directory: str, suffix: str) -> list[str]:
    """Base names in `directory` ending with `suffix`; an absent directory is empty."""
    return list(list_entries(fs, directory, suffix))


def list_names(fs, directory: str, dirs_only: bool = False) -> list[str]:
    """Sorted base names of everything in `directory` (only its subdirectories with dirs_only)."""
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in list_detail(fs, directory)
                  if not dirs_only or e.get("type") == "directory")


def list_detail(fs, directory: str) -> list[dict]:
    """fsspec's detailed listing of `directory`, fresh; an absent directory is empty.

    The store's one lister: every listing above goes through here (or the local fast path).
    """
    fs.invalidate_cache(directory)  # s3fs and friends cache listings; fragments come and go.
    try:
        return fs.ls(directory, detail=True)
    except FileNotFoundError:
        return []


# -- the grammar of rows -----------------------------------------------------------------


def hex_column(column, checked: bool = False) -> np.ndarray | None:
    """A string column of 32 lowercase hex digits as a numpy 'S32' array; None if any row is not.

    checked: the rows were already checked (check_rows), skip the pass over the bytes.
    """
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.type == pa.large_string():
        arr = arr.cast(pa.string())
    if arr.type != pa.string() or arr.null_count:
        return None
    n = len(arr)
    if n == 0:
        return np.zeros(0, "S32")
    offsets = np.frombuffer(arr.buffers()[1], np.int32, n + 1, arr.offset * 4)
    if not (np.diff(offsets) == HEX_LEN).all():
        return None
    start = int(offsets[0])
    raw = np.frombuffer(arr.buffers()[2], np.uint8, n * HEX_LEN, start)
    if not checked and not _all_hex(raw):
        return None
    return raw.view(f"S{HEX_LEN}")


def _hex_bytes(raw: np.ndarray) -> np.ndarray:
    """Per byte: is it one of 0-9a-f? (uint8 arithmetic wraps, so each test is one compare.)"""
    return ((raw - np.uint8(48)) < 10) | ((raw - np.uint8(97)) < 6)


def _all_hex(raw: np.ndarray) -> bool:
    # In blocks, so that the temporaries stay small at a million keys.
    block = 1 << 22
    return all(_hex_bytes(raw[i:i + block]).all() for i in range(0, len(raw), block))


def keys_array(keys) -> np.ndarray:
    """Query keys (any iterable of str) as 'S32'; a key that is not 32 hex digits becomes b'' (absent)."""
    if isinstance(keys, np.ndarray) and keys.dtype == np.dtype("S32"):
        return keys
    keys = list(keys)
    # One join instead of pa.array(list), whose first call imports pandas (1.4 s) on the no-op path.
    try:
        joined = "".join(keys).encode()
    except (TypeError, UnicodeEncodeError):
        joined = b""
    if len(joined) == HEX_LEN * len(keys) and (np.fromiter(map(len, keys), np.int64, len(keys)) == HEX_LEN).all():
        raw = np.frombuffer(joined, np.uint8)  # equal byte and char counts: all ASCII
        if _all_hex(raw):
            return raw.view(f"S{HEX_LEN}") if len(keys) else np.zeros(0, "S32")
    return np.array([k.encode() if is_key(k) else b"" for k in keys], "S32")


def is_key(key) -> bool:
    """Is `key` an item key of the grammar: 32 lowercase hex digits?"""
    return isinstance(key, str) and len(key) == HEX_LEN and all(c in "0123456789abcdef" for c in key)


def top64(keys: np.ndarray, low: bool = False) -> np.ndarray:
    """The first (low: last) 16 hex digits of each 'S32' key as uint64: the sort and search key."""
    if len(keys) == 0:
        return np.zeros(0, np.uint64)
    chars = keys.view(np.uint8).reshape(-1, HEX_LEN)[:, 16:] if low else keys.view(np.uint8).reshape(-1, HEX_LEN)[:, :16]
    # '0'-'9' -> 0-9, 'a'-'f' -> 10-15; b'' (a query key that is not hex) gives some value,
    # and its full key never matches.
    nib = (chars & np.uint8(15)) + np.uint8(9) * (chars >> np.uint8(6))
    packed = np.ascontiguousarray((nib[:, 0::2] << np.uint8(4)) | nib[:, 1::2])
    return packed.view(">u8").reshape(-1).astype(np.uint64)


def _np(arr: pa.Array) -> np.ndarray:
    """A null-free integer or boolean Arrow array as numpy, straight from its buffer.

    Not to_numpy(zero_copy_only=False): that path imports pandas (1.4 s) on the no-op path.
    """
    n = len(arr)
    if pa.types.is_boolean(arr.type):
        bits = np.frombuffer(arr.buffers()[1], np.uint8) if n else np.zeros(0, np.uint8)
        return np.unpackbits(bits, bitorder="little")[arr.offset:arr.offset + n].astype(bool)
    dtype = np.dtype(str(arr.type))  # int8 ... uint64: the same names in both
    return np.frombuffer(arr.buffers()[1], dtype, n, arr.offset * dtype.itemsize) if n \
        else np.zeros(0, dtype)


def _plain_name(text) -> bool:
    return bool(text) and not any(c in text for c in "/\\\0") and not text.startswith(".")


def _hex_rows(column, chars: bool = True) -> np.ndarray:
    """Per row of a string column: is it 32 lowercase hex digits? (One pass over the bytes.)"""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if n == 0:
        return np.zeros(0, bool)
    offsets = np.frombuffer(arr.buffers()[1], np.int32, n + 1, arr.offset * 4)
    ok = np.diff(offsets) == HEX_LEN
    if arr.null_count:
        ok &= _np(arr.is_valid())
    start, end = int(offsets[0]), int(offsets[-1])
    if chars and end > start:
        data = np.frombuffer(arr.buffers()[2], np.uint8, end - start, start)
        if not _all_hex(data):
            wrong = np.flatnonzero(~_hex_bytes(data)) + start
            ok[np.searchsorted(offsets, wrong, "right") - 1] = False
    return ok


def _prepare(table: pa.Table) -> tuple[pa.Table | None, str | None]:
    """A fragment's table in READ_SCHEMA (group "" when absent), or None and why not."""
    lacking = [n for n in INDEX_SCHEMA.names if n not in table.column_names]
    if lacking:
        return None, f"columns {lacking} missing"
    if "group" not in table.column_names:
        table = table.append_column("group", pa.nulls(table.num_rows, _DICT))
    table = table.select(READ_SCHEMA.names)
    if table.schema != READ_SCHEMA:  # this process's own writes, or another writer's types
        try:
            table = table.cast(READ_SCHEMA)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            return None, f"columns of the wrong type ({e})"
    return table, None


def check_rows(table: pa.Table, frag: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
    """Rows of GROUPED_SCHEMA against the grammar in README.md, all fragments at once.

    Returns the per-row verdict and, per fragment code with a failing row, why
    (the first rule it breaks).
    """
    ok = np.ones(table.num_rows, bool)
    why: dict[int, str] = {}

    def fail(bad: np.ndarray, reason: str) -> None:
        if not bad.any():  # np.unique would import numpy.ma (0.13 s) on the no-op path
            return
        for code in np.unique(frag[bad]).tolist():
            why.setdefault(code, reason)
        ok[bad] = False

    fail(~_hex_rows(table.column("item_key")), f"column item_key holds a value that is not {HEX_LEN} lowercase hex digits")
    shards = table.column("shard_id").combine_chunks()
    fail(~np.append(_hex_rows(shards.dictionary), False)[_codes(shards)],
         f"column shard_id holds a value that is not {HEX_LEN} lowercase hex digits")
    # A checksum is only ever compared with a digest, never used as a name: its length suffices.
    fail(~_hex_rows(table.column("xxh3"), chars=False), f"column xxh3 holds a value that is not {HEX_LEN} characters")
    for col in ("offset", "length"):
        values = table.column(col).combine_chunks()
        bad = _np(values) < 0  # null slots hold anything: they fail on their own below
        if values.null_count:  # fill_null is slow (~0.1 s per million): only when needed
            bad |= ~_np(values.is_valid())
        fail(bad, f"column {col} holds a null or negative value")
    fields = table.column("field").combine_chunks()
    wrong = np.array([not _plain_name(f) for f in fields.dictionary.to_pylist()] + [True], bool)  # last: null
    fail(wrong[_codes(fields)], "column field holds a null or a name that is not a plain member name "
                       "(no '/', '\\', leading '.')")
    return ok, why


def _codes(arr: pa.DictionaryArray) -> np.ndarray:
    """A dictionary array's indices as numpy, a null slot as len(dictionary)."""
    codes = _np(arr.indices)
    if arr.null_count:
        valid = np.unpackbits(np.frombuffer(arr.buffers()[0], np.uint8), bitorder="little")
        codes = np.where(valid[arr.offset:arr.offset + len(arr)].astype(bool), codes, len(arr.dictionary))
    return codes


def _check_markers(table: pa.Table) -> tuple[list | None, str | None]:
    lacking = [n for n in BAD_SCHEMA.names if n not in table.column_names]
    if lacking:
        return None, f"columns {lacking} missing"
    for col in ("item_key", "shard_id"):
        if hex_column(table.column(col)) is None:
            return None, f"column {col} holds a value that is not {HEX_LEN} lowercase hex digits"
    fragments = table.column("fragment").to_pylist()
    if not all(_plain_name(f) for f in fragments):
        return None, "column fragment holds a path, not a fragment's file name"
    return list(zip(table.column("item_key").to_pylist(), table.column("shard_id").to_pylist(), fragments)), None


# -- segments: rows in numpy, sorted by key ---------------------------------------------------


class _Segment:
    """Rows of some fragments: numpy columns, plus an order sorted by the key's top 64 bits."""

    def __init__(self, cols: dict[str, np.ndarray], order: np.ndarray | None = None):
        """order: the rows' stable order by key, when known (a filtered segment's)."""
        self.cols = cols  # key, shard, field, offset, length, xxh3, group, frag (codes), bad (bool)
        self.n = len(cols["key"])
        self.hi = top64(cols["key"])
        self._good: dict = {}
        if order is not None:
            self.presorted, self.order, self.hi_sorted = False, order, self.hi[order]
            return
        self.presorted = bool(self.n) and bool((self.hi[1:] >= self.hi[:-1]).all())
        if self.presorted:  # already in key order (the index cache writes rows so): no sort
            self.order, self.hi_sorted = np.arange(self.n), self.hi
        else:
            self.order = np.argsort(self.hi, kind="stable")  # stable: a key's rows stay in fragment order
            self.hi_sorted = self.hi[self.order]
        self._good: dict = {}

    def invalidate(self) -> None:
        self._good = {}

    def good_sorted(self, field: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(top64 sorted, row numbers) of the rows not marked bad, optionally of one field."""
        if field not in self._good:
            keep = ~self.cols["bad"][self.order]
            if field is not None:
                keep &= self.cols["field"][self.order] == field
            self._good[field] = (self.hi_sorted[keep], self.order[keep])
        return self._good[field]

    def find(self, q_keys: np.ndarray, q_hi: np.ndarray, field: int | None = -1) -> np.ndarray:
        """Per query key, the first row (in fragment order) that is good (and of `field`), or -1.

        field -1 means any row at all, bad or not.
        """
        if field == -1:
            hi_s, rows = self.hi_sorted, self.order
        else:
            hi_s, rows = self.good_sorted(field)
        found = np.full(len(q_keys), -1, np.int64)
        if len(hi_s) == 0 or len(q_keys) == 0:
            return found
        if len(q_hi) > 4096:
            # Sorted needles make searchsorted walk the array in order (numpy reuses the last
            # position as a bound): ~10x fewer cache misses for a million keys.
            by = np.argsort(q_hi, kind="stable")
            i = np.empty(len(q_hi), np.int64)
            i[by] = np.searchsorted(hi_s, q_hi[by], "left")
        else:
            i = np.searchsorted(hi_s, q_hi, "left")
        inside = i < len(hi_s)
        i_c = np.minimum(i, len(hi_s) - 1)
        hit = inside & (hi_s[i_c] == q_hi)
        exact = hit & (self.cols["key"][rows[i_c]] == q_keys)
        found[exact] = rows[i_c[exact]]
        # Same top 64 bits, other key at the first position: walk that run (only crafted keys do this).
        for j in np.flatnonzero(hit & ~exact):
            pos = int(i[j])
            while pos < len(hi_s) and hi_s[pos] == q_hi[j]:
                if self.cols["key"][rows[pos]] == q_keys[j]:
                    found[j] = rows[pos]
                    break
                pos += 1
        return found

    def rows_of(self, key: bytes) -> list[int]:
        """Row numbers of one key, in fragment order."""
        hi = top64(np.array([key], "S32"))[0]
        lo, up = np.searchsorted(self.hi_sorted, hi, "left"), np.searchsorted(self.hi_sorted, hi, "right")
        return [int(r) for r in self.order[lo:up] if self.cols["key"][r] == key]


_COLUMNS = ("key", "shard", "field", "offset", "length", "xxh3", "group", "frag", "bad")


def _concat(segments: list[_Segment], keep=None) -> dict[str, np.ndarray]:
    cols = {c: np.concatenate([s.cols[c] for s in segments]) if segments else None for c in _COLUMNS}
    if segments and keep is not None:
        cols = {c: v[keep] for c, v in cols.items()}
    if not segments:
        cols = {"key": np.zeros(0, "S32"), "xxh3": np.zeros(0, "S32"), "offset": np.zeros(0, np.int64),
                "length": np.zeros(0, np.int64), "bad": np.zeros(0, bool),
                **{c: np.zeros(0, np.int32) for c in ("shard", "field", "group", "frag")}}
    return cols


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
        self.segments: list[_Segment] = []
        self.reads = 0  # fragment files read so far (tests and benchmarks watch it)
        self._present_count: int | None = None

    # -- loading ---------------------------------------------------------------------------

    def update(self, fs, attempts: int = RELIST_ATTEMPTS) -> list[str]:
        """List the stage once and read what is new; returns the new fragment names.

        A fragment deleted between the listing and its read (a `compact` replaced it)
        makes us list again, for the merged fragment that holds its rows.
        """
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
                    table, why = (None, error) if error else _prepare(table)
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
            rows, why = (None, error) if error else _check_markers(table)
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
                or not all(_plain_name(x) or x == "" for x in fields) or not all(map(_plain_name, names))
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
            segment = _Segment({**cols, "bad": np.zeros(n, bool)})
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
        table, why = _prepare(table)
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
            return mapping[_codes(values)]

        cols = {
            # Copies out of the Arrow buffers, so the parsed fragments can be freed.
            "key": hex_column(table.column("item_key"), checked=True).copy(),
            "shard": coded("shard_id", self.shards, self._shard_code),
            "field": coded("field", self.field_names, self._field_code),
            "offset": _np(table.column("offset").chunk(0)),
            "length": _np(table.column("length").chunk(0)),
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
        cols = {c: np.concatenate([p.pop(c) for p in parts]) if len(parts) > 1 else parts[0][c] for c in _COLUMNS}
        self.segments.append(_Segment(cols))
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
                self.segments = self.segments[:first + 1] + [_Segment(_concat(self.segments[first + 1:]))]

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
                segments.append(_Segment({c: v[keep] for c, v in seg.cols.items()}, order))
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
        hi = top64(keys)
        seg = np.full(len(keys), -1, np.int64)
        row = np.full(len(keys), -1, np.int64)
        code = None
        if field is not None:
            code = self._field_code.get(field)
            if code is None:
                return list(zip(seg.tolist(), row.tolist()))
        for n, s in enumerate(self.segments):
            todo = np.flatnonzero(seg < 0)
            if len(todo) == 0:
                break
            found = s.find(keys[todo], hi[todo], code)
            hit = found >= 0
            seg[todo[hit]] = n
            row[todo[hit]] = found[hit]
        return list(zip(seg.tolist(), row.tolist()))

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
        cols = _concat(self.segments)
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

    def table(self, good_only: bool = False) -> pa.Table:
        """All rows (or the good ones) as a GROUPED_SCHEMA table, built column-wise."""
        cols = _concat(self.segments)
        if good_only:
            cols = {c: v[~cols["bad"]] for c, v in cols.items()}
        return pa.table({
            "item_key": _strings(cols["key"]),
            "field": _decode(self.field_names, cols["field"]),
            "shard_id": _decode(self.shards, cols["shard"]),
            "offset": pa.array(cols["offset"], pa.int64()),
            "length": pa.array(cols["length"], pa.int64()),
            "xxh3": _strings(cols["xxh3"]),
            "group": _decode(self.group_names, cols["group"]),
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
    except (OSError, pa.ArrowException) as e:
        return None, f"{type(e).__name__}: {e}"
