"""train.channels_last and train.compile change the kernels, not the run: the same losses, the same key.

torch.compile itself is checked on a GPU (tests/cuda): dynamo traces the tiny UNet for minutes on a CPU.
"""

from __future__ import annotations

import pytest

from sdxlpipe.stages import train
from tests.training.conftest import build_samples, make_context, params, run_train


def test_channels_last_trains_to_the_losses_of_the_plain_layout(tmp_path):
    runs = {}
    for layout in (False, True):
        ctx = make_context(tmp_path / f"nhwc-{layout}")
        runs[layout] = run_train(ctx, build_samples(ctx, 4),
                                 params(max_steps=3, save_every_steps=3, conv_rank=4, channels_last=layout))
    plain, nhwc = runs[False], runs[True]
    assert (plain["unet_layout"], nhwc["unet_layout"]) == ("contiguous", "channels_last")
    assert not plain["unet_compiled"] and not nhwc["unet_compiled"]
    assert nhwc["eval_loss_before"] == pytest.approx(plain["eval_loss_before"], rel=1e-4)
    assert nhwc["eval_loss_after"] == pytest.approx(plain["eval_loss_after"], rel=1e-3)
    assert nhwc["eval_loss_after"] != plain["eval_loss_before"]  # it trained


def test_compile_and_channels_last_leave_the_train_key_as_it_was(tmp_path):
    ctx = make_context(tmp_path / "ws")
    table = build_samples(ctx, 2)
    fp = ctx.models.fingerprints()
    plain = train.key_doc(table, params(), fp)
    assert train.key_doc(table, params(compile=True, channels_last=True), fp) == plain
    assert "compile" not in plain["params"] and "channels_last" not in plain["params"]
