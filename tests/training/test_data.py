"""Batches, regularisation balancing and the seeded per-sample choices the loop consumes."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pyarrow as pa
import pytest

from sdxlpipe.cache_format import CacheDamaged
from sdxlpipe.errors import UserError
from sdxlpipe.training.data import BatchPlan, choice, coin, epoch_batches, mix_sources, shares
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


def test_runs_without_weights_keep_the_order_they_had():
    """Runs trained before sources could be weighted resume into the same batches (orders pinned from then)."""
    buckets = [(64, 64)] * 5 + [(96, 64)] * 3 + [(64, 96)] * 2
    assert epoch_batches(buckets, [1, 2, 1, 1, 1, 1, 3, 1, 1, 1], 3, seed=7, epoch=2) == [
        [0, 3, 1], [6, 6, 5], [6, 7], [8, 9], [2, 1, 4]]
    assert epoch_batches(buckets, [1] * 10, 2, seed=7, epoch=1, is_reg=[False] * 4 + [True] * 6) == [
        [5], [1, 2], [9], [0, 3], [7, 6]]
    assert mix_sources([0] * 5 + [1] * 5, [1] * 10, 7) is None


# Two sources: 30 images weighted 1 and 6 images weighted 3 (each of the small source's images 4.5 times an epoch).
SOURCE_OF = [0] * 30 + [1] * 6
MIXED_BUCKETS = [(64, 64), (96, 64), (64, 96)] * 12


def drawn_per_source(plan: BatchPlan, batches: range) -> list[Counter]:
    seen = [Counter(), Counter()]
    for index in batches:
        for i in plan.batch_at(index)[1]:
            seen[SOURCE_OF[i]][i] += 1
    return seen


def test_weighted_sources_fill_their_share_of_every_epoch_within_one_sample():
    """Tolerance: each source's samples per epoch are within one of epoch length x weight / sum of weights
    (here exactly 9 and 27 of 36), so over any whole number of epochs the proportions are the weights'."""
    mix = mix_sources(SOURCE_OF, [1] * 36, 5, weights=[1.0, 3.0])
    plan = BatchPlan(MIXED_BUCKETS, [1] * 36, 4, 5, mix=mix)
    starts = [0]
    while len(starts) < 9:  # the first batch of each of 8 epochs
        starts.append(starts[-1] + len(epoch_batches(MIXED_BUCKETS, [1] * 36, 4, 5, len(starts) - 1, mix=mix)))
    for e in range(8):
        seen = drawn_per_source(plan, range(starts[e], starts[e + 1]))
        assert [sum(c.values()) for c in seen] == [9, 27]
        assert all(plan.batch_at(i)[0] == e for i in range(starts[e], starts[e + 1]))
        assert set(seen[1]) == set(range(30, 36)) and set(seen[1].values()) <= {4, 5}
    whole = drawn_per_source(plan, range(starts[8]))
    assert [sum(c.values()) for c in whole] == [72, 216]
    assert set(whole[0]) == set(range(30)), "the down-weighted source shows new images each epoch"
    # Its first 30 draws are its 30 images: none repeats before all were seen.
    assert max(drawn_per_source(plan, range(starts[3]))[0].values()) == 1
    assert plan.samples_per_source(starts[8], SOURCE_OF) == [72, 216]


def test_a_weighted_order_is_the_seeds():
    def order(seed: int) -> list:
        plan = BatchPlan(MIXED_BUCKETS, [1] * 36, 4, seed, mix=mix_sources(SOURCE_OF, [1] * 36, seed, [1.0, 3.0]))
        return [plan.batch_at(i) for i in range(60)]

    assert order(5) == order(5)
    assert order(5) != order(6)


def test_shares_add_up_and_stay_within_one_of_the_exact_split():
    for total, weights in ((10, [1, 1, 1]), (7, [0.5, 0.25, 0.25]), (1000, [0.3, 0.7]), (3, [1, 100])):
        counts = shares(total, weights)
        assert sum(counts) == total
        assert all(abs(c - total * w / sum(weights)) < 1 for c, w in zip(counts, weights))
    assert shares(10, [1, 1, 1]) == (4, 3, 3)  # the tie goes to the earlier source


def test_max_samples_trains_on_a_seeded_subset_fixed_for_the_run():
    mix = mix_sources(SOURCE_OF, [2] * 36, 1, max_samples=[10, 0])
    plan = BatchPlan(MIXED_BUCKETS, [2] * 36, 4, 1, mix=mix)
    seen = drawn_per_source(plan, range(5 * plan.per_epoch))
    assert len(seen[0]) == 10 and set(seen[0].values()) == {10}, "the same 10, repeats times each epoch"
    assert set(seen[1]) == set(range(30, 36))
    assert mix_sources(SOURCE_OF, [2] * 36, 1, max_samples=[10, 0]).kept == mix.kept, "the seed's subset"
    other = mix_sources(SOURCE_OF, [2] * 36, 2, max_samples=[10, 0])
    assert other.kept != mix.kept and len(other.kept) == 16


def test_max_samples_with_weights_caps_the_pool_the_share_is_drawn_from():
    mix = mix_sources(SOURCE_OF, [1] * 36, 3, weights=[1, 1], max_samples=[4, 0])
    assert mix.counts == (5, 5)  # an epoch is the 10 kept images, half from each source
    plan = BatchPlan(MIXED_BUCKETS, [1] * 36, 4, 3, mix=mix)
    seen = drawn_per_source(plan, range(4 * plan.per_epoch))
    assert len(seen[0]) == 4


def test_a_weighted_source_with_no_images_is_a_clear_error():
    with pytest.raises(UserError, match=r"sources\[2\] has weight"):
        mix_sources([0, 0, 1], [1, 1, 1], 0, weights=[1, 1, 1])


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
