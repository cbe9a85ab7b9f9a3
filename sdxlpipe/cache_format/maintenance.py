"""The store's maintenance: verify, gc, compact (and housekeeping's), du.

Each function takes the `Store` it works on; `Store.verify`, `gc`, `compact`,
`housekeep` and `du` are these, so a caller needs only the Store. They read
every fragment from the store itself (never the local index cache), and are
safe while writers run: gc checks each file's reference and age again right
before deleting it, compaction writes the merged fragment before it deletes
the old ones.
"""

from __future__ import annotations

import logging
import posixpath
import secrets
import time
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from . import payloads, snapshots
from .grammar import Location, is_key, table_bytes
from .index import StageIndex
from .listing import list_detail, list_files, list_names
from .shards import StoreError, check_payload, check_stage, hash_stream, write_bytes

if TYPE_CHECKING:
    from .store import Store

# One hour: far longer than a writer needs between renaming its shard and writing its index
# fragment; shorten only when no writer can be running.
DEFAULT_GRACE_SECONDS = 3600.0
# Past this many index fragments in a stage, the run that notices compacts it (housekeep):
# loading costs ~1.5 ms per fragment however small, a compacted million rows ~0.5 s.
COMPACT_FRAGMENTS = 256
# Past this many bad-marker files (one per run that found damage), compact too.
COMPACT_MARKERS = 16

log = logging.getLogger("sdxlpipe.store")


def verify(store: Store, stage: str | None = None, repair: bool = False) -> list[dict]:
    """Re-hash every shard and every indexed item, and check each payload of sdxlpipe's stages against its
    schema (`payloads`); record bad items; return the problems.

    A payload that breaks the schema but passes its checksum is what its writer wrote, not damage: it is
    reported, and marked bad (so the encode stages recompute it) only with `repair` (decision 76).
    """
    problems: list[dict] = []
    for st in [check_stage(stage)] if stage else store.stages():
        index = store._fresh_index(st)
        for name, error in index.unreadable.items():
            problems.append(_problem(st, None, None, f"index fragment {name} unreadable: {error}"))
        by_shard: dict[str, dict[tuple, Location]] = {}
        for loc in index.rows:
            by_shard.setdefault(loc.shard_id, {})[(loc.item_key, loc.field, loc.offset)] = loc
        on_disk = {n[: -len(".tar")] for n in list_files(store.fs, store._path("shards", st), ".tar")}
        failures: list[tuple[Location, str]] = []
        for shard_id in sorted(on_disk | by_shard.keys()):
            if not is_key(shard_id):
                problems.append(_problem(st, None, None, f"shard name {shard_id!r} is not a shard id; "
                                                         "the file or index row was not written by sdxlpipe"))
                continue
            locs = list(by_shard.get(shard_id, {}).values())
            problems += _verify_shard(store, st, shard_id, locs, failures, repair)
        if failures:
            store._record_bad(st, failures)
    if not stage:
        problems += [_problem(name, None, None, f"folder {name!r} is not a stage name (letters, digits, '_', '-'); "
                                                "ignored, and nothing sdxlpipe wrote")
                     for name in sorted(store.odd_folders)]
    return problems


def _verify_shard(store: Store, stage: str, shard_id: str, locs: list[Location], failures: list,
                  repair: bool = False) -> list[dict]:
    problems = []
    doc: dict = {}
    try:
        doc = store.read_manifest(stage, shard_id)  # checked against README.md's grammar, its xxh3 too
    except FileNotFoundError:
        if locs:  # else a writer stopped between shard and manifest: unused, gc takes it
            problems.append(_problem(stage, shard_id, None, "manifest missing"))
    except (OSError, ValueError) as e:
        problems.append(_problem(stage, shard_id, None, f"manifest unreadable: {e}"))
    path = store.shard_path(stage, shard_id)
    try:
        f, why = store._retrying(f"shard {path}", lambda: store.fs.open(path, "rb")), None
    except FileNotFoundError:
        f, why = None, "shard file missing"
    if f is None:
        problems.append(_problem(stage, shard_id, None, why))
        for loc in locs:
            failures.append((loc, why))
            problems.append(_problem(stage, shard_id, loc.item_key, why))
        return problems
    index = store._index(stage)
    present = index.present()
    try:
        with f:
            return problems + _verify_items(store, stage, shard_id, locs, failures, f, doc, index, present, repair)
    except OSError as e:  # not damage: say which shard could not be read, mark nothing
        raise StoreError(f"verify could not read shard {path}: {e}",
                         "the store's disk or network is failing; run verify again once it is reachable") from e


def _verify_items(store: Store, stage: str, shard_id: str, locs: list[Location], failures: list, f: BinaryIO,
                  doc: dict, index: StageIndex, present: set[str], repair: bool = False) -> list[dict]:
    """Problems of one open shard: its hash and size, and each indexed item's checksum and schema."""
    problems: list[dict] = []
    digest, size = hash_stream(f)
    item_problems, repaired = [], 0
    for loc in locs:
        data, why = check_payload(f, loc)
        schema = payloads.problem(stage, loc.field, data) if why is None else None
        schema_bad = schema is not None
        why = why or (schema and f"breaks the payload schema: {schema}")
        if why is None:
            continue
        if index.is_bad(loc) and loc.item_key in present:
            repaired += 1  # found before, and recomputed into another shard since
            continue
        if not schema_bad or repair:
            failures.append((loc, why))
        if schema_bad:
            why += "; marked bad" if repair or index.is_bad(loc) else "; `verify --repair` marks it bad"
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


def gc(store: Store, dry_run: bool = False, grace_seconds: float = DEFAULT_GRACE_SECONDS) -> list[str]:
    """Remove shards and manifests no index fragment references, and stale temp files,
    once older than grace_seconds. Returns the paths removed (or, dry_run, to remove).

    Writers run meanwhile, so each file's reference and age are checked again right
    before it is deleted: a shard committed again under the same content name, or a
    temp file a live writer touched, since the first look is kept.
    """
    referenced, published = _referenced_shards(store), snapshots.live(store)
    now = time.time()
    removed = [p for p in _gc_candidates(store, referenced | published[0], published[1])
               if _age(store, p, now) > grace_seconds]
    if dry_run or not removed:
        return removed
    # What writers committed and publishers published since the first look.
    referenced, published = _referenced_shards(store), snapshots.live(store)
    kept = []
    for path in removed:
        if _kept(store, path, referenced | published[0], published[1]) or _age(store, path, time.time()) <= grace_seconds:
            kept.append(path)
            continue
        try:
            store.fs.rm(path)
        except FileNotFoundError:
            pass  # another gc got there first
    return [p for p in removed if p not in kept]


def _kept(store: Store, path: str, referenced: set[tuple[str, str]], published: set[str]) -> bool:
    """Does an index fragment or a published snapshot keep this shard or snapshot file?"""
    if posixpath.dirname(path) == store._path(snapshots.DATASETS, "snapshots"):
        return posixpath.basename(path) in published
    return _shard_key(store, path) in referenced


def _referenced_shards(store: Store) -> set[tuple[str, str]]:
    referenced: set[tuple[str, str]] = set()
    for st in store.stages():
        index = store._fresh_index(st)
        if index.unreadable:
            raise StoreError(
                f"gc stopped: index fragments of stage {st} in {store.url} are unreadable: "
                f"{sorted(index.unreadable)}",
                "run `sdxlpipe store verify`, restore or delete those fragments, then gc again",
            )
        codes = np.unique(np.concatenate([s.cols["shard"] for s in index.segments] or [np.zeros(0, np.int32)]))
        referenced |= {(st, index.shards[c]) for c in codes.tolist()}
    return referenced


def _gc_candidates(store: Store, referenced: set[tuple[str, str]], published: set[str]) -> list[str]:
    """Shards nothing references, snapshot files no ref keeps, temp files."""
    candidates = [
        store._path("shards", st, name)
        for st in list_names(store.fs, store._path("shards"), dirs_only=True)
        for name in list_files(store.fs, store._path("shards", st), "")
        if (st, name.split(".", 1)[0]) not in referenced
    ]
    candidates += [p for p in snapshots.snapshot_files(store) if posixpath.basename(p) not in published]
    return candidates + [posixpath.join(store._tmp, n) for n in list_files(store.fs, store._tmp, "")]


def _shard_key(store: Store, path: str) -> tuple[str, str] | None:
    """(stage, shard_id) of a path under shards/, None for a temp file."""
    parent, name = posixpath.split(path)
    if posixpath.dirname(parent) != store._path("shards"):
        return None
    return posixpath.basename(parent), name.split(".", 1)[0]


def _age(store: Store, path: str, now: float) -> float:
    try:
        return now - store.fs.modified(path).timestamp()
    except (NotImplementedError, OSError, AttributeError):
        return 0.0  # unknown age: treat as young, never delete what we cannot date


def compact(store: Store, stage: str | None = None) -> dict:
    """Merge each stage's fragments into one without bad or duplicate rows.

    The merged fragment is written before the old ones are deleted, so readers never
    see an item vanish. Returns {stage: {"fragments_before", "fragments_after",
    "rows_before", "rows_after"}}.
    """
    return {st: _compact(store, st, store._fresh_index(st))
            for st in ([check_stage(stage)] if stage else store.stages())}


def housekeep(store: Store, stage: str, max_fragments: int = COMPACT_FRAGMENTS,
              max_markers: int = COMPACT_MARKERS) -> dict | None:
    """Compact a stage if this Store's view of it holds more than max_fragments fragments
    or max_markers bad-marker files; the result of compact for it, or None.

    Uses the index as last listed (call refresh first to include others' commits): a
    fragment committed after that listing is neither merged nor deleted, so a writer
    running meanwhile loses nothing.
    """
    index = store._index(stage)
    if len(index.live_fragments) <= max_fragments and len(index.bad_fragments) <= max_markers:
        return None
    log.info("store %s: stage %s holds %d index fragments and %d bad-marker files; compacting",
             store.url, stage, len(index.live_fragments), len(index.bad_fragments))
    # Without bad markers, a fragment holding most rows (the last compaction's) is left as
    # it is and the small ones beside it are merged: an encode then rewrites its million
    # rows once, not every 256 chunks. Markers name fragments, so with any, merge all.
    leave = None
    if not index.bad_fragments:
        rows = index.fragment_rows()
        biggest = max(rows, key=rows.get) if rows else None
        if biggest is not None and rows[biggest] * 2 > index.row_count:
            leave = biggest
    return _compact(store, stage, index, leave)


def _compact(store: Store, st: str, index: StageIndex, leave: str | None = None) -> dict:
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
        write_bytes(store.fs, store._path("index", st, merged), table_bytes(table), store._tmp)
    for name in old:
        try:
            store.fs.rm(store._path("index", st, name))
        except FileNotFoundError:
            pass  # a concurrent compact removed it
    kept = index.fragment_rows().get(leave, 0) if leave else 0
    if leave is not None:
        # The view keeps its rows; the next lookup lists once, dropping the merged names' rows.
        if merged is not None:
            index.add_written(merged, table)
    else:
        # The new view: the merged fragment as written; the next lookup lists once for the rest.
        fresh = store._new_index(st, cached=False)
        if merged is not None:
            fresh.add_written(merged, table)
        store._indexes[st] = fresh
    store._stale.add(st)
    store._bad_rows.pop(st, None)  # our markers were merged (their rows dropped)
    result.update(fragments_after=(1 if table.num_rows else 0) + (1 if leave else 0),
                  rows_after=table.num_rows + kept)
    return result


def _group_bytes(store: Store, stage: str) -> dict[str, int]:
    """Bytes of the good rows per group, each distinct (shard, offset) counted once."""
    index = store._index(stage)
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


def du(store: Store) -> dict:
    """{"stages": {stage: {"shards", "items", "bytes", "groups"}}, "bytes": total of all shards}.

    "groups": bytes of present items per model fingerprint their writer named ("" if none).
    """
    stages = {}
    for st in store.stages():
        tars = [e for e in list_detail(store.fs, store._path("shards", st)) if e["name"].endswith(".tar")]
        stages[st] = {
            "shards": len(tars),
            "items": store._index(st).present_count(),
            "bytes": sum(int(e.get("size") or 0) for e in tars),
            "groups": _group_bytes(store, st),
        }
    return {"stages": stages, "bytes": sum(s["bytes"] for s in stages.values())}


def _problem(stage: str, shard_id: str | None, item_key: str | None, problem: str) -> dict:
    return {"stage": stage, "shard_id": shard_id, "item_key": item_key, "problem": problem}
