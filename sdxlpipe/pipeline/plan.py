"""Which items of a store stage must be computed in this run, and how their results are stored.

Shared by the encode stages: unique keys -> the ones the store lacks -> the
ones in this machine's partition (`--shards K/N`) -> counted in the report;
then the engine's results -> one shard per chunk.
"""

from __future__ import annotations

import random
from typing import Callable, Iterable, Iterator

from sdxlpipe.pipeline.keys import partition_of


def plan_items(ctx, keys: Iterable[str]) -> list[str]:
    unique = list(dict.fromkeys(keys))
    if not unique:  # nothing to plan (a config of dataset sources only): the store is not even read
        ctx.report(items=0, computed=0, reused=0)
        return []
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
        reasons.append(f"{len(missing) - len(todo)} left to other partitions (--shards {ctx.partition[0] + 1}/{ctx.partition[1]})")
    ctx.report(items=len(unique), computed=len(todo), reused=len(unique) - len(missing), reasons=reasons)
    return todo


def still_missing(ctx, stage: str, keys: Iterable[str]) -> set[str]:
    """The keys of the next chunk that no writer has committed since the plan.

    The plan is made once per stage; between chunks the store lists the stage
    once and reads only the fragments that appeared since its last look (our
    own commits are already cached), so this costs one listing, not a reload.
    """
    ctx.store.refresh(stage)
    missing = set(ctx.store.missing(stage, keys))
    ctx.store.housekeep(stage)  # our chunks add a fragment each: merge them past the threshold
    return missing


def walk_chunks(ctx, stage: str, chunks: list[list[dict]], keys_of: Callable[[dict], list[str]],
                advance) -> Iterator[tuple[list[dict], set[str]]]:
    """This writer's chunks in its own order, each with its keys that are still missing.

    Concurrent writers on one store split the work without locks (decision 7): each
    walks the chunks in an order of its own (a shuffle seeded from the OS, so two
    writers start apart and never fall into step, as two walks in one direction did
    when the faster caught up with the slower) and re-reads the index just before
    each chunk. Items another writer committed since the plan count as reused, not
    computed: a run's `computed` is what it stored.
    """
    order = list(range(len(chunks)))
    random.Random().shuffle(order)  # a fresh generator: no global state, a different order per writer
    stats, taken = ctx.stats[stage], 0
    for i in order:
        keys = set(k for job in chunks[i] for k in keys_of(job))
        missing = still_missing(ctx, stage, keys)
        if len(keys) > len(missing):
            stats.computed -= len(keys) - len(missing)
            stats.reused += len(keys) - len(missing)
            taken += len(keys) - len(missing)
            advance(len(keys) - len(missing))
        yield chunks[i], missing
    if taken:
        stats.reasons.append(f"{taken} item(s) committed by another writer meanwhile, reused")


def write_results(batches, stage: str, field: str, ctx, failed: set[str], advance, group: str = "") -> None:
    """Results (key, payload, note, chunk, source) in job order; a new shard per chunk."""
    # The writer never rolls over by size: a chunk is sized to be one shard. Leaving by an
    # exception commits the finished items (a rerun resumes) and nothing half-made.
    current = None
    with ctx.store.writer(stage, target_shard_bytes=1 << 62, group=group) as writer:
        for results in batches:
            for key, payload, note, chunk, source in results:
                if chunk != current:
                    writer.close()
                    current = chunk
                if note:
                    ctx.log.warning("%s", note)
                if payload is None:
                    failed.add(key)
                    ctx.reject(source, note or "could not be encoded")
                else:
                    writer.add(key, field, payload)
                    writer.end_item()  # one field per item: it is whole
            advance(len(results))
