"""The Store page's data: size and items per stage, each shard, the published datasets and the
workspace's stage tables.

Read through the store's public API (`du`, `stages`, `locations`), so a
store behind a URL is described the same way; a store that does not exist
yet is an empty page, not an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Shards listed per stage; a million-item store has thousands, and the totals above the list say how many.
MAX_SHARDS = 2000


def collect(store_url: str, workspace: Path, stage_names: list[str]) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from sdxlpipe.cache_format import StoreError, open_store
    from sdxlpipe.cache_format.snapshots import describe_all
    from sdxlpipe.pipeline.workspace import Workspace

    store = open_store(store_url, create=False, missing_ok=True)
    usage = store.du()
    stages = {}
    for stage, u in usage["stages"].items():
        shards: dict[str, tuple[int, set]] = {}
        for loc in store.locations(stage):
            nbytes, keys = shards.get(loc.shard_id, (0, set()))
            keys.add(loc.item_key)
            shards[loc.shard_id] = (nbytes + loc.length, keys)
        # [shard id, items, bytes of those items' payloads], biggest first.
        listed = sorted(([sid, len(keys), nbytes] for sid, (nbytes, keys) in shards.items()), key=lambda s: -s[2])
        stages[stage] = {**u, "shard_list": listed[:MAX_SHARDS], "shards_listed": min(len(listed), MAX_SHARDS)}
    try:
        datasets = [_dataset(d) for d in describe_all(store)]
    except StoreError as e:  # a store behind plain HTTP cannot be listed
        datasets = [{"error": e.what}]
    ws = Workspace(workspace)
    tables = []
    for name in stage_names:
        path = ws.table_path(name)
        if path.exists():
            try:
                rows = pq.ParquetFile(path).metadata.num_rows  # the footer only
            except (OSError, ValueError):
                rows = None  # damaged: the next run recomputes it
            tables.append({"stage": name, "rows": rows, "bytes": path.stat().st_size})
    return {"url": store_url, "bytes": usage["bytes"], "stages": stages, "datasets": datasets, "tables": tables}


def _dataset(d: dict) -> dict[str, Any]:
    """A published dataset's row, as `dataset list` counts it: items and payload bytes over its stages."""
    if "error" in d:
        return {"name": d["name"], "error": d["error"]}
    return {"name": d["name"], "snapshot": d["snapshot"], "samples": d["samples"], "published": d["published"],
            "items": sum(s.get("items", 0) for s in d["stages"].values()),
            "bytes": sum(s.get("bytes", 0) for s in d["stages"].values())}
