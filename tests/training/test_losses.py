"""Each loss and noise option against its formula, written out here, on small tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sdxlpipe.training import losses

# SDXL's schedule: scaled_linear betas from 0.00085 to 0.012 over 1000 steps.
BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
AC = torch.cumprod(1 - BETAS, dim=0)
T = torch.tensor([0, 10, 500, 999])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_snr_is_alpha_bar_over_one_minus_alpha_bar():
    expected = torch.stack([AC[t] / (1 - AC[t]) for t in T])
    assert torch.allclose(losses.snr(AC, T), expected)


def test_timesteps_stay_in_the_range():
    t = losses.sample_timesteps(10_000, 200, 300, gen())
    assert int(t.min()) == 200 and int(t.max()) == 299


def test_add_noise_matches_ddpm():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0, noise = torch.randn(4, 4, 8, 8, generator=gen(1)), torch.randn(4, 4, 8, 8, generator=gen(2))
    assert torch.allclose(losses.add_noise(x0, noise, T, sched.alphas_cumprod), sched.add_noise(x0, noise, T), atol=1e-6)


def test_v_target_is_sqrt_a_noise_minus_sqrt_one_minus_a_x0():
    x0, noise = torch.randn(4, 4, 8, 8, generator=gen(1)), torch.randn(4, 4, 8, 8, generator=gen(2))
    v = losses.target(x0, noise, T, AC, "v_prediction")
    for i, t in enumerate(T):
        a = AC[t]
        assert torch.allclose(v[i], a.sqrt() * noise[i] - (1 - a).sqrt() * x0[i], atol=1e-6)
    assert losses.target(x0, noise, T, AC, "epsilon") is noise


def test_noise_offset_adds_a_constant_per_sample_and_channel():
    noise = torch.randn(3, 4, 8, 8, generator=gen(1))
    out = losses.offset_noise(noise, noise, 0.1, gen(5))
    expected = noise + 0.1 * torch.randn((3, 4, 1, 1), generator=gen(5))
    assert torch.allclose(out, expected)
    spread = (out - noise).flatten(2)
    assert torch.allclose(spread.max(-1).values, spread.min(-1).values)


def test_noise_offset_random_strength_scales_each_sample_by_a_uniform_draw():
    noise = torch.randn(3, 4, 8, 8, generator=gen(1))
    out = losses.offset_noise(noise, noise, 0.1, gen(5), random_strength=True)
    g = gen(5)
    u = torch.rand((3, 1, 1, 1), generator=g)
    assert torch.allclose(out, noise + 0.1 * u * torch.randn((3, 4, 1, 1), generator=g))


def test_adaptive_noise_scale_grows_the_offset_with_the_latent_mean():
    noise = torch.randn(2, 4, 8, 8, generator=gen(1))
    latents = torch.randn(2, 4, 8, 8, generator=gen(3)) + 2.0
    out = losses.offset_noise(noise, latents, 0.05, gen(5), adaptive_scale=0.5)
    offset = (0.05 + 0.5 * latents.mean(dim=(2, 3), keepdim=True).abs()).clamp(min=0)
    assert torch.allclose(out, noise + offset * torch.randn((2, 4, 1, 1), generator=gen(5)), atol=1e-6)


def test_multires_noise_is_the_discounted_pyramid_with_unit_std():
    noise = torch.randn(2, 4, 16, 16, generator=gen(1))
    out = losses.multires_noise(noise, gen(9), iterations=3, discount=0.3)
    g, expected = gen(9), noise.clone()
    for i in range(3):
        r = float(torch.rand((), generator=g)) * 2 + 2
        h = w = max(1, int(16 / r**i))
        expected += F.interpolate(torch.randn((2, 4, h, w), generator=g), size=(16, 16), mode="bilinear") * 0.3**i
        if h == 1:
            break
    expected /= expected.std()
    assert torch.allclose(out, expected, atol=1e-6)
    assert abs(float(out.std()) - 1) < 1e-5


def test_input_perturbation_adds_gamma_times_fresh_noise():
    noise = torch.randn(2, 4, 8, 8, generator=gen(1))
    out = losses.perturbed(noise, 0.1, gen(4))
    assert torch.allclose(out, noise + 0.1 * torch.randn((2, 4, 8, 8), generator=gen(4)))


@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_huber_c_schedules(schedule):
    c = losses.huber_c(T, schedule, 0.1, AC)
    for i, t in enumerate(T.tolist()):
        if schedule == "constant":
            want = 0.1
        elif schedule == "exponential":
            want = math.exp(-t * math.log(1 / 0.1) / 1000)
        else:
            sigma = math.sqrt((1 - float(AC[t])) / float(AC[t]))
            want = (1 - 0.1) / (1 + sigma) ** 2 + 0.1
        assert float(c[i]) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber", "smooth_l1"])
def test_elementwise_losses(loss_type):
    pred, tgt = torch.randn(4, 4, 8, 8, generator=gen(1)), torch.randn(4, 4, 8, 8, generator=gen(2))
    c = torch.tensor([0.1, 0.5, 1.0, 2.0])
    out = losses.elementwise_loss(pred, tgt, loss_type, c)
    for i in range(4):
        d, ci = pred[i] - tgt[i], float(c[i])
        want = {
            "l2": d**2, "l1": d.abs(),
            "huber": 2 * ci * ((d**2 + ci**2).sqrt() - ci),
            "smooth_l1": 2 * ((d**2 + ci**2).sqrt() - ci),
        }[loss_type]
        assert torch.allclose(out[i], want, atol=1e-6)
    if loss_type == "l2":
        assert torch.allclose(out.mean(), F.mse_loss(pred, tgt))


def test_masked_mean_divides_by_the_mask_area():
    loss = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).reshape(2, 2, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, :, :2] = 1  # top half
    mask[1] = 0.5  # everywhere, half weight
    out = losses.per_sample_mean(loss, mask)
    assert float(out[0]) == pytest.approx(float(loss[0, :, :2].mean()))
    assert float(out[1]) == pytest.approx(float(loss[1].mean()))
    assert torch.allclose(losses.per_sample_mean(loss), loss.mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_gamma_weight(prediction_type):
    s = losses.snr(AC, T)
    w = losses.min_snr_weight(s, 5.0, prediction_type)
    for i in range(len(T)):
        si = float(s[i])
        want = min(si, 5.0) / (si + 1 if prediction_type == "v_prediction" else si)
        assert float(w[i]) == pytest.approx(want, rel=1e-5)


def test_debiased_estimation_weight_is_one_over_sqrt_snr_clamped_at_1000():
    s = torch.tensor([0.01, 1.0, 4.0, 5000.0])
    assert torch.allclose(losses.debiased_weight(s), torch.tensor([10.0, 1.0, 0.5, 1 / math.sqrt(1000)]))


def test_prior_weight_applies_to_regularisation_samples_only():
    w = losses.prior_weight(torch.tensor([True, False, True]), 0.3)
    assert torch.allclose(w, torch.tensor([0.3, 1.0, 0.3]))
