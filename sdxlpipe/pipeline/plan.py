"""Which items of a store stage must be computed in this run.

Shared by the encode stages: unique keys -> the ones the store lacks -> the
ones in this machine's partition (`--shards K/N`) -> counted in the report.
"""

from __future__ import annotations

from typing import Iterable

from sdxlpipe.pipeline.keys import partition_of


def plan_items(ctx, keys: Iterable[str]) -> list[str]:
    unique = list(dict.fromkeys(keys))
    missing = ctx.store.missing(ctx.stage, unique)
    todo = missing
    if ctx.partition is not None:
        k, n = ctx.partition
        todo = [key for key in missing if partition_of(key, n) == k]
    reasons = []
    damaged = ctx.store.damaged(ctx.stage, missing) if missing else []
    if damaged:
        ctx.damaged.setdefault(ctx.stage, set()).update(damaged)
        reasons.append(f"{len(damaged)} item(s) damaged in the store, recomputed")
        if not ctx.dry_run:
            ctx.log.warning("%d %s item(s) failed their checksum or lost their shard; recomputing: %s",
                            len(damaged), ctx.stage, ", ".join(damaged[:10]) + (" ..." if len(damaged) > 10 else ""))
    if len(missing) > len(damaged):
        reasons.append(f"{len(missing) - len(damaged)} item(s) not in the store")
    if len(todo) < len(missing):
        reasons.append(f"{len(missing) - len(todo)} left to other partitions (--shards {ctx.partition[0]}/{ctx.partition[1]})")
    ctx.report(items=len(unique), computed=len(todo), reused=len(unique) - len(missing), reasons=reasons)
    return todo
