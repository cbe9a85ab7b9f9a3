"""Run the stages up to a target, in order, each on the table of the last.

`run_pipeline(..., dry_run=True)` is `status`: every stage computes its keys
and counts what it would compute, and nothing is written or loaded.
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from sdxlpipe.cache_format import CacheDamaged, open_store
from sdxlpipe.config import Config
from sdxlpipe.pipeline.context import Context, Models, StageStats
from sdxlpipe.pipeline.graph import stage_module, stages_for
from sdxlpipe.pipeline.hashing import ContentMemo
from sdxlpipe.pipeline.progress import Reporter
from sdxlpipe.pipeline.workspace import Workspace

# Table columns that hold store keys, per store stage: what later stages read.
STORE_COLUMNS = {
    "vae_encode": ("latent_key", "latent_flip_key"),
    "text_encode": ("text_key", "text_variant_keys", "empty_text_key"),
}


def run_pipeline(config: Config, target: str = "all", *, dry_run: bool = False,
                 partition: tuple[int, int] | None = None, reporter: Reporter | None = None,
                 engine: str = "local") -> dict[str, Any]:
    workspace = Workspace(config.workspace)
    memo = ContentMemo(workspace.memo_path)
    ctx = Context(
        config=config, store=open_store(config.store_url), workspace=workspace, memo=memo,
        reporter=reporter or Reporter(enabled=False), models=Models(config, memo),
        dry_run=dry_run, partition=partition, engine_name=engine,
    )
    names = stages_for(target)
    inputs: dict[str, pa.Table] = {}
    try:
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
        module = stage_module(name)
        began = time.monotonic()
        previous = ctx.workspace.read_table(name)
        inputs[name] = table
        before = ctx.stats.pop(name, None)
        table = module.run(table, ctx.config.params[name], ctx)
        stats = ctx.stats.setdefault(name, StageStats())
        if not stats.reported:
            _count_changed_rows(stats, previous, table, getattr(module, "OUTPUT_COLUMNS", ()))
        if before is not None:  # a second pass after damage was found: count both passes
            stats.computed += before.computed
            stats.reused = max(stats.items - stats.computed - stats.failed, 0)
            stats.reasons = before.reasons + stats.reasons
            stats.seconds += before.seconds
        stats.seconds = round(stats.seconds + time.monotonic() - began, 3)
        if not ctx.dry_run and getattr(module, "OUTPUT_COLUMNS", ()):
            ctx.workspace.write_table(name, table)
        ctx.log.debug("%s: %s", name, stats)


def _rerun_from(ctx: Context, names: list[str], inputs: dict, error: Exception, retried: bool) -> int | None:
    """Where to restart after `error`, if a later stage found cached items damaged; else None.

    A reader that finds an item failing its checksum marks it bad in the store
    (CacheDamaged, or a plain error after such a read); the encode stages then
    see it as missing and recompute it. This happens once per run.
    """
    if retried or ctx.dry_run:
        return None
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
    for stage, columns in STORE_COLUMNS.items():
        later = [n for n in names if n in inputs and names.index(n) > names.index(stage)] if stage in names else []
        if not later:
            continue
        table = inputs[later[0]]
        keys: set[str] = set()
        for column in columns:
            if column in table.column_names:
                for value in table.column(column).to_pylist():
                    keys.update(v for v in (value if isinstance(value, list) else [value]) if v)
        found[stage] = set(ctx.store.damaged(stage, keys))
    return found


def _count_changed_rows(stats: StageStats, previous: pa.Table | None, table: pa.Table, columns) -> None:
    """A table stage's rows count as computed when their outputs differ from the last run's."""
    stats.items = table.num_rows
    old: dict[str, tuple] = {}
    if previous is not None and set(columns) <= set(previous.column_names) and "key" in previous.column_names:
        cols = previous.select(["key", *columns]).to_pydict()
        old = {k: tuple(cols[c][i] for c in columns) for i, k in enumerate(cols["key"])}
    cols = table.select(["key", *columns]).to_pydict() if table.num_rows else {"key": []}
    changed = sum(1 for i, k in enumerate(cols["key"]) if old.get(k) != tuple(cols[c][i] for c in columns))
    stats.computed, stats.reused = changed, table.num_rows - changed
    if changed:
        stats.reasons = [f"{changed} row(s) new or changed"]


def _report(ctx: Context) -> dict[str, Any]:
    stages = {
        name: {"items": s.items, "computed": s.computed, "reused": s.reused, "failed": s.failed,
               "seconds": s.seconds, "reasons": s.reasons}
        for name, s in ctx.stats.items()
    }
    outputs: dict[str, Any] = {"store": ctx.store.url, "workspace": str(ctx.workspace.root)}
    if "lora" in ctx.outputs:
        outputs["lora"] = ctx.outputs["lora"]
    if "checkpoint" in ctx.outputs.get("train", {}):
        outputs["checkpoint"] = ctx.outputs["train"]["checkpoint"]
    return {"stages": stages, "rejected": ctx.rejected, "outputs": outputs, "models_loaded": ctx.models.loaded(),
            "damaged": {stage: sorted(keys) for stage, keys in ctx.damaged.items()}}
