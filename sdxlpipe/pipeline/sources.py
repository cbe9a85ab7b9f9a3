"""Dataset sources: `[[sources]] kind = "dataset"`, a published dataset trained on as it is.

Recipe: open the dataset's store read-only (one GET of FORMAT; never a
listing) -> its snapshot by name or pinned id (the ref, the manifest and its
tables, each checked: cache_format/snapshots.py) -> the store serves the
snapshot's item locations alone (`Store.pin`) -> the samples checked as
untrusted rows -> on a local store, every shard the snapshot names is there
(else refused: how many items, which stage, the command that encodes them)
-> the rows, with `source_index`, join the table at the publish point
(`graph.publish_point`), so ingest, caption, bucket and the encode stages
never see them and compute nothing for them. Training reads their items
through `layered` (the snapshots first, then the config's store).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from sdxlpipe.cache_format import CacheDamaged, Store, StoreError, open_store
from sdxlpipe.cache_format.layers import Layers
from sdxlpipe.cache_format.snapshots import Snapshot, missing_shards
from sdxlpipe.errors import UserError
from sdxlpipe.pipeline.publish import OPTIONAL, PUBLISHED

# Sanity bounds on a published sample, which comes from another machine: a crafted `repeats` of 10^9
# would make one epoch's plan a list of 10^9 indices.
MAX_REPEATS = 10_000
MAX_SIDE = 1 << 16
# The samples columns that must hold a value in every row (the rest may be null: no flip, no variants).
REQUIRED = ("repeats", "is_reg", "caption", "width", "height", "bucket_w", "bucket_h", "resize_w", "resize_h",
            "crop_top", "crop_left", "latent_key", "text_key", "empty_text_key")


@dataclass(frozen=True)
class DatasetSource:
    index: int  # its position in [[sources]]: the rows' source_index
    spec: str  # the name, or NAME@SNAPSHOT
    store: Store  # read-only, serving the snapshot's items only
    snapshot: Snapshot
    rows: pa.Table  # the samples (publish.PUBLISHED) plus source_index

    def settings(self) -> dict[str, dict]:
        """Per stage, the settings that made its rows, as the snapshot records them (a run record's params;
        an entry that is not one, from elsewhere, is left out)."""
        recorded = self.snapshot.manifest.get("settings", {})
        return {stage: s["params"] for stage, s in recorded.items()
                if isinstance(s, dict) and isinstance(s.get("params"), dict)}

    def describe(self) -> dict:
        return {"source": self.index, "name": self.spec.partition("@")[0], "snapshot": self.snapshot.id,
                "store": self.store.url, "samples": self.rows.num_rows}


def open_datasets(config, log, fingerprints) -> list[DatasetSource]:
    """Every dataset source of the config, opened and checked; a UserError names what is wrong.
    fingerprints(): the config's model's weight fingerprints (to warn about a dataset of another model)."""
    found = []
    for index, source in enumerate(config.params["ingest"].sources):
        if source.kind != "dataset":
            continue
        url = source.store or config.store_url
        where = f"sources[{index}] (dataset {source.name!r} in {url})"
        try:
            store = open_store(url, create=False, read_only=True)
            snapshot = store.dataset(source.name)
        except StoreError as e:
            raise UserError(f"{where}: {e.what}", e.hint) from e
        for stage, rows in snapshot.items.items():
            store.pin(stage, rows, f"{snapshot.id}-{stage}.parquet")
        rows = _samples(snapshot, where).append_column("source_index", pa.array([index] * snapshot.samples.num_rows,
                                                                              pa.int32()))
        dataset = DatasetSource(index, source.name, store, snapshot, rows)
        if "://" not in store.url:  # a stat per shard: free here, a request per shard behind a URL (met lazily)
            gone = missing_shards(store, snapshot)
            if gone:
                raise missing_error(dataset, gone, where)
        _warn_other_model(dataset, config, fingerprints, log)
        found.append(dataset)
    return found


def _samples(snapshot: Snapshot, where: str) -> pa.Table:
    """The samples in publish.PUBLISHED's types, within sane bounds: rows from another machine."""
    table = snapshot.samples
    for name in OPTIONAL:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, PUBLISHED.field(name).type))
    lacking = [f.name for f in PUBLISHED if f.name not in table.column_names]
    if lacking:
        raise UserError(f"{where}: snapshot {snapshot.id} lacks columns {lacking}",
                        "it was published by another tool or version: publish it again with this sdxlpipe")
    try:
        table = pa.table({f.name: table.column(f.name).cast(f.type) for f in PUBLISHED}, schema=PUBLISHED)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
        raise UserError(f"{where}: snapshot {snapshot.id} has columns of the wrong type ({e})",
                        "publish it again with this sdxlpipe") from e
    problems = [c for c in REQUIRED if table.column(c).null_count]

    def outside(column: str, low: int, high: int) -> bool:
        values = np.asarray(table.column(column).to_pylist() or [low], np.int64)
        return bool((values < low).any() or (values > high).any())

    problems += [c for c in ("width", "height", "bucket_w", "bucket_h", "resize_w", "resize_h")
                 if c not in problems and outside(c, 1, MAX_SIDE)]
    problems += [c for c in ("crop_top", "crop_left") if c not in problems and outside(c, 0, MAX_SIDE)]
    if "repeats" not in problems and outside("repeats", 1, MAX_REPEATS):
        problems.append("repeats")
    if problems:
        raise UserError(f"{where}: snapshot {snapshot.id} is refused: column(s) {problems} hold nulls or values "
                        "out of range", "a snapshot from elsewhere is untrusted input; publish it again with sdxlpipe")
    return table


def missing_error(dataset: DatasetSource, gone: dict[str, tuple[int, int]], where: str) -> UserError:
    """How many items of which stage the store lost, and the command that encodes them again."""
    counts = ", ".join(f"{items} {stage} item(s) in {shards} shard(s)" for stage, (items, shards) in gone.items())
    config = dataset.snapshot.ref.get("config")
    flag = f" -c {config}" if config else ""
    return UserError(
        f"{where}: snapshot {dataset.snapshot.id} names items the store no longer has: {counts} are missing",
        f"on the machine that has the dataset's images, `sdxlpipe store verify{flag}` marks what its store lost and "
        f"`sdxlpipe run encode{flag}` encodes it again and publishes the dataset again; then copy or serve that "
        f"store again ({dataset.store.url})")


def lost_in_datasets(datasets: list[DatasetSource], error: CacheDamaged) -> UserError | None:
    """The error for damage met in a dataset source's items: they cannot be recomputed here (no images), so
    the run stops with the count and the command, instead of rerunning the encode stages."""
    for dataset in datasets:
        items = dataset.snapshot.items
        ours = {stage: sorted(set(keys) & set(items[stage].column("item_key").to_pylist()))
                for stage, keys in error.items.items() if stage in items}
        if not any(ours.values()):
            continue
        gone = missing_shards(dataset.store, dataset.snapshot)  # one check per shard: on this failure path only
        where = f"sources[{dataset.index}] (dataset {dataset.spec!r} in {dataset.store.url})"
        if gone:
            return missing_error(dataset, gone, where)
        counts = ", ".join(f"{len(k)} {s} item(s)" for s, k in ours.items() if k)
        return UserError(f"{where}: {counts} of snapshot {dataset.snapshot.id} are damaged in the store: {error.what}",
                         missing_error(dataset, {}, where).hint)
    return None


def join(table: pa.Table, datasets: list[DatasetSource]) -> pa.Table:
    """The config's own rows and the datasets' rows in [[sources]] order (rows of one source keep theirs)."""
    if not datasets:
        return table
    parts = [table, *(d.rows for d in datasets)]
    joined = pa.concat_tables(parts, promote_options="default")
    if "source_index" in table.column_names or not table.num_rows:
        order = np.argsort(np.asarray(joined.column("source_index").to_pylist(), np.int64), kind="stable")
        joined = joined.take(pa.array(order))
    return joined


def layered(datasets: list[DatasetSource], store: Store) -> Layers | Store:
    """What training reads items through: each dataset's snapshot first (so a store behind a URL is
    never listed when the snapshots hold every item), then the config's own store."""
    if not datasets:
        return store
    return Layers([d.store for d in datasets] + [store])


def _warn_other_model(dataset: DatasetSource, config, fingerprints, log) -> None:
    """A dataset encoded with other text encoders or VAE than the config's model is probably a mistake."""
    settings = dataset.snapshot.manifest.get("settings", {})
    mine = fingerprints()
    # Every stage that recorded model fingerprints (the encode stages today), named by the snapshot itself.
    for stage, recorded in sorted(settings.items()) if isinstance(settings, dict) else ():
        theirs = recorded.get("models", {}) if isinstance(recorded, dict) else {}
        if not isinstance(theirs, dict):
            continue
        differ = sorted(m for m, fp in theirs.items() if fp and mine.get(m) and fp != mine[m])
        if differ:
            log.warning("dataset %s was encoded with other %s weights than this config's model %s: its %s items "
                        "fit the model that made them", dataset.spec, ", ".join(differ), config.model, stage)
