"""A short run with each loss and noise option lowers that run's own loss on the tiny model.

The loss compared is the run's fixed-noise evaluation loss (same batches,
noise and timesteps before and after), so the drop is what was learned, not
luck of the draw. The base is a LoCon (attention + conv) at a high rate:
the tiny UNet's attention-only LoRA learns too slowly to show in 8 steps.
"""

from __future__ import annotations

import pytest

from tests.training.conftest import build_samples, make_context, params, run_train

BASE = dict(conv_rank=4, conv_alpha=8.0, learning_rate=1e-2, max_steps=8, save_every_steps=8)

OPTIONS = {
    "epsilon": dict(prediction_type="epsilon"),
    "v_prediction": dict(prediction_type="v_prediction"),
    "min_snr_gamma": dict(min_snr_gamma=5.0),
    "min_snr_gamma_v": dict(min_snr_gamma=5.0, prediction_type="v_prediction"),
    "noise_offset": dict(noise_offset=0.1),
    "noise_offset_random_strength": dict(noise_offset=0.1, noise_offset_random_strength=True),
    "adaptive_noise_scale": dict(noise_offset=0.05, adaptive_noise_scale=0.1),
    "multires_noise": dict(multires_noise_iterations=4, multires_noise_discount=0.3),
    "input_perturbation": dict(input_perturbation=0.1),
    "debiased_estimation": dict(debiased_estimation=True),
    "zero_terminal_snr_v_scaled_like_epsilon": dict(prediction_type="v_prediction", zero_terminal_snr=True,
                                                     scale_v_pred_loss_like_noise_pred=True),
    "l1": dict(loss_type="l1"),
    "huber_constant": dict(loss_type="huber", huber_schedule="constant"),
    "huber_exponential": dict(loss_type="huber", huber_schedule="exponential"),
    "huber_snr": dict(loss_type="huber", huber_schedule="snr"),
    "smooth_l1_snr": dict(loss_type="smooth_l1", huber_schedule="snr"),
    "timestep_range": dict(min_timestep=200, max_timestep=800),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_a_short_run_with_the_option_lowers_the_loss(tmp_path, name):
    ctx = make_context(tmp_path / name)
    table = build_samples(ctx, 4)
    done = run_train(ctx, table, params(**BASE, **OPTIONS[name]))
    assert done["eval_loss_after"] < 0.9 * done["eval_loss_before"], done


def test_masked_loss_lowers_the_loss_inside_the_mask(tmp_path):
    ctx = make_context(tmp_path / "masked")
    table = build_samples(ctx, 4, masks=True)
    done = run_train(ctx, table, params(**BASE, masked_loss=True))
    assert done["eval_loss_after"] < 0.9 * done["eval_loss_before"], done


def test_prior_preservation_weight_with_regularisation_rows_lowers_the_loss(tmp_path):
    ctx = make_context(tmp_path / "reg")
    table = build_samples(ctx, 4, reg=2)
    done = run_train(ctx, table, params(**BASE, prior_loss_weight=0.5))
    assert done["eval_loss_after"] < 0.9 * done["eval_loss_before"], done
