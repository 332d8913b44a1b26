"""Losses: l2 / huber / smooth-l1 per element, reduced per sample; huber schedules; min-SNR weights.

Hand-written: torch's `huber_loss` / `smooth_l1_loss` are the piecewise (quadratic-then-linear)
losses, while the field's trainers (kohya sd-scripts `--loss_type huber|smooth_l1`) use the smooth
pseudo-Huber loss with a per-sample, timestep-dependent threshold c, from Khrapov et al. 2024,
"Improving Diffusion Models's Data-Corruption Resistance using Scheduled Pseudo-Huber Loss"
(arXiv:2403.16728). The formulas below are those published definitions, written here from scratch.

Per element, with d = prediction - target:

    l2         d^2
    huber      2 c (sqrt(d^2 + c^2) - c)      (pseudo-Huber; ~ d^2 near 0, ~ 2 c |d| far out)
    smooth_l1  2 (sqrt(d^2 + c^2) - c)        (pseudo-Huber divided by c; ~ d^2 / c near 0)

Huber schedules (c per sample; `huber_c` is the setting, T = num_train_timesteps, t = timestep):

    constant     c = huber_c
    exponential  c = exp(-alpha t), alpha = -ln(huber_c) / T   (1 at t = 0, huber_c at t = T:
                 robust where the noise dominates, L2-like near the clean image)
    snr          sigma = sqrt(1 / snr);  c = (1 - huber_c) / (1 + sigma)^2 + huber_c
                 (for eps / v, sigma = sqrt((1 - a_t) / a_t), as in the paper; c -> 1 at high SNR,
                 -> huber_c at zero SNR)

Min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
Strategy"): the loss of a sample at SNR s is multiplied by min(s, gamma) / s for epsilon
prediction and min(s, gamma) / (s + 1) for v-prediction (the v loss already carries a factor s + 1
relative to the x0 loss).
"""

from __future__ import annotations

import logging
import math

import torch

from tunelab.config import LossSection

log = logging.getLogger(__name__)


def huber_c_for(schedule: str, huber_c: float, timesteps: torch.Tensor, snr: torch.Tensor,
                num_train_timesteps: int = 1000) -> torch.Tensor:
    """(B,) float32 per-sample huber threshold c for a schedule (see module docstring)."""
    if schedule == "constant":
        return torch.full(timesteps.shape, huber_c, dtype=torch.float32, device=timesteps.device)
    if schedule == "exponential":
        alpha = -math.log(huber_c) / num_train_timesteps
        return torch.exp(-alpha * timesteps.float())
    if schedule == "snr":
        # sigma = inf at zero SNR (c = huber_c), 0 at infinite SNR (c = 1)
        sigma = torch.rsqrt(snr.float())
        return (1 - huber_c) / (1 + sigma) ** 2 + huber_c
    raise ValueError(f"unknown huber schedule {schedule!r}; choose constant, exponential or snr")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, c: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, H, W) float32 loss per element; `c` (B,) is needed for huber / smooth_l1."""
    d2 = (pred.float() - target.float()) ** 2
    if kind == "l2":
        return d2
    if c is None:
        raise ValueError(f"loss {kind!r} needs a huber threshold c")
    c = c.float().view(-1, *([1] * (d2.dim() - 1)))  # (B, 1, 1, 1)
    # sqrt(d^2 + c^2) - c, written as d^2 / (sqrt(d^2 + c^2) + c): the same value without the
    # cancellation that loses float32 precision when |d| << c (well-trained samples)
    excess = d2 / (torch.sqrt(d2 + c**2) + c)
    if kind == "huber":
        return 2 * c * excess
    if kind == "smooth_l1":
        return 2 * excess
    raise ValueError(f"unknown loss {kind!r}; choose l2, huber or smooth_l1")


def per_sample(loss: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,) mean over every non-batch dimension."""
    return loss.flatten(1).mean(dim=1)


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """(B,) min-SNR-gamma weights: min(s, g) / s (epsilon) or min(s, g) / (s + 1) (v)."""
    snr = snr.float()
    clipped = torch.clamp(snr, max=gamma)
    if prediction == "epsilon":
        # snr 0 only happens under zero-terminal SNR, which epsilon does not allow; keep it finite anyway
        return clipped / snr.clamp(min=torch.finfo(torch.float32).tiny)
    if prediction == "v":
        return clipped / (snr + 1)
    raise ValueError(f"min-SNR weighting applies to 'epsilon' and 'v', not {prediction!r}")


def compute_loss(pred: torch.Tensor, target: torch.Tensor, cfg: LossSection, prediction: str,
                 timesteps: torch.Tensor, snr: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """(B,) per-sample loss of one micro-batch under the run file's [loss] section.

    The trainer averages it (`.mean()`) for backward; per-sample values are what probes record.
    """
    c = None
    if cfg.type != "l2":
        c = huber_c_for(cfg.huber_schedule, cfg.huber_c, timesteps.to(pred.device), snr.to(pred.device),
                        num_train_timesteps)
    loss = per_sample(elementwise_loss(pred, target, cfg.type, c))
    if cfg.min_snr_gamma > 0:
        loss = loss * min_snr_weight(snr.to(loss.device), cfg.min_snr_gamma, prediction)
    if cfg.debiased_estimation:
        loss = loss * debiased_weight(snr.to(loss.device), prediction)
    return loss


def debiased_weight(snr: torch.Tensor, prediction: str) -> torch.Tensor:
    """(B,) kohya's debiased estimation (custom_train_functions.apply_debiased_estimation): SNR
    capped at 1000, weight 1/sqrt(SNR) for epsilon, 1/(SNR + 1) for v."""
    capped = torch.clamp(snr.float(), max=1000.0)
    if prediction == "v":
        return 1.0 / (capped + 1.0)
    if prediction == "epsilon":
        return 1.0 / torch.sqrt(capped)
    raise ValueError(f"debiased estimation applies to 'epsilon' and 'v', not {prediction!r}")
