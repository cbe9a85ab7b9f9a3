"""Index fragments: where each item's bytes are, and which locations went bad.

Owns the parquet files under `index/<stage>/`: writing one fragment, reading
all of a stage's fragments into a `StageIndex`, and the append-only bad
markers (`bad-*.parquet`). Fragments are never edited; `compact` replaces
many with one. See README.md for the columns.
"""

from __future__ import annotations

import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from .shards import StoreError

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
BAD_SCHEMA = pa.schema([("item_key", pa.string()), ("shard_id", pa.string()), ("fragment", pa.string())])
# Fragments are small files; 16 threads hide per-file latency on object stores.
READ_THREADS = 16
# A fragment deleted by `compact` between listing and reading makes us list again, this often.
RELIST_ATTEMPTS = 5


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
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def list_files(fs, directory: str, suffix: str) -> list[str]:
    """Base names in `directory` ending with `suffix`; an absent directory is empty."""
    fs.invalidate_cache(directory)  # s3fs and friends cache listings; fragments come and go.
    try:
        entries = fs.ls(directory, detail=True)
    except FileNotFoundError:
        return []
    names = [posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") != "directory"]
    return sorted(n for n in names if n.endswith(suffix))


class StageIndex:
    """A snapshot of one stage's fragments: every location, and the bad ones."""

    def __init__(self, rows: list[Location], bad: set[tuple[str, str, str]], fragments: list[str],
                 bad_fragments: list[str], unreadable: list[tuple[str, str]]):
        self.rows = rows
        self.bad = bad  # (item_key, shard_id, fragment)
        self.fragments = fragments
        self.bad_fragments = bad_fragments
        self.unreadable = unreadable  # (fragment, error) pairs skipped while loading
        self.by_key: dict[str, list[Location]] = {}
        for row in rows:
            self.by_key.setdefault(row.item_key, []).append(row)
        self._present: set[str] | None = None

    def is_bad(self, loc: Location) -> bool:
        return (loc.item_key, loc.shard_id, loc.fragment) in self.bad

    def present(self) -> set[str]:
        if self._present is None:
            self._present = {k for k, locs in self.by_key.items() if any(not self.is_bad(l) for l in locs)}
        return self._present

    def good(self, item_key: str, field: str | None, stage: str) -> list[Location]:
        """Good locations of one field of a key, one per distinct place in a shard."""
        locs = [l for l in self.by_key.get(item_key, ()) if not self.is_bad(l)]
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

    def mark_bad(self, pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str, str]]:
        """Bad-marker rows for (item_key, shard_id) pairs: one per fragment that lists the pair."""
        wanted = set(pairs)
        new = {
            (l.item_key, l.shard_id, l.fragment)
            for l in self.rows
            if (l.item_key, l.shard_id) in wanted
        } - self.bad
        self.bad |= new
        self._present = None
        return sorted(new)


def _read_table(fs, path: str) -> pa.Table:
    return pq.read_table(pa.BufferReader(fs.cat_file(path)))


def load_stage(fs, directory: str, log: logging.Logger) -> StageIndex:
    """Read every fragment of one stage; lists again if a fragment vanishes meanwhile."""
    for _ in range(RELIST_ATTEMPTS):
        names = list_files(fs, directory, ".parquet")
        try:
            with ThreadPoolExecutor(READ_THREADS) as pool:
                results = list(pool.map(lambda n: _try_read(fs, posixpath.join(directory, n)), names))
            break
        except FileNotFoundError:
            continue  # `compact` replaced fragments after we listed them: list again.
    else:
        raise StoreError(
            f"index fragments in {directory} kept vanishing while being read",
            "another process is compacting this stage; retry when it is done",
        )
    rows: list[Location] = []
    bad: set[tuple[str, str, str]] = set()
    fragments, bad_fragments, unreadable = [], [], []
    for name, (table, error) in zip(names, results):
        if error is not None:
            log.warning("index fragment %s/%s is unreadable (%s); skipping it, its items count as "
                        "missing. Run `sdxlpipe store verify`.", directory, name, error)
            unreadable.append((name, error))
            continue
        cols = table.to_pydict()
        if name.startswith(BAD_PREFIX):
            bad_fragments.append(name)
            bad.update(zip(cols["item_key"], cols["shard_id"], cols["fragment"]))
        else:
            fragments.append(name)
            groups = cols.get("group") or [""] * len(cols["item_key"])
            rows.extend(
                Location(k, f, s, o, n, h, name, g or "")
                for k, f, s, o, n, h, g in zip(cols["item_key"], cols["field"], cols["shard_id"],
                                               cols["offset"], cols["length"], cols["xxh3"], groups)
            )
    return StageIndex(rows, bad, fragments, bad_fragments, unreadable)


def _try_read(fs, path: str) -> tuple[pa.Table | None, str | None]:
    """(table, None), or (None, why) for a fragment that cannot be used; raises if it vanished."""
    schema = BAD_SCHEMA if posixpath.basename(path).startswith(BAD_PREFIX) else INDEX_SCHEMA
    try:
        table = _read_table(fs, path)
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException) as e:
        return None, f"{type(e).__name__}: {e}"
    lacking = [n for n in schema.names if n not in table.column_names]
    if lacking:
        return None, f"columns {lacking} missing"
    extra = ["group"] if schema is INDEX_SCHEMA and "group" in table.column_names else []
    return table.select(schema.names + extra), None
