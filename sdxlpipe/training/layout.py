"""Which shard each sample's latent lives in: what `train.shuffle = "shard_blocks"` orders by.

Read from the item locations training reads through (a published dataset's
snapshot, or the store's index) when a run first starts, and recorded in its
run directory (`layout.json`), so every later start of the same run (resume,
extend, another process count, after damaged items were encoded again into
other shards) orders its batches by the layout it started with: the order
stays a pure function of (seed, epoch, table, recorded layout), decision 79.
A shard's bytes are estimated by the end of the last latent the run reads in
it (the latents are most of a shard). Imports no torch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sdxlpipe.cache_format.shards import write_atomic
from sdxlpipe.stages import store_fields
from sdxlpipe.training.data import Layout

log = logging.getLogger("sdxlpipe.train")
FILE = "layout.json"


def locate(table, store, stages: dict) -> Layout:
    """The layout of the table's latents (`latent_key`) as `store` (a Store or Layers) locates them now.
    A latent the store lacks gets the shard "" (the run refuses it before its first step anyway)."""
    stage, field = store_fields(stages)["latent_key"]
    keys = table.column("latent_key").to_pylist()
    found = dict(zip(dict.fromkeys(keys), store.locate(stage, list(dict.fromkeys(keys)), field)))
    ends: dict[str, int] = {}
    for loc in found.values():
        shard, end = ("", 0) if loc is None else (loc.shard_id, loc.offset + loc.length)
        ends[shard] = max(ends.get(shard, 0), end)
    shards = tuple(sorted(ends))
    number = {s: n for n, s in enumerate(shards)}
    return Layout(shards, tuple(ends[s] for s in shards),
                  tuple(number["" if found[k] is None else found[k].shard_id] for k in keys))


def of_run(table, store, stages: dict, run_dir: Path | None) -> tuple[Layout, bool]:
    """(the run's layout, whether it was recorded before): the recorded one when the run has one that
    fits its table, else the store's now (`record` it once the run is known to start)."""
    recorded = _read(run_dir / FILE, table.num_rows) if run_dir is not None else None
    if recorded is not None:
        return recorded, True
    return locate(table, store, stages), False


def record(layout: Layout, run_dir: Path) -> None:
    """Keep the layout a run started with, for its later starts (the main process writes it)."""
    doc = {"shards": [list(x) for x in zip(layout.shards, layout.sizes)], "shard_of": list(layout.shard_of)}
    write_atomic(run_dir / FILE, json.dumps(doc, separators=(",", ":")).encode())  # ~6 bytes a sample


def _read(path: Path, rows: int) -> Layout | None:
    try:
        doc = json.loads(path.read_text())
        shards, sizes = zip(*doc["shards"]) if doc["shards"] else ((), ())
        layout = Layout(tuple(map(str, shards)), tuple(map(int, sizes)), tuple(map(int, doc["shard_of"])))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s is unreadable (%s): ordering by the store's layout now", path, e)
        return None
    if len(layout.shard_of) != rows or any(not 0 <= i < len(layout.shards) for i in layout.shard_of):
        log.warning("%s does not fit this run's %d samples: ordering by the store's layout now", path, rows)
        return None
    return layout
