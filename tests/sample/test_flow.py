"""Rectified-flow checkpoints sample with diffusers' flow-matching Euler, in the SDXL pipelines."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.models.prediction import PredictionRecord


def test_flow_checkpoints_sample_with_flow_euler(sample_components, toy_tokenizers):
    from tunelab.sample.flow import FlowEulerScheduler
    from tunelab.sample.pipeline import SampleSettings, build_pipeline, generate, make_scheduler

    extras, meta = {}, {}
    PredictionRecord("flow", flow_shift=3.0).stamp(extras, meta)
    model = build_pipeline(dataclasses.replace(sample_components, extras=extras, metadata=meta), toy_tokenizers)
    sched = make_scheduler("Euler", model.scheduler_config, model.prediction)
    assert isinstance(sched, FlowEulerScheduler) and sched.config.shift == 3.0
    sched.set_timesteps(4)
    assert sched.timesteps[0] > 990 and torch.all(sched.timesteps[1:] < sched.timesteps[:-1])  # 1000 s', falling
    with pytest.raises(TunelabError, match="rectified-flow"):
        make_scheduler("DPM++ 2M", model.scheduler_config, model.prediction)
    base = SampleSettings(prompt="red circle", seed=1, steps=3, cfg=4.0)
    plain = generate(model, base, output_type="latent").image
    hires = generate(model, dataclasses.replace(base, hires_scale=1.5, hires_denoise=0.5), output_type="latent").image
    assert torch.isfinite(plain).all() and torch.isfinite(hires).all() and hires.shape[-1] > plain.shape[-1]
