"""Copy what one store lacks from another (`sdxlpipe store push|pull SRC DST`), verified.

For each stage, every shard of SRC that holds an item DST lacks is copied
whole: hashed on the way, placed, then its manifest and an index fragment
for its intact items are written (the fragment last: the commit point, as
for any writer). A shard whose bytes no longer match its name is not copied
as it is: its intact items are re-packed into a new shard, its damaged ones
are left behind and listed. Safe to run while others write to either store.

Then each published dataset (README.md, "Published datasets") whose shards
DST now holds: its snapshot files (checked whole, as any reader does) and
then its ref, the commit point; a dataset naming a shard DST lacks (its
items were re-packed into another) is left out and listed.

Uses only the Store's public API (`stages`, `locations`, `open_shard`,
`read_manifest`, `temp_dir`, `add_shard`, `present`, `read`, `writer`,
`datasets`, `dataset`): SRC is untrusted input, so every byte it gives is
hashed against its name before use.
"""

from __future__ import annotations

import os
import tempfile

import pyarrow as pa

from .grammar import GROUPED_SCHEMA
from .shards import StoreError, bad_member_names, hash_stream, manifest


def copy_missing(src, dst, log=None) -> dict:
    """Copy into `dst` every item of `src` that `dst` lacks. Returns per-stage counts and problems."""
    report: dict = {}
    for stage in src.stages():
        src.refresh(stage)
        dst.refresh(stage)
        have = dst.present(stage)
        by_shard: dict[str, list] = {}
        for loc in src.locations(stage):
            by_shard.setdefault(loc.shard_id, []).append(loc)
        counts = {"shards": 0, "items": 0, "bytes": 0, "damaged": []}
        for shard_id, locs in sorted(by_shard.items()):
            needed = {l.item_key for l in locs} - have
            if not needed:
                continue
            ok, nbytes = _copy_shard(src, dst, stage, shard_id, locs, log)
            if ok:
                counts["shards"] += 1
                counts["bytes"] += nbytes
                counts["items"] += len(needed)
            else:
                copied, damaged = _repack(src, dst, stage, sorted(needed))
                counts["items"] += copied
                counts["damaged"] += damaged
                if log is not None and damaged:
                    log.warning("store %s: %d damaged item(s) of %s in shard %s were not copied: %s",
                                src.url, len(damaged), stage, shard_id, ", ".join(damaged[:5]))
            have |= needed
        dst.refresh(stage)
        report[stage] = counts
    return report


def copy_datasets(src, dst, log=None) -> dict:
    """Publish in `dst` every dataset of `src` whose shards `dst` holds: {"copied": [...], "left": {name: why}}."""
    from . import snapshots

    copied, left = [], {}
    for name in src.datasets():
        try:
            snapshot = src.dataset(name)  # verified whole: a crafted one is never copied
        except StoreError as e:
            left[name] = e.what
            continue
        gone = snapshots.missing_shards(dst, snapshot)
        if gone:
            left[name] = "the copy lacks shards it names: " + ", ".join(f"{n} {s} item(s)" for s, (n, _) in gone.items())
            continue
        snapshots.copy_to(snapshot, src, dst, name)
        copied.append(name)
    if log is not None and left:
        log.warning("datasets not copied from %s: %s", src.url, left)
    return {"copied": copied, "left": left}


def _copy_shard(src, dst, stage: str, shard_id: str, locs: list, log=None) -> tuple[bool, int]:
    """Copy one shard if its bytes hash to its name; (copied, bytes)."""
    fd, local = tempfile.mkstemp(prefix="pull-", suffix=".tar.part", dir=dst.temp_dir())
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with src.open_shard(stage, shard_id) as f:
                    digest, n = hash_stream(f, copy_to=out)
            except FileNotFoundError:
                return False, 0  # lost: re-packing finds its items gone and names them
            except OSError as e:
                # A blip is not damage: stop rather than re-pack (which would mark items bad).
                raise StoreError(f"could not read shard {shard_id} of stage {stage} in {src.url}: {e}",
                                 "the source store's disk or network is failing; run the same "
                                 "command again: what was copied stays copied") from e
            out.flush()
            os.fsync(out.fileno())
        if digest != shard_id:
            return False, 0
        bad = bad_member_names(local)
        if bad:
            if log is not None:
                log.warning("store %s: shard %s of %s has members that are not items (%s); "
                            "re-packing its items instead of copying it", src.url, shard_id, stage, bad[:3])
            return False, 0
        try:
            doc = src.read_manifest(stage, shard_id)
        except (OSError, ValueError):  # lost, or not a manifest as README.md has it
            doc = None
        if not doc or doc["bytes"] != n:  # rebuild it from the index rows
            members = [{"name": f"{k}.{f}", "offset": o, "length": n_, "xxh3": x}
                       for k, f, _, o, n_, x in sorted({l[:6] for l in locs}, key=lambda r: r[3])]
            doc = manifest(stage, shard_id, n, members)
        rows = sorted({l.row() for l in locs}, key=lambda r: (r[3], r[0]))
        table = pa.table([pa.array(list(c), type=f.type) for c, f in zip(zip(*rows), GROUPED_SCHEMA)],
                         schema=GROUPED_SCHEMA)
        dst.add_shard(stage, local, doc, table, tag="pull")
    finally:
        if os.path.exists(local):
            os.remove(local)
    return True, n


def _repack(src, dst, stage: str, keys: list[str]) -> tuple[int, list[str]]:
    """Re-pack the intact copies of `keys` into a new shard of dst; (copied, damaged keys)."""
    fields_of: dict[str, set[str]] = {}
    for loc in src.locations(stage, good_only=False):
        fields_of.setdefault(loc.item_key, set()).add(loc.field)
    copied, damaged = 0, []
    with dst.writer(stage) as writer:
        for key in keys:
            fields = sorted(fields_of.get(key, ()))
            datas = [src.read(stage, key, field) for field in fields]
            if not fields or any(d is None for d in datas):
                damaged.append(key)
                continue
            for field, data in zip(fields, datas):
                writer.add(key, field, data)
            copied += 1
    return copied, damaged
