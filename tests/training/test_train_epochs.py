"""max_epochs, checkpoints and validation every N epochs."""

from __future__ import annotations

from pathlib import Path

from tests.training.conftest import build_samples, make_context, params, run_train


def test_epochs_set_the_run_length_and_the_save_and_validation_cadence(tmp_path):
    ctx = make_context(tmp_path / "e")
    # 4 samples, batch 2: 2 steps per epoch, 3 epochs = 6 steps.
    p = params(max_epochs=3, save_every_steps=0, save_every_epochs=1, max_checkpoints=5,
               validation_prompts=("a shape",), validation_every_epochs=2, validation_steps=2)
    done = run_train(ctx, build_samples(ctx, 4), p)
    run_dir = Path(ctx.outputs["train"]["dir"])
    assert done["steps"] == 6
    assert sorted(d.name for d in (run_dir / "checkpoints").iterdir()) == [
        "step-00000002", "step-00000004", "step-00000006"]
    assert sorted(d.name for d in (run_dir / "validation").iterdir()) == ["step-00000004"]
