"""Copy what one store lacks from another (`sdxlpipe store push|pull SRC DST`), verified.

For each stage, every shard of SRC that holds an item DST lacks is copied
whole: hashed on the way, placed, then its manifest and an index fragment
for its intact items are written (the fragment last: the commit point, as
for any writer). A shard whose bytes no longer match its name is not copied
as it is: its intact items are re-packed into a new shard, its damaged ones
are left behind and listed. Safe to run while others write to either store.
"""

from __future__ import annotations

import os
import posixpath
import secrets
import tempfile

import xxhash

from .codec import decode_json, encode_json
from .index import GROUPED_SCHEMA, to_parquet
from .shards import HASH_CHUNK, StoreError, bad_member_names, is_local, manifest, place_file, write_bytes


def copy_missing(src, dst, log=None) -> dict:
    """Copy into `dst` every item of `src` that `dst` lacks. Returns per-stage counts and problems."""
    report: dict = {}
    for stage in src._stage_names():
        src.refresh(stage)
        dst.refresh(stage)
        index = src._index(stage)
        have = dst.present(stage)
        by_shard: dict[str, list] = {}
        for loc in index.rows:
            if not index.is_bad(loc):
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


def _copy_shard(src, dst, stage: str, shard_id: str, locs: list, log=None) -> tuple[bool, int]:
    """Copy one shard if its bytes hash to its name; (copied, bytes)."""
    tmp_dir = dst._tmp if is_local(dst.fs) else None
    if tmp_dir is not None:
        os.makedirs(tmp_dir, exist_ok=True)
    fd, local = tempfile.mkstemp(prefix="pull-", suffix=".tar.part", dir=tmp_dir)
    h, n = xxhash.xxh3_128(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with src.fs.open(src._shard(stage, shard_id), "rb") as f:
                    while chunk := f.read(HASH_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                        n += len(chunk)
            except FileNotFoundError:
                return False, 0  # lost: re-packing finds its items gone and names them
            except OSError as e:
                # A blip is not damage: stop rather than re-pack (which would mark items bad).
                raise StoreError(f"could not read shard {src._shard(stage, shard_id)} of {src.url}: {e}",
                                 "the source store's disk or network is failing; run the same "
                                 "command again: what was copied stays copied") from e
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != shard_id:
            return False, 0
        bad = bad_member_names(local)
        if bad:
            if log is not None:
                log.warning("store %s: shard %s of %s has members that are not items (%s); "
                            "re-packing its items instead of copying it", src.url, shard_id, stage, bad[:3])
            return False, 0
        place_file(dst.fs, local, dst._shard(stage, shard_id), dst._tmp)
    finally:
        if os.path.exists(local):
            os.remove(local)
    try:
        doc = decode_json(src.fs.cat_file(src._shard(stage, shard_id, "json")))
    except (OSError, ValueError):
        doc = None
    if not doc or doc.get("xxh3") != shard_id:  # rebuild a lost manifest from the index rows
        members = [{"name": f"{k}.{f}", "offset": o, "length": n_, "xxh3": x}
                   for k, f, _, o, n_, x in sorted({l[:6] for l in locs}, key=lambda r: r[3])]
        doc = manifest(stage, shard_id, n, members)
    write_bytes(dst.fs, dst._shard(stage, shard_id, "json"), encode_json(doc), dst._tmp)
    rows = sorted({l.row() for l in locs}, key=lambda r: (r[3], r[0]))
    name = f"{shard_id}-pull-{secrets.token_hex(4)}.parquet"
    write_bytes(dst.fs, posixpath.join(dst.root, "index", stage, name), to_parquet(rows, GROUPED_SCHEMA), dst._tmp)
    return True, n


def _repack(src, dst, stage: str, keys: list[str]) -> tuple[int, list[str]]:
    """Re-pack the intact copies of `keys` into a new shard of dst; (copied, damaged keys)."""
    index = src._index(stage)
    copied, damaged = 0, []
    with dst.writer(stage) as writer:
        for key in keys:
            fields = sorted({l.field for l in index.locations_of(key)})
            datas = [src.read(stage, key, field) for field in fields]
            if not fields or any(d is None for d in datas):
                damaged.append(key)
                continue
            for field, data in zip(fields, datas):
                writer.add(key, field, data)
            copied += 1
    return copied, damaged
