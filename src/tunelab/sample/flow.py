"""Sampling rectified-flow checkpoints with the SDXL pipelines.

diffusers' `FlowMatchEulerDiscreteScheduler` steps x_t = (1 - s) x0 + s n along the predicted
velocity (n - x0), with timesteps s * 1000 (what tunelab's flow objective feeds the UNet) and the
timestep shift s' = shift s / (1 + (shift - 1) s) the checkpoint was trained with. The SDXL
pipelines call two members every scheduler of theirs has and this one lacks; they are added here.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler


class FlowEulerScheduler(FlowMatchEulerDiscreteScheduler):
    """Flow-matching Euler that the SDXL text-to-image and image-to-image pipelines can drive."""

    init_noise_sigma = 1.0  # x_T is the noise itself

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample  # flow feeds x_t unscaled

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scale_noise(original, timesteps, noise)  # img2img (hires fix) start point
