"""The validation loss on held-out items: which items are held out, what the loss measures, where it goes."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pyarrow as pa
import pytest

from sdxlpipe.pipeline.keys import item_key
from sdxlpipe.stages import train as train_stage
from sdxlpipe.training import holdout
from tests.training.conftest import build_samples, make_context, params, run_train


def test_the_split_picks_items_by_key_so_it_is_stable_as_the_dataset_grows():
    keys = [f"subset/img{i:05d}.png" for i in range(4000)]
    held = {k for k in keys if holdout.picked(k, 0.1)}
    assert 300 < len(held) < 500  # about a tenth
    grown = keys + [f"subset/new{i:05d}.png" for i in range(4000)]
    assert {k for k in grown[:4000] if holdout.picked(k, 0.1)} == held  # new items move no old one in or out
    assert {k for k in random.Random(1).sample(keys, 4000) if holdout.picked(k, 0.1)} == held  # nor their order
    assert {k for k in keys if holdout.picked(k, 0.2)} >= held  # a larger fraction only adds items
    table = pa.table({"key": keys[:10], "validation": [False] * 9 + [True]})
    kept, out = holdout.split(table, 0.0)
    assert out.column("key").to_pylist() == [keys[9]] and kept.num_rows == 9  # a validation source's item


def _held_fraction(table: pa.Table) -> float:
    """A split that holds out 2 or 3 of these rows (the rows' keys decide which)."""
    for fraction in (0.25, 0.3, 0.35, 0.4):
        if 2 <= holdout.split(table, fraction)[1].num_rows <= 3:
            return fraction
    raise AssertionError("no fraction holds out 2-3 rows")


def test_validation_loss_logged_best_step_named_and_settings_out_of_the_key(tmp_path):
    ctx = make_context(tmp_path / "a")
    table = build_samples(ctx, 10)
    split = _held_fraction(table)
    p = params(max_steps=6, save_every_steps=2, max_checkpoints=5, learning_rate=3e-3, validation_split=split,
               validation_every_steps=2)
    done = run_train(ctx, table, p)

    run_dir = Path(ctx.outputs["train"]["dir"])
    log = [json.loads(line) for line in (run_dir / "logs" / "log.jsonl").read_text().splitlines()]
    measured = [[r["step"], r["val_loss"]] for r in log if "val_loss" in r]
    assert [s for s, _ in measured] == [2, 4, 6]
    assert len({v for _, v in measured}) == 3  # the weights moved, so did the loss on the held-out items
    step, value = min(measured, key=lambda sv: sv[1])
    assert done["best_validation"] == {"step": step, "val_loss": value,
                                       "checkpoint": str(run_dir / "checkpoints" / f"step-{step:08d}")}
    assert ctx.outputs["train"]["best_validation"] == done["best_validation"]
    kept, held = holdout.split(table, split)
    assert done["validation_items"] == held.num_rows

    # The held-out rows did not train: the key is that of the other rows alone, with no validation setting,
    # and the validation settings do not enter it.
    key = json.loads((run_dir / "key.json").read_text())
    plain = dataclasses.replace(p, validation_split=0.0, validation_every_steps=0)
    assert key == json.loads(json.dumps(train_stage.key_doc(kept, plain, ctx.models.fingerprints())))
    assert key["sample_count"] == table.num_rows - held.num_rows
    other = dataclasses.replace(p, validation_every_steps=3, validation_seed=7)
    assert item_key(train_stage.key_doc(kept, other, ctx.models.fingerprints())) == run_dir.name


def test_the_loss_is_fixed_noise_per_item_whatever_the_seed_or_the_batching(tmp_path):
    import torch

    from sdxlpipe.models import loading
    from sdxlpipe.training import networks
    from sdxlpipe.training.validation_loss import HeldOut

    ctx = make_context(tmp_path / "b")
    table = build_samples(ctx, 5)
    unet = loading.load_unet("tiny")
    p = params()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        networks.attach(unet, p)
    alphas = loading.load_noise_scheduler("tiny").alphas_cumprod
    unet.train()  # as the loop holds it

    def loss(**overrides) -> float:
        held = HeldOut(table, ctx.store, dataclasses.replace(p, **overrides), stages=ctx.config.stages)
        return held.loss(unet, alphas, "epsilon", torch.device("cpu"))

    base = loss()
    assert loss() == base  # the same weights, the same number
    assert loss(seed=123) == base  # the run's seed draws training's noise, not this
    assert loss(batch_size=1) == pytest.approx(base, rel=1e-6)  # each item's own noise, in any batch
    assert loss(validation_seed=5) != base  # the validation seed chooses the noise
    assert unet.training and all(m.training for m in unet.modules())  # back in training mode (dropout on)


def test_a_resumed_run_keeps_the_validation_losses_before_it(tmp_path):
    ctx = make_context(tmp_path / "c")
    table = build_samples(ctx, 10)
    p = params(max_steps=4, save_every_steps=2, validation_split=_held_fraction(table), validation_every_steps=2)
    run_train(ctx, table, p)
    run_dir = Path(ctx.outputs["train"]["dir"])

    def measured() -> dict[int, float]:
        log = [json.loads(line) for line in (run_dir / "logs" / "log.jsonl").read_text().splitlines()]
        return {r["step"]: r["val_loss"] for r in log if "val_loss" in r}

    before = measured()
    # max_steps is out of the key (constant LR): the finished run is extended from its last checkpoint.
    extended = run_train(ctx, table, dataclasses.replace(p, max_steps=6))
    after = measured()
    assert sorted(before) == [2, 4] and sorted(after) == [2, 4, 6]
    assert {s: after[s] for s in before} == before  # kept, not measured again
    # The history the last checkpoint carries (what a later resume starts from) holds every step's loss.
    state = json.loads((run_dir / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert {s: v for s, v in state["validation"]} == after
    best = min(after.items(), key=lambda sv: sv[1])  # the lowest over the whole run, not only its last part
    assert (extended["best_validation"]["step"], extended["best_validation"]["val_loss"]) == best


def test_validation_scheduled_with_nothing_to_validate_is_a_clear_error(tmp_path):
    from sdxlpipe.errors import UserError

    ctx = make_context(tmp_path / "d")
    with pytest.raises(UserError, match="no validation prompts and no held-out items") as e:
        run_train(ctx, build_samples(ctx, 2), params(validation_every_steps=2))
    assert "validation_split" in e.value.hint


def test_a_validation_source_takes_no_share_of_the_epoch(tmp_path):
    from sdxlpipe.config import load_config
    from sdxlpipe.errors import ConfigError

    for name in ("a", "b", "held"):
        (tmp_path / name).mkdir()
    config = tmp_path / "sdxlpipe.toml"
    base = ('model = "tiny"\n[[sources]]\npath = "a"\nweight = 2\n[[sources]]\npath = "b"\nweight = 1\n'
            '[[sources]]\npath = "held"\nkind = "validation"\n')
    config.write_text(base)
    assert [s.kind for s in load_config(config).params["ingest"].sources] == ["auto", "auto", "validation"]
    config.write_text(base + "weight = 1\n")
    with pytest.raises(ConfigError, match=r"sources\[2\]\.weight"):
        load_config(config)
