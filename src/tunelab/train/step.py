"""One SDXL training step's math: latents, conditioning, UNet prediction, per-sample loss.

Public, with explicit arguments, so the trainer, the probes, the demo and the benchmarks all run
the same forward. Nothing here knows about accelerate, optimizers or the run directory; the
modules may be DDP / compiled wrappers (calls go through them, configs are read from inside).

    latents   = batch_latents(batch, vae, device)                  # (B, 4, H/8, W/8), scaled
    cond      = conditioning(models, batch["prompt"], text)       # context (B, 77k, 2048), pooled
    noised    = objective.sample(latents, generator)               # or objective.make(fixed noise, t)
    pred      = predict(models.unet, noised, cond, micro_conditioning(batch, device))
    loss      = compute_loss(pred, noised.target, ...)             # (B,) per sample (StepLoss, with
                                                                   # the count of truncated prompts)

`training_loss` is that sequence with the run's generator (what the trainer backpropagates);
`denoise` / `denoise_loss` take the noise and timesteps from the caller (what probes measure).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import torch

from tunelab.config import LossSection
from tunelab.models.text import Conditioning, encode_prompts, time_ids
from tunelab.train.losses import compute_loss
from tunelab.train.objectives import NoisedBatch, Objective


@dataclass(frozen=True)
class StepModels:
    """The modules one step calls, and the tokenizers of the two text encoders."""

    unet: torch.nn.Module
    text_encoder_1: torch.nn.Module
    text_encoder_2: torch.nn.Module
    vae: torch.nn.Module
    tokenizers: tuple[Any, Any]

    @classmethod
    def of(cls, comps: Any, tokenizers: tuple[Any, Any],
           wrapped: Mapping[str, torch.nn.Module] | None = None) -> "StepModels":
        """The loaded components, with the wrapped (DDP / compiled) module where one trains."""
        wrapped = wrapped or {}
        return cls(*(wrapped.get(n, getattr(comps, n)) for n in ("unet", "text_encoder_1", "text_encoder_2")),
                   comps.vae, tokenizers)


@dataclass(frozen=True)
class TextSettings:
    """How prompts become conditioning (the run file's model.max_chunks / clip_skip)."""

    max_chunks: int = 1  # 75-token chunks a prompt may use
    clip_skip: int = 2  # hidden layer from the end (2 = SDXL's penultimate)
    trains: bool = False  # whether gradients flow into the text encoders


def batch_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of one batch's noise and timesteps, from (run seed, epoch, global batch position):
    a batch's random numbers depend on neither the number of processes nor a restart."""
    # Splitmix-style mixing: nearby (epoch, position) pairs get unrelated streams.
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + position * 0x94D049BB133111EB) % 2**64
    x ^= x >> 31
    return x % 2**63


def batch_latents(batch: Mapping[str, Any], vae: torch.nn.Module, device: torch.device | str) -> torch.Tensor:
    """(B, 4, H/8, W/8) float32 scaled latents: cached means, or the VAE's encoding of `pixels`."""
    scale = vae.config.scaling_factor
    if "latents" in batch:  # cached: unscaled distribution means
        return batch["latents"].float().to(device) * scale
    with torch.no_grad():
        pixels = batch["pixels"].to(device, dtype=next(vae.parameters()).dtype)
        return vae.encode(pixels).latent_dist.mean.float() * scale


def conditioning(models: StepModels, prompts: list[str], text: TextSettings) -> Conditioning:
    """SDXL's text conditioning of a batch of prompts (models/text.py has the layout)."""
    with torch.set_grad_enabled(text.trains and torch.is_grad_enabled()):
        return encode_prompts(models.tokenizers, (models.text_encoder_1, models.text_encoder_2), prompts,
                              text.max_chunks, text.clip_skip)


def micro_conditioning(batch: Mapping[str, Any], device: torch.device | str) -> torch.Tensor:
    """(B, 6) SDXL size and crop conditioning of a batch."""
    return time_ids(batch["original_size_hw"].tolist(), batch["crop_top_left"].tolist(),
                    batch["target_size_hw"].tolist()).to(device)


def predict(unet: torch.nn.Module, noised: NoisedBatch, cond: Conditioning, ids: torch.Tensor) -> torch.Tensor:
    """The UNet's prediction (B, 4, H/8, W/8) for a noised batch."""
    return unet(noised.noisy, noised.timesteps, encoder_hidden_states=cond.context,
                added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": ids}).sample


class StepLoss(NamedTuple):
    loss: torch.Tensor  # (B,) per sample (denoise_loss), or the scalar mean (training_loss)
    truncated: int  # prompts of the batch longer than text.max_chunks allows (cut)


class Denoised(NamedTuple):
    prediction: torch.Tensor  # (B, C, H, W) the UNet's output
    loss: torch.Tensor  # (B,) per sample
    truncated: int  # prompts cut by text.max_chunks


def denoise(models: StepModels, batch: Mapping[str, Any], noised: NoisedBatch, objective: Objective,
            loss: LossSection, text: TextSettings, device: torch.device | str) -> Denoised:
    """The prediction and (B,) per-sample loss of the batch at given noise and timesteps (probes)."""
    cond = conditioning(models, list(batch["prompt"]), text)
    pred = predict(models.unet, noised, cond, micro_conditioning(batch, device))
    per_sample = compute_loss(pred.float(), noised.target.float(), loss, objective.prediction, noised.timesteps,
                              noised.snr, objective.num_train_timesteps)
    return Denoised(pred, per_sample, sum(1 for n in cond.truncated if n))


def denoise_loss(models: StepModels, batch: Mapping[str, Any], noised: NoisedBatch, objective: Objective,
                 loss: LossSection, text: TextSettings, device: torch.device | str) -> StepLoss:
    """(B,) per-sample loss of the batch at the given noise and timesteps (`objective.make`)."""
    out = denoise(models, batch, noised, objective, loss, text, device)
    return StepLoss(out.loss, out.truncated)


def training_loss(models: StepModels, batch: Mapping[str, Any], objective: Objective, loss: LossSection,
                  text: TextSettings, generator: torch.Generator, device: torch.device | str) -> StepLoss:
    """The scalar loss one micro-batch backpropagates: noise and timesteps drawn from `generator`."""
    latents = batch_latents(batch, models.vae, device)
    noised = objective.sample(latents, generator)
    per_sample, truncated = denoise_loss(models, batch, noised, objective, loss, text, device)
    return StepLoss(per_sample.mean(), truncated)
