"""The feed reads batches into a ring of reused buffers: a released batch's buffers are read into again,
a held one is never touched, and every batch still equals the in-memory reference, across buckets."""

from __future__ import annotations

import gc
import weakref

import pyarrow as pa
import torch

from sdxlpipe.training import stream
from sdxlpipe.training.batches import as_float
from tests.training.reference_batches import assemble, load_cached
from sdxlpipe.training.data import BatchPlan
from sdxlpipe.training.feed import open_feed
from tests.training.conftest import build_samples, make_context, params, run_train


def plan_of(table, p) -> BatchPlan:
    rows = table.to_pylist()
    return BatchPlan([(r["bucket_w"], r["bucket_h"]) for r in rows], [r["repeats"] for r in rows],
                     p.batch_size, p.seed, [bool(r.get("is_reg")) for r in rows])


def feed_of(ctx, table, p, steps: int):
    source = stream.open_source(table, ctx.store, p, plan_of(table, p), stages=ctx.config.stages)
    return open_feed(source, p, start_step=0, max_steps=steps, world=1, rank=0, device="cpu")


def test_a_released_batchs_buffers_are_read_into_again(tmp_path):
    ctx = make_context(tmp_path / "ws")
    table = build_samples(ctx, 6)
    p = params(batch_size=2, loader_workers=0)
    with feed_of(ctx, table, p, 4) as feed:
        first = feed.take(0)
        where = {k: first[k].data_ptr() for k in ("mean", "std", "embeds", "pooled")}
        feed.release(0)
        second = feed.take(1)
        assert {k: second[k].data_ptr() for k in where} == where


def test_a_batch_not_yet_released_is_never_overwritten(tmp_path):
    ctx = make_context(tmp_path / "ws")
    table = build_samples(ctx, 6, flips=True)
    p = params(batch_size=2, loader_workers=2, loader_prefetch=1)
    with feed_of(ctx, table, p, 12) as feed:
        held = feed.take(0)
        copy = {k: held[k].clone() for k in ("mean", "std", "embeds", "pooled")}
        for index in feed.indices[1:]:
            feed.take(index)
            feed.release(index)
        assert all(torch.equal(held[k], copy[k]) for k in copy)


def test_a_batch_never_released_is_not_kept_by_the_feed(tmp_path):
    """A caller that takes batches and never releases them (a bench, a one-off read) holds only what it keeps:
    the feed keeps no batch's buffers alive past its ring's few, or memory grows with every batch taken."""
    ctx = make_context(tmp_path / "ws")
    table = build_samples(ctx, 6)
    p = params(batch_size=2, loader_workers=2, loader_prefetch=1)
    with feed_of(ctx, table, p, 12) as feed:
        first = weakref.ref(feed.take(0)["mean"])
        for index in feed.indices[1:]:
            feed.take(index)
        gc.collect()
        assert first() is None


def test_batches_read_through_the_ring_equal_the_in_memory_ones_across_buckets(tmp_path):
    """Square, landscape and portrait buckets alternate, so buffers are reused across shapes, and the
    landscape and portrait items are as long as each other with other headers (the one-read guess misses)."""
    ctx = make_context(tmp_path / "ws")
    table = pa.concat_tables([build_samples(ctx, 4, masks=True, variants=1),
                              build_samples(ctx, 4, size=32, width=64, masks=True, variants=1, prefix="wide", seed=1),
                              build_samples(ctx, 4, size=64, width=32, masks=True, variants=1, prefix="tall", seed=2)])
    p = params(batch_size=2, loader_workers=2, masked_loss=True, caption_dropout=0.3)
    rows, plan = table.to_pylist(), plan_of(table, p)
    latents, texts = load_cached(rows, ctx)
    steps = 3 * plan.per_epoch  # three epochs, each in its own order
    with feed_of(ctx, table, p, steps) as feed:
        shapes = set()
        for index in feed.indices:
            got = as_float(feed.take(index))  # the loop's order: copy out, then release
            feed.release(index)
            epoch, members = plan.batch_at(index)
            want = assemble([rows[i] for i in members], members, latents, texts, p, epoch, index, False)
            for name, value in want.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(got[name], value), (index, name)
                else:
                    assert got[name] == value, (index, name)
            shapes.add(tuple(got["mean"].shape[2:]))
    assert shapes == {(8, 8), (4, 8), (8, 4)}


def test_the_run_reports_how_long_it_waited_for_batches(tmp_path):
    ctx = make_context(tmp_path / "ws")
    done = run_train(ctx, build_samples(ctx, 4), params(max_steps=3, save_every_steps=3, loader_workers=2))
    assert 0 <= done["loader_wait_seconds"] <= done["seconds"]
