"""The denoising objective: noise a clean sample, predict epsilon or v, weight the error.

Formulas from DDPM (Ho et al. 2020: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, a_t the cumulative
alpha), v-prediction (Salimans & Ho 2022: v = sqrt(a_t) eps - sqrt(1 - a_t) x_0), min-SNR-gamma
weighting (Hang et al. 2023) and offset noise (Guttenberg 2023).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler


def draw_noise(latents: torch.Tensor, noise_offset: float) -> torch.Tensor:
    """Gaussian noise shaped like `latents`; with an offset, plus one constant per channel, so
    the model also learns to change an image's mean brightness."""
    noise = torch.randn_like(latents)
    if noise_offset > 0:
        offset = torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device)
        noise = noise + noise_offset * offset.to(noise.dtype)
    return noise


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio a_t / (1 - a_t) of each timestep, in fp32."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
    return alphas / (1.0 - alphas)


def denoising_loss(
    prediction: torch.Tensor,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """Mean squared error of the UNet's `prediction` against the scheduler's target, per example
    weighted by min(SNR, gamma) / SNR (epsilon) or min(SNR, gamma) / (SNR + 1) (v) when
    `snr_gamma` is set; one number, the mean over the batch."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"prediction_type {kind!r} is not trained here (epsilon, v_prediction)")
    per_example = F.mse_loss(prediction.float(), target.float(), reduction="none")
    per_example = per_example.mean(dim=tuple(range(1, per_example.ndim)))
    if snr_gamma is None:
        return per_example.mean()
    ratio = snr(scheduler, timesteps)
    clipped = torch.clamp(ratio, max=snr_gamma)
    # The v target already carries a factor (SNR + 1) / SNR relative to epsilon's error.
    weight = clipped / (ratio + 1.0) if kind == "v_prediction" else clipped / ratio
    return (per_example * weight).mean()
