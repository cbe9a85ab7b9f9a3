"""Publish the training-ready table into the store, so any machine can train from the store alone.

After the encode stages (`graph.publish_point`) the table holds everything
training reads: captions, buckets, crops, repeats, the keys of every
latent and text item. `run encode` / `run all` write it, with each item's
location, as a snapshot named `[dataset] name` (cache_format/snapshots.py;
README.md "Published datasets"). An unchanged table writes nothing. Stages
declare what this needs: `STORE_COLUMNS` (the columns holding a stage's
item keys) and `FIELD` (the payload field they locate).
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa

from sdxlpipe.pipeline.keys import keys_in_columns
from sdxlpipe.stages import declared

# The columns a snapshot keeps: what training, its plan and export's metadata read, plus the
# sample's identity and image hash. Paths and per-machine columns (`source`, sidecar names) stay in
# the workspace. The spec (cache_format/README.md) lists them with their types.
PUBLISHED = pa.schema([
    ("key", pa.string()), ("content_hash", pa.string()), ("subset", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("repeats", pa.int32()), ("is_reg", pa.bool_()),
    ("caption", pa.string()), ("caption_variants", pa.list_(pa.string())),
    ("bucket_w", pa.int32()), ("bucket_h", pa.int32()), ("resize_w", pa.int32()), ("resize_h", pa.int32()),
    ("crop_top", pa.int32()), ("crop_left", pa.int32()),
    ("latent_key", pa.string()), ("latent_flip_key", pa.string()),
    ("text_key", pa.string()), ("text_variant_keys", pa.list_(pa.string())), ("empty_text_key", pa.string()),
    # Held out of training (a kind = "validation" source's item, training/holdout.py): a reader holds it out too.
    ("validation", pa.bool_()),
])
# Columns a reader fills with nulls when a snapshot lacks them (added after the first snapshots were written).
OPTIONAL = ("validation",)


def publish(ctx, table: pa.Table) -> dict[str, Any] | None:
    """Publish `table` (the rows of this config's own sources) as `[dataset] name`; what was published,
    or None when this run must not publish (a dry run, `--shards`, one of several processes, off)."""
    config = ctx.config
    if ctx.dry_run or not config.publish or ctx.partition is not None or os.environ.get("RANK", "0") != "0":
        if ctx.partition is not None and config.publish and not ctx.dry_run:
            ctx.log.info("not publishing dataset %s: --shards computed part of it; `sdxlpipe run encode` without "
                         "--shards publishes it once every part is in the store", config.dataset_name)
        return None
    if table.num_rows == 0:
        return None
    items = {}
    for stage, module in config.stages.items():  # the stages with store items: the ones a snapshot locates
        columns = declared(module, "STORE_COLUMNS")
        if not columns:
            continue
        keys = sorted(keys_in_columns(table, columns))
        rows, missing = ctx.store.locations_table(stage, keys, declared(module, "FIELD"))
        if missing:
            ctx.log.warning("not publishing dataset %s: %d %s item(s) of the table are not in the store",
                            config.dataset_name, len(missing), stage)
            return None
        items[stage] = (rows, declared(module, "FIELD"), tuple(c for c in columns if c in table.column_names))
    samples = pa.table({f.name: table.column(f.name).cast(f.type) if f.name in table.column_names
                        else pa.nulls(table.num_rows, f.type) for f in PUBLISHED}, schema=PUBLISHED)
    snapshot, moved = ctx.store.publish(config.dataset_name, samples, items, _settings(ctx),
                                        {"config": str(config.path), "model": config.model, "vae": config.vae})
    if moved:
        ctx.log.info("published dataset %s (snapshot %s, %d samples) in %s", config.dataset_name, snapshot,
                     samples.num_rows, ctx.store.url)
    return {"name": config.dataset_name, "snapshot": snapshot, "samples": samples.num_rows,
            "store": ctx.store.url, "published": moved}


def _settings(ctx) -> dict[str, Any]:
    """Per stage up to the publish point: code version, params, model fingerprints. Ingest's sources
    are paths on the publishing machine: left out (they say nothing about the rows)."""
    from sdxlpipe.pipeline.graph import publish_point, stages_for

    stages = ctx.config.stages
    record = ctx.config.to_record()
    fingerprints = ctx.models.fingerprints()
    out = {}
    for name in stages_for(publish_point(stages), stages):
        module = stages[name]
        params = {k: v for k, v in record[name].items() if not (name == "ingest" and k == "sources")}
        out[name] = {"version": getattr(module, "VERSION", None), "params": params,
                     "models": {m: fingerprints.get(m) for m in declared(module, "MODELS")}}
    return out
