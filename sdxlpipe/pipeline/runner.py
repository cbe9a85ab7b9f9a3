"""Run the stages up to a target, in order, each on the table of the last.

`run_pipeline(..., dry_run=True)` is `status`: every stage computes its keys
and counts what it would compute, and nothing is written or loaded.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import pyarrow as pa

from sdxlpipe.cache_format import CacheDamaged, open_store
from sdxlpipe.config import Config
from sdxlpipe.pipeline.context import Context, Models, StageStats
from sdxlpipe.pipeline.graph import publish_point, stages_for
from sdxlpipe.pipeline.hashing import ContentMemo
from sdxlpipe.pipeline.keys import keys_in_columns
from sdxlpipe.pipeline.noop import forget as forget_noop_record
from sdxlpipe.pipeline.progress import Reporter
from sdxlpipe.pipeline.workspace import Workspace
from sdxlpipe.stages import declared


def arrow_without_pandas() -> None:
    """Stop pyarrow from importing pandas (1.4 s) the first time it builds an array.

    pyarrow probes for pandas once, on its first array, to recognise DataFrames;
    nothing in sdxlpipe passes one. With `import pandas` failing during that probe
    pyarrow notes "no pandas" and moves on; an explicit `to_pandas()` later still
    imports it then.
    """
    if "pandas" in sys.modules:
        return
    blocker = _NoPandas()
    sys.meta_path.insert(0, blocker)
    try:
        pa.array([0], pa.int8())
    finally:
        sys.meta_path.remove(blocker)


class _NoPandas:
    """An import finder that says pandas is not installed (used only during pyarrow's probe)."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "pandas":
            raise ModuleNotFoundError("pandas is not imported during sdxlpipe's pyarrow probe", name=name)
        return None


def run_pipeline(config: Config, target: str = "all", *, dry_run: bool = False,
                 partition: tuple[int, int] | None = None, reporter: Reporter | None = None,
                 engine: str = "local") -> dict[str, Any]:
    arrow_without_pandas()
    workspace = Workspace(config.workspace)
    if not dry_run:
        forget_noop_record(workspace.root)  # this run may write: the last run's no-op record no longer holds
    memo = ContentMemo(workspace.memo_path)
    ctx = Context(
        config=config, store=open_store(config.store_url, create=not dry_run, missing_ok=dry_run), workspace=workspace, memo=memo,
        reporter=reporter or Reporter(enabled=False), models=Models(config, memo),
        dry_run=dry_run, partition=partition, engine_name=engine,
    )
    names = stages_for(target, config.stages)
    inputs: dict[str, pa.Table] = {}
    try:
        if publish_point(config.stages) in names[:-1]:  # a stage after the publish point reads the datasets' rows
            from sdxlpipe.pipeline.sources import open_datasets

            ctx.datasets = open_datasets(config, ctx.log, ctx.models.fingerprints)
        start, retried = 0, False
        while True:
            try:
                _run_stages(ctx, names[start:], inputs, pa.table({}) if start == 0 else inputs[names[start]])
                break
            except Exception as error:
                first = _rerun_from(ctx, names, inputs, error, retried)
                if first is None:
                    raise
                start, retried = first, True
    finally:
        ctx.close()
    if not dry_run:
        memo.save()
    return _report(ctx)


def _run_stages(ctx: Context, names: list[str], inputs: dict[str, pa.Table], table: pa.Table) -> None:
    for name in names:
        ctx.stage = name
        module = ctx.config.stages[name]
        began = time.monotonic()
        previous = ctx.workspace.read_table(name)
        inputs[name] = table
        before = ctx.stats.pop(name, None)
        table = module.run(table, ctx.config.params[name], ctx)
        stats = ctx.stats.setdefault(name, StageStats())
        unchanged = previous is not None and previous.equals(table)  # the no-op case, in C++
        if not stats.reported:
            _count_changed_rows(stats, previous, table, getattr(module, "OUTPUT_COLUMNS", ()), unchanged)
        if before is not None:  # a second pass after damage was found: count both passes
            stats.computed += before.computed
            stats.reused = max(stats.items - stats.computed - stats.failed, 0)
            stats.reasons = before.reasons + stats.reasons
            stats.seconds += before.seconds
        stats.seconds = round(stats.seconds + time.monotonic() - began, 3)
        settings, last = _settings(ctx, name), ctx.workspace.read_settings(name)
        if stats.computed:
            stats.reasons = _setting_changes(name, last, settings) + stats.reasons
        if not ctx.dry_run:
            # A no-op rewrites nothing: an equal table or settings file stays as it is
            # (each write is a parquet encode and an fsync, per stage).
            if getattr(module, "OUTPUT_COLUMNS", ()) and not unchanged:
                ctx.workspace.write_table(name, table)
            if settings != last:
                ctx.workspace.write_settings(name, settings)
        ctx.log.debug("%s: %s", name, stats)
        if name == publish_point(ctx.config.stages):
            from sdxlpipe.pipeline.publish import publish
            from sdxlpipe.pipeline.sources import join

            published = publish(ctx, table)  # training-ready: any machine can train from the store alone
            if published is not None:
                ctx.outputs["dataset"] = published
            table = join(table, ctx.datasets)  # dataset sources' rows, which no stage before computed


def _rerun_from(ctx: Context, names: list[str], inputs: dict, error: Exception, retried: bool) -> int | None:
    """Where to restart after `error`, if a later stage found cached items damaged; else None.

    A reader that finds an item failing its checksum marks it bad in the store
    (CacheDamaged, or a plain error after such a read); the encode stages then
    see it as missing and recompute it. This happens once per run.
    """
    if retried or ctx.dry_run:
        return None
    if isinstance(error, CacheDamaged) and ctx.datasets:
        from sdxlpipe.pipeline.sources import lost_in_datasets

        lost = lost_in_datasets(ctx.datasets, error)  # no images here to recompute a dataset's items from
        if lost is not None:
            raise lost from error
    damaged = damaged_items(ctx, names, inputs)
    if isinstance(error, CacheDamaged):
        for stage, keys in error.items.items():
            damaged.setdefault(stage, set()).update(keys)
    damaged = {s: k for s, k in damaged.items() if k and s in names and names.index(s) < names.index(ctx.stage)}
    if not damaged:
        return None
    for stage, keys in damaged.items():
        ctx.log.warning("%s found %d damaged %s item(s) in the store (%s); recomputing them, then running %s again",
                        ctx.stage, len(keys), stage, ", ".join(sorted(keys)[:5]) + (" ..." if len(keys) > 5 else ""),
                        ctx.stage)
        ctx.damaged.setdefault(stage, set()).update(keys)
    ctx.stats.pop(ctx.stage, None)  # the failed pass of this stage counts for nothing
    ctx.store.refresh()
    return min(names.index(s) for s in damaged)


def damaged_items(ctx: Context, names: list[str], inputs: dict) -> dict[str, set[str]]:
    """Store items the tables rely on whose every copy is marked bad."""
    found: dict[str, set[str]] = {}
    for stage, module in ctx.config.stages.items():
        columns = declared(module, "STORE_COLUMNS")
        if not columns:
            continue
        later = [n for n in names if n in inputs and names.index(n) > names.index(stage)] if stage in names else []
        if not later:
            continue
        table = inputs[later[0]]
        if ctx.datasets and "source_index" in table.column_names:
            # Only the config's own rows: the datasets' items are not in its store (lost_in_datasets).
            ours = {d.index for d in ctx.datasets}
            table = table.filter(pa.array([i not in ours for i in table.column("source_index").to_pylist()], pa.bool_()))
        keys = keys_in_columns(table, columns)
        found[stage] = set(ctx.store.damaged(stage, keys)) if keys else set()
    return found


def _settings(ctx: Context, name: str) -> dict[str, Any]:
    models = declared(ctx.config.stages[name], "MODELS")
    fingerprints = ctx.models.fingerprints() if models else {}
    return {"params": ctx.config.to_record()[name], "models": {m: fingerprints.get(m) for m in models}}


def _setting_changes(name: str, old: dict | None, new: dict) -> list[str]:
    """`bucket.resolution 1024 -> 896`, `vae weights changed`: what differs from the last run."""
    if old is None:
        return []
    changes = []
    for key, value in new["params"].items():
        before = old.get("params", {}).get(key)
        if before != value:
            changes.append(f"{name}.{key} {_short(before)} -> {_short(value)}")
    changes += [f"{m} weights changed" for m, fp in new["models"].items() if old.get("models", {}).get(m) != fp]
    return changes


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _count_changed_rows(stats: StageStats, previous: pa.Table | None, table: pa.Table, columns,
                        unchanged: bool = False) -> None:
    """A table stage's rows count as computed when their outputs differ from the last run's;
    the reasons say how many rows are new and which columns changed.

    unchanged: the table equals the last run's, so no row differs (no per-row diff).
    """
    stats.items = table.num_rows
    if unchanged:
        stats.computed, stats.reused, stats.reasons = 0, table.num_rows, []
        return
    old: dict[str, dict] = {}
    if previous is not None and set(columns) <= set(previous.column_names) and "key" in previous.column_names:
        old = {row["key"]: row for row in previous.select(["key", *columns]).to_pylist()}
    rows = table.select(["key", *columns]).to_pylist() if table.num_rows else []
    new, changed, per_column = 0, 0, dict.fromkeys(columns, 0)
    for row in rows:
        before = old.get(row["key"])
        if before is None:
            new += 1
            continue
        differs = [c for c in columns if before[c] != row[c]]
        changed += bool(differs)
        for c in differs:
            per_column[c] += 1
    stats.computed, stats.reused = new + changed, table.num_rows - new - changed
    stats.reasons = []
    gone = len(old.keys() - {row["key"] for row in rows})
    if gone:
        stats.reasons.append(f"{gone} row(s) gone since the last run")
    if new:
        stats.reasons.append(f"{new} new row(s)")
    if changed:
        stats.reasons.append(f"{changed} changed row(s): " + ", ".join(f"{c} ({n})" for c, n in per_column.items() if n))


def _report(ctx: Context) -> dict[str, Any]:
    modules = ctx.config.stages
    stages = {
        name: {"items": s.items, "units": declared(modules[name], "ITEMS"), "computed": s.computed,
               "reused": s.reused, "failed": s.failed, "seconds": s.seconds, "reasons": s.reasons}
        for name, s in ctx.stats.items()
    }
    outputs: dict[str, Any] = {"store": ctx.store.url, "workspace": str(ctx.workspace.root)}
    for name, s in stages.items():  # what each stage adds: its files, its checkpoint
        report = declared(modules[name], "report")
        if report is not None:
            outputs.update(report(ctx.outputs, s, ctx.dry_run))
    if "dataset" in ctx.outputs:  # what this run published (pipeline/publish.py)
        outputs["dataset"] = ctx.outputs["dataset"]
    if ctx.datasets:  # the dataset sources it read
        outputs["datasets"] = [d.describe() for d in ctx.datasets]
    return {"stages": stages, "rejected": ctx.rejected, "outputs": outputs, "models_loaded": ctx.models.loaded(),
            "damaged": {stage: sorted(keys) for stage, keys in ctx.damaged.items()},
            "failed_stages": failed_stages(stages)}


def failed_stages(stages: dict[str, dict]) -> list[str]:
    """Stages that produced nothing they were asked for: some items failed and none were computed or reused.

    Train with no samples and export with no trained adapter fail this way;
    so does an encode stage none of whose items could be encoded. A few
    failed items among good ones are rejected inputs instead (`--strict`).
    """
    return [name for name, s in stages.items() if s["failed"] and not s["computed"] and not s["reused"]]
