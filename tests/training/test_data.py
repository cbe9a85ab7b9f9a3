"""Batches, regularisation balancing and the seeded per-sample choices the loop consumes."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pyarrow as pa
import pytest

from sdxlpipe.cache_format import CacheDamaged
from sdxlpipe.training.data import BatchPlan, choice, coin, epoch_batches
from tests.training.conftest import build_samples, make_context, params, run_train


def test_batches_hold_one_bucket_and_every_sample_its_repeats():
    buckets = [(64, 64)] * 5 + [(96, 64)] * 3
    batches = epoch_batches(buckets, [2] * 8, 2, seed=0, epoch=0)
    assert all(len({buckets[i] for i in b}) == 1 for b in batches)
    assert Counter(i for b in batches for i in b) == {i: 2 for i in range(8)}
    assert batches != epoch_batches(buckets, [2] * 8, 2, seed=0, epoch=1)
    assert batches == epoch_batches(buckets, [2] * 8, 2, seed=0, epoch=0)


def test_regularisation_samples_match_the_training_count_per_epoch():
    is_reg = [False] * 3 + [True] * 10
    batches = epoch_batches([(64, 64)] * 13, [1] * 13, 2, seed=0, epoch=0, is_reg=is_reg)
    seen = Counter(i for b in batches for i in b)
    assert sum(n for i, n in seen.items() if not is_reg[i]) == 3
    assert sum(n for i, n in seen.items() if is_reg[i]) == 3


def test_plan_walks_epochs_of_varying_length_like_one_long_list():
    is_reg = [False] * 3 + [True] * 4
    buckets = [(64, 64), (96, 64)] * 3 + [(64, 64)]
    plan = BatchPlan(buckets, [1] * 7, 2, 0, is_reg)
    flat = [(e, b) for e in range(5) for b in epoch_batches(buckets, [1] * 7, 2, 0, e, is_reg)]
    assert [plan.batch_at(i) for i in range(len(flat))] == flat


def test_choices_are_seeded_by_where_they_are_made():
    variants = ["a", "b", "c", "d"]
    picks = [choice(variants, 0, "text", epoch, 3) for epoch in range(40)]
    assert picks == [choice(variants, 0, "text", epoch, 3) for epoch in range(40)]
    assert set(picks) == set(variants)
    tosses = [coin(0.3, 0, "drop", i, 0) for i in range(2000)]
    assert 0.25 < sum(tosses) / 2000 < 0.35
    assert not any(coin(0.0, 0, "drop", i, 0) for i in range(100))


@pytest.mark.parametrize("column", ["latent_flip_key", "text_variant_keys", "empty_text_key"])
def test_the_run_reads_flipped_latents_caption_variants_and_the_empty_caption(tmp_path, column):
    ctx = make_context(tmp_path / column)
    table = build_samples(ctx, 2, flips=True, variants=2)
    rows = table.to_pylist()
    missing = ["gone"] if column == "text_variant_keys" else "gone"
    rows[1][column] = missing
    with pytest.raises(CacheDamaged) as e:
        run_train(ctx, pa.Table.from_pylist(rows), params(max_steps=1))
    assert "gone" in str(e.value.items)


def test_flips_and_caption_dropout_change_what_is_learned(tmp_path):
    base = params(max_steps=3, save_every_steps=3, conv_rank=4)
    losses = []
    for name, flips, p in (("plain", False, base), ("flips", True, base),
                           ("dropout", True, dataclasses.replace(base, caption_dropout=0.5))):
        ctx = make_context(tmp_path / name)
        table = build_samples(ctx, 2, flips=True)  # the same payloads in every run
        if not flips:
            table = table.set_column(table.column_names.index("latent_flip_key"), "latent_flip_key",
                                     pa.array([None] * table.num_rows, pa.string()))
        losses.append(run_train(ctx, table, p)["final_loss"])
    assert len(set(losses)) == 3, losses
