"""`train.shuffle = "shard_blocks"`: an epoch that walks the latents' shards a block at a time (decision 79).

The plan-level tests build a Layout by hand (which shard each sample's latent is in, and the shards'
bytes); the run-level ones train the tiny model from a store cut into small shards.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path

import fsspec
import torch
from safetensors.torch import load_file

from sdxlpipe.stages import train as train_stage
from sdxlpipe.training import layout, stream
from sdxlpipe.training.data import BatchPlan, Layout, epoch_batches, mix_sources, plan_of
from tests.training.conftest import build_samples, make_context, params, run_train

# 120 samples in three buckets, 30 shards of 4 samples each (in sample order, as an encode writes them), 100 bytes
# a shard; regularisation rows at the end.
N = 120
BUCKETS = [(64, 64), (96, 64), (64, 96)] * 40
LAYOUT = Layout(tuple(f"s{k:02d}" for k in range(30)), (100,) * 30, tuple(i // 4 for i in range(N)))
IS_REG = [False] * 100 + [True] * 20
REPEATS = [1, 2] * 60


def blocks(seed: int, epoch: int, block_bytes: int = 300, **kw) -> list[list[int]]:
    return epoch_batches(BUCKETS, REPEATS, 4, seed, epoch, IS_REG, layout=LAYOUT, block_bytes=block_bytes, **kw)


def per_bucket(batches) -> Counter:
    return Counter(BUCKETS[b[0]] for b in batches)


def test_shard_blocks_draw_the_same_samples_and_batches_per_bucket_as_the_global_order():
    mix = mix_sources([0] * 60 + [1] * 60, REPEATS, 3, weights=[1.0, 3.0])
    for epoch in range(4):
        for kw in ({}, {"mix": mix}):
            walked = blocks(3, epoch, **kw)
            everywhere = epoch_batches(BUCKETS, REPEATS, 4, 3, epoch, IS_REG, **kw)
            assert Counter(i for b in walked for i in b) == Counter(i for b in everywhere for i in b)
            assert all(len({BUCKETS[i] for i in b}) == 1 for b in walked), "bucket-pure batches"
            # The same batches per bucket (at most one short one each), so the same batches per epoch:
            # decision 72's rule (A batches per process per step) holds as in the global order.
            assert per_bucket(walked) == per_bucket(everywhere)
            assert sum(len(b) < 4 for b in walked) <= 3
            assert walked != everywhere
    plan = BatchPlan(BUCKETS, REPEATS, 4, 3, IS_REG, layout=LAYOUT, block_bytes=300)
    assert plan.per_epoch == BatchPlan(BUCKETS, REPEATS, 4, 3, IS_REG).per_epoch


def test_the_shard_block_order_is_the_seeds_and_changes_every_epoch():
    assert blocks(5, 0) == blocks(5, 0)
    assert blocks(5, 0) != blocks(6, 0)
    assert blocks(5, 0) != blocks(5, 1)
    # Blocks come in a new order each epoch, not only new orders within them.
    first_shards = [LAYOUT.shard_of[blocks(5, e)[0][0]] // 3 for e in range(6)]
    assert len(set(first_shards)) > 1


def test_a_window_of_batches_reads_from_the_shards_of_about_one_block():
    """Every 8 consecutive batches (32 samples) read from at most 3 blocks' shards (a block: 3 shards of
    12 samples); the global order draws those 32 samples from most of the 30 shards."""
    def worst(batches) -> int:
        return max(len({LAYOUT.shard_of[i] for b in batches[k:k + 8] for i in b}) for k in range(len(batches) - 7))

    for epoch in range(3):
        assert worst(blocks(1, epoch)) <= 9
        assert worst(epoch_batches(BUCKETS, REPEATS, 4, 1, epoch, IS_REG)) > 15


def test_blocks_larger_than_the_dataset_mix_like_the_global_order():
    batches = blocks(2, 0, block_bytes=10 ** 9)
    assert max(len({LAYOUT.shard_of[i] for b in batches[k:k + 8] for i in b}) for k in range(len(batches) - 7)) > 15


def final(run_dir: Path, step: int) -> tuple[dict, list]:
    ckpt = run_dir / "checkpoints" / f"step-{step:08d}"
    return load_file(ckpt / "adapter.safetensors"), json.loads((ckpt / "state.json").read_text())["losses"]


def test_a_shard_blocks_run_resumed_mid_epoch_ends_bit_equal_and_keeps_its_layout(tmp_path):
    """8 samples, each latent in its own shard, blocks of 2 shards, batch 2: 4 batches an epoch; the run
    stops after step 3 (mid-epoch) and resumes. It resumes on another store holding the same items in one
    shard (as after the items were encoded again, or the store compacted): the run orders by the layout it
    recorded when it started, so it ends as the unbroken run did."""
    settings = dict(max_steps=6, save_every_steps=3, max_checkpoints=2, shuffle="shard_blocks",
                    shuffle_block_gb=4000 / (1 << 30), learning_rate=1e-2)
    ctx = make_context(tmp_path / "ws")
    table = build_samples(ctx, 8, shard_bytes=1500)  # a 64 px sample's latent: ~1.7 KB in its shard
    shards = {loc.shard_id for loc in ctx.store.locate("vae_encode", table.column("latent_key").to_pylist())}
    assert len(shards) == 8
    done = run_train(ctx, table, params(**settings))
    run_dir = Path(done["outputs"]["checkpoint"]).parent.parent
    assert len(json.loads((run_dir / "layout.json").read_text())["shards"]) == 8
    unbroken = final(run_dir, 6)
    shutil.rmtree(run_dir / "checkpoints" / "step-00000006")
    (run_dir / "done.json").unlink()

    elsewhere = make_context(tmp_path / "ws", store=str(tmp_path / "compacted"))
    assert build_samples(elsewhere, 8).equals(table)  # the same items, all in one shard
    assert run_train(elsewhere, table, params(**settings))["outputs"]["checkpoint"].startswith(str(run_dir))

    (wa, la), (wb, lb) = unbroken, final(run_dir, 6)
    assert la == lb and len(la) == 6
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_shard_blocks_are_in_the_train_key_and_the_global_order_keeps_its_key(tmp_path):
    ctx = make_context(tmp_path / "ws")
    table = build_samples(ctx, 2)
    fp = {"unet": "u", "scheduler": "s"}
    base = train_stage.Params()
    doc = train_stage.key_doc(table, base, fp)
    assert "shuffle" not in doc["params"] and "shuffle_block_gb" not in doc["params"]
    # A block size is inert in the global order: same key.
    assert doc == train_stage.key_doc(table, dataclasses.replace(base, shuffle_block_gb=1.0), fp)
    walked = train_stage.key_doc(table, dataclasses.replace(base, shuffle="shard_blocks"), fp)
    smaller = train_stage.key_doc(table, dataclasses.replace(base, shuffle="shard_blocks", shuffle_block_gb=1.0), fp)
    assert walked["params"]["shuffle"] == "shard_blocks"
    assert len({json.dumps(d, sort_keys=True) for d in (doc, walked, smaller)}) == 3


def test_a_remote_store_in_shard_blocks_order_fetches_only_latent_shards_whole(tmp_path):
    """The fetch-ahead asks for what `BatchSource.shards` names: in the shard_blocks order the latents' shards
    only (text embeddings, in shards of their own hash order, are read by range); in the global order both."""
    url = f"memory://sdxlpipe-blocks-{tmp_path.name}/store"
    try:
        ctx = make_context(tmp_path / "ws", store=url)
        table = build_samples(ctx, 8, shard_bytes=1500)
        p = params(shard_cache_dir=str(tmp_path / "cache"))
        where = layout.locate(table, ctx.store, ctx.config.stages)
        assert len(set(where.shard_of)) == 8
        for blocks, stages in ((where, {"vae_encode"}), (None, {"vae_encode", "text_encode"})):
            plan = plan_of(table, p.batch_size, p.seed, (), blocks, 4000)
            source = stream.open_source(table, ctx.store, p, plan, stages=ctx.config.stages)
            assert {stage for i in range(plan.per_epoch) for stage, _ in source.shards(i)} == stages
    finally:
        fsspec.filesystem("memory").rm(url[len("memory://"):], recursive=True)
