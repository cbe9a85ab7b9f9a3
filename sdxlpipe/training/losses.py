"""Noise and losses: each option of the train stage as a small function of tensors.

`batch_loss` composes them in this order: a latent sample from the stored
distribution -> noise (offset, multires) -> timesteps in the range -> noisy
input (input perturbation) -> the UNet's prediction -> prediction target
(epsilon or v) -> element-wise loss (L2 / L1 / Huber / smooth-L1 with its c
schedule) -> per-sample mean (masked: divided by the mask's area) -> per-sample
weights (min-SNR gamma, debiased estimation, v scaled like epsilon, prior-preservation) -> batch mean.

The formulas follow kohya sd-scripts (library/custom_train_functions.py,
train_util.py) so settings carry over; where sdxlpipe differs, the docstring
says so. Every random draw takes an explicit generator (docs/decisions.md 3).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at timesteps t."""
    a = alphas_cumprod[t].float()
    return a / (1 - a)


def sample_timesteps(batch: int, min_timestep: int, max_timestep: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform integer timesteps in [min_timestep, max_timestep)."""
    return torch.randint(min_timestep, max_timestep, (batch,), generator=gen)


def offset_noise(noise: torch.Tensor, latents: torch.Tensor, strength: float, gen: torch.Generator, *,
                 random_strength: bool = False, adaptive_scale: float = 0.0) -> torch.Tensor:
    """Noise offset: a per-(sample, channel) constant added to the noise.

    offset = strength (times U(0,1) per sample with `random_strength`), plus
    `adaptive_scale * |mean of the latent channel|`, clamped at 0. kohya draws
    the random strength once per batch; here it is drawn per sample.
    """
    b, c = noise.shape[:2]
    offset = torch.full((b, 1, 1, 1), float(strength))
    if random_strength:
        offset = offset * torch.rand((b, 1, 1, 1), generator=gen)
    if adaptive_scale:
        offset = (offset + adaptive_scale * latents.float().mean(dim=(2, 3), keepdim=True).abs().cpu()).clamp(min=0.0)
    return noise + (offset * torch.randn((b, c, 1, 1), generator=gen)).to(noise.device)


def multires_noise(noise: torch.Tensor, gen: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Pyramid noise: upsampled noise at shrinking resolutions, weighted discount**i, then unit std."""
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = float(torch.rand((), generator=gen)) * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        coarse = torch.randn((b, c, hn, wn), generator=gen).to(noise.device)
        out = out + F.interpolate(coarse, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def perturbed(noise: torch.Tensor, gamma: float, gen: torch.Generator) -> torch.Tensor:
    """Input perturbation: the noise added to the input gets gamma * N(0, 1) more; the target keeps `noise`."""
    return noise + gamma * torch.randn(noise.shape, generator=gen).to(noise.device)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise (what DDPMScheduler.add_noise computes)."""
    a = alphas_cumprod[t].float().view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
           prediction_type: str) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or v = sqrt(a) noise - sqrt(1 - a) x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = alphas_cumprod[t].float().view(-1, 1, 1, 1)
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise ValueError(f"prediction_type {prediction_type!r}: expected epsilon or v_prediction")


def huber_c(t: torch.Tensor, schedule: str, c: float, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Per-sample Huber c: constant; exponential exp(-t ln(1/c) / T); snr (1 - c) / (1 + sigma_t)^2 + c."""
    if schedule == "constant":
        return torch.full(t.shape, float(c))
    if schedule == "exponential":
        alpha = -math.log(c) / len(alphas_cumprod)
        return torch.exp(-alpha * t.float())
    if schedule == "snr":
        a = alphas_cumprod[t].float()
        sigma = ((1 - a) / a).sqrt()
        return (1 - c) / (1 + sigma) ** 2 + c
    raise ValueError(f"huber_schedule {schedule!r}: expected constant, exponential or snr")


def elementwise_loss(pred: torch.Tensor, tgt: torch.Tensor, loss_type: str, c: torch.Tensor | None = None) -> torch.Tensor:
    """l2 d^2; l1 |d|; huber 2c(sqrt(d^2 + c^2) - c); smooth_l1 2(sqrt(d^2 + c^2) - c); c per sample."""
    d = pred.float() - tgt.float()
    if loss_type == "l2":
        return d**2
    if loss_type == "l1":
        return d.abs()
    c = c.to(d.device).view(-1, *([1] * (d.ndim - 1)))
    if loss_type == "huber":
        return 2 * c * ((d**2 + c**2).sqrt() - c)
    if loss_type == "smooth_l1":
        return 2 * ((d**2 + c**2).sqrt() - c)
    raise ValueError(f"loss_type {loss_type!r}: expected l2, l1, huber or smooth_l1")


def per_sample_mean(loss: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over (C, H, W) per sample; with a mask (B, 1, H, W), sum(loss * mask) / (C * sum(mask)).

    Normalising by the mask's area keeps a small masked region from getting a
    small loss (kohya multiplies by the mask and takes the plain mean).
    """
    if mask is None:
        return loss.mean(dim=tuple(range(1, loss.ndim)))
    mask = mask.to(loss.device, loss.dtype)
    dims = tuple(range(1, loss.ndim))
    area = mask.expand_as(loss).sum(dim=dims)
    return (loss * mask).sum(dim=dims) / area.clamp(min=1e-6)


def min_snr_weight(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma: min(snr, gamma) / snr for epsilon, min(snr, gamma) / (snr + 1) for v."""
    clipped = torch.minimum(snr_t, torch.full_like(snr_t, gamma))
    return clipped / (snr_t + 1) if prediction_type == "v_prediction" else clipped / snr_t


def debiased_weight(snr_t: torch.Tensor, prediction_type: str = "epsilon") -> torch.Tensor:
    """Debiased estimation: 1 / sqrt(snr) for epsilon, 1 / (snr + 1) for v (kohya's apply_debiased_estimation),
    snr clamped at 1000 as kohya does. The v weight stays finite at zero terminal SNR (snr 0 at t = T-1)."""
    s = snr_t.clamp(max=1000)
    return 1 / (s + 1) if prediction_type == "v_prediction" else 1 / s.sqrt()


def v_pred_like_noise_pred_weight(snr_t: torch.Tensor) -> torch.Tensor:
    """snr / (snr + 1), snr clamped at 1000: a v-prediction loss weighted like an epsilon one
    (kohya's scale_v_prediction_loss_like_noise_prediction)."""
    s = snr_t.clamp(max=1000)
    return s / (s + 1)


def prior_weight(is_reg: torch.Tensor, weight: float) -> torch.Tensor:
    """Regularisation (prior-preservation) samples count `weight`, the others 1."""
    return torch.where(is_reg, torch.full(is_reg.shape, float(weight)), torch.ones(is_reg.shape))


def batch_loss(unet, b: dict, p, alphas_cumprod, prediction_type: str, gen: torch.Generator, device, fixed: bool):
    """One batch's loss, composed of the functions above in the order of this module's docstring.

    fixed: an evaluation batch (no input perturbation).
    """
    # The draw is the CPU generator's on every device; the sample is made where the latents are (a GPU's, fp32).
    eps = torch.randn(b["mean"].shape, generator=gen).to(b["mean"].device)
    x0 = (b["mean"] + b["std"] * eps - b["shift"]) * b["scale"]
    noise = torch.randn(x0.shape, generator=gen)
    if p.noise_offset or p.adaptive_noise_scale:
        noise = offset_noise(noise, x0, p.noise_offset, gen, random_strength=p.noise_offset_random_strength,
                             adaptive_scale=p.adaptive_noise_scale)
    if p.multires_noise_iterations:
        noise = multires_noise(noise, gen, p.multires_noise_iterations, p.multires_noise_discount)
    t = sample_timesteps(x0.shape[0], p.min_timestep, p.max_timestep, gen)
    input_noise = perturbed(noise, p.input_perturbation, gen) if p.input_perturbation and not fixed else noise
    x0, noise, input_noise, t = x0.to(device), noise.to(device), input_noise.to(device), t.to(device)
    noisy = add_noise(x0, input_noise, t, alphas_cumprod)
    pred = unet(noisy, t, b["embeds"].to(device), added_cond_kwargs={
        "text_embeds": b["pooled"].to(device), "time_ids": b["time_ids"].to(device)}).sample.float()
    tgt = target(x0, noise, t, alphas_cumprod, prediction_type)
    c = huber_c(t.cpu(), p.huber_schedule, p.huber_c, alphas_cumprod.cpu()) if p.loss_type in ("huber", "smooth_l1") else None
    per_sample = per_sample_mean(elementwise_loss(pred, tgt, p.loss_type, c), b["mask"])
    weight = torch.ones(x0.shape[0])
    snr_t = snr(alphas_cumprod, t).cpu()
    if p.min_snr_gamma:
        weight = weight * min_snr_weight(snr_t, p.min_snr_gamma, prediction_type)
    if p.debiased_estimation:
        weight = weight * debiased_weight(snr_t, prediction_type)
    if p.scale_v_pred_loss_like_noise_pred and prediction_type == "v_prediction":
        weight = weight * v_pred_like_noise_pred_weight(snr_t)
    if p.prior_loss_weight != 1.0:
        weight = weight * prior_weight(b["is_reg"], p.prior_loss_weight)
    return (per_sample * weight.to(per_sample.device)).mean()
