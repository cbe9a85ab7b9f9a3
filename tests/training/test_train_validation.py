"""Validation images with fixed seeds, a contact sheet per validation, and TensorBoard logs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.training.conftest import build_samples, make_context, params, run_train


def test_validation_images_grid_and_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")  # in the dev extra
    ctx = make_context(tmp_path / "v")
    p = params(max_steps=4, save_every_steps=4, conv_rank=4, learning_rate=1e-2, validation_prompts=("a red square", "a blue circle"),
               validation_negative_prompts=("blurry",), validation_every_steps=2, validation_steps=2, tensorboard=True)
    done = run_train(ctx, build_samples(ctx, 2), p)
    root = Path(done["outputs"]["validation"])
    assert sorted(d.name for d in root.iterdir()) == ["step-00000002", "step-00000004"]
    for step in root.iterdir():
        assert sorted(f.name for f in step.iterdir()) == ["grid.png", "prompt-00.png", "prompt-01.png"]
        assert Image.open(step / "grid.png").size == (128, 64)
    first, second = (np.asarray(Image.open(root / s / "prompt-00.png")) for s in ("step-00000002", "step-00000004"))
    assert first.shape == (64, 64, 3) and not np.array_equal(first, second)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(done["outputs"]["logs"]) / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"loss", "lr", "grad_norm"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert "validation/00" in events.Tags()["images"]


def test_the_same_seed_renders_the_same_validation_image(tmp_path):
    runs = []
    for name in ("a", "b"):
        ctx = make_context(tmp_path / name)
        p = params(max_steps=1, save_every_steps=1, validation_prompts=("a red square",), validation_every_steps=1,
                   validation_steps=2)
        done = run_train(ctx, build_samples(ctx, 2), p)
        runs.append(np.asarray(Image.open(Path(done["outputs"]["validation"]) / "step-00000001" / "prompt-00.png")))
    assert np.array_equal(runs[0], runs[1])
