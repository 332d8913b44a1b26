"""Rectified-flow checkpoints sample with the flow-matching Euler (ComfyUI's ModelSamplingDiscreteFlow
with its "normal" schedule, which is diffusers' FlowMatchEulerDiscreteScheduler); the step-by-step
match against diffusers' scheduler is in test_samplers.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.models.prediction import PredictionRecord


def test_flow_checkpoints_sample_with_flow_euler(sample_components, toy_tokenizers):
    from tunelab.sample.pipeline import SampleSettings, build_pipeline, generate

    extras, meta = {}, {}
    PredictionRecord("flow", flow_shift=3.0).stamp(extras, meta)
    model = build_pipeline(dataclasses.replace(sample_components, extras=extras, metadata=meta), toy_tokenizers)
    ns = model.noise
    assert ns.prediction == "flow" and ns.flow_shift == 3.0
    sigmas = ns.uniform(4)
    assert sigmas[0].item() == 1.0 and ns.timestep(sigmas[:1]).item() == 1000.0  # the UNet sees shifted sigma x 1000
    assert torch.all(sigmas[1:] < sigmas[:-1]) and sigmas[-1].item() == 0.0
    base = SampleSettings(prompt="red circle", seed=1, steps=3, cfg=4.0)
    with pytest.raises(TunelabError, match="rectified-flow"):
        generate(model, dataclasses.replace(base, sampler="DPM++ 2M"))
    with pytest.raises(TunelabError, match="not available for rectified-flow"):
        generate(model, dataclasses.replace(base, schedule_type="Karras"))
    plain = generate(model, base, output_type="latent").image
    hires = generate(model, dataclasses.replace(base, hires_scale=1.5, hires_denoise=0.5), output_type="latent").image
    assert torch.isfinite(plain).all() and torch.isfinite(hires).all() and hires.shape[-1] > plain.shape[-1]
