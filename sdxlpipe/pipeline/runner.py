"""Run the stages up to a target, in order, each on the table of the last.

`run_pipeline(..., dry_run=True)` is `status`: every stage computes its keys
and counts what it would compute, and nothing is written or loaded.
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from sdxlpipe.cache_format import open_store
from sdxlpipe.config import Config
from sdxlpipe.pipeline.context import Context, Models, StageStats
from sdxlpipe.pipeline.graph import stage_module, stages_for
from sdxlpipe.pipeline.hashing import ContentMemo
from sdxlpipe.pipeline.progress import Reporter
from sdxlpipe.pipeline.workspace import Workspace


def run_pipeline(config: Config, target: str = "all", *, dry_run: bool = False,
                 partition: tuple[int, int] | None = None, reporter: Reporter | None = None) -> dict[str, Any]:
    workspace = Workspace(config.workspace)
    memo = ContentMemo(workspace.memo_path)
    ctx = Context(
        config=config, store=open_store(config.store_url), workspace=workspace, memo=memo,
        reporter=reporter or Reporter(enabled=False), models=Models(config, memo),
        dry_run=dry_run, partition=partition,
    )
    table = pa.table({})
    for name in stages_for(target):
        ctx.stage = name
        module = stage_module(name)
        began = time.monotonic()
        previous = workspace.read_table(name)
        table = module.run(table, config.params[name], ctx)
        stats = ctx.stats.setdefault(name, StageStats())
        if not stats.reported:
            _count_changed_rows(stats, previous, table, module.OUTPUT_COLUMNS)
        stats.seconds = round(time.monotonic() - began, 3)
        if not dry_run and module.OUTPUT_COLUMNS:
            workspace.write_table(name, table)
        ctx.log.debug("%s: %s", name, stats)
    if not dry_run:
        memo.save()
    return _report(ctx)


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
    return {"stages": stages, "rejected": ctx.rejected, "outputs": outputs, "models_loaded": ctx.models.loaded()}
