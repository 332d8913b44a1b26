"""The probe's fixed inputs: timestep quantiles and bands, noise, and the sets' file format."""

from __future__ import annotations

import pytest
import torch

from tunelab.config import ObjectiveSection
from tunelab.probe.sets import ProbeSet, load_sets, probe_noise, probe_timesteps, save_sets
from tunelab.train.objectives import Objective

SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def objective(**kw) -> Objective:
    return Objective.from_config(ObjectiveSection(**kw), SCHEDULER)


def test_epsilon_timesteps_are_stratified_quantiles_of_uniform_indices():
    t = probe_timesteps(objective(), 8)
    # (k + 0.5) / 8 of randint(0, 1000): floor(q * 1000)
    assert t.values.tolist() == [62, 187, 312, 437, 562, 687, 812, 937]
    assert t.quantiles == pytest.approx([0.0625, 0.1875, 0.3125, 0.4375, 0.5625, 0.6875, 0.8125, 0.9375])
    assert t.bands == ("low", "low", "low", "mid", "mid", "high", "high", "high")
    assert t.values.dtype == torch.long


def test_one_timestep_is_the_median():
    t = probe_timesteps(objective(prediction="v"), 1)
    assert t.values.tolist() == [500] and t.bands == ("mid",)


def test_flow_timesteps_follow_the_logit_normal_and_shift():
    plain = probe_timesteps(objective(prediction="flow", flow_shift=1.0), 3)
    # logit-normal(0, 1): the median is t = 0.5, the outer quantiles are symmetric about it
    assert plain.values[1].item() == pytest.approx(500.0, abs=1e-3)
    assert (plain.values[0] + plain.values[2]).item() == pytest.approx(1000.0, abs=1e-3)
    shifted = probe_timesteps(objective(prediction="flow", flow_shift=3.0), 3)
    assert (shifted.values > plain.values).all()  # a shift > 1 moves every timestep towards noise
    assert shifted.values.is_floating_point()


def test_noise_is_fixed_per_set_sample_and_timestep():
    a = probe_noise(0, 1, 2, 3, (4, 8, 8))
    assert torch.equal(a, probe_noise(0, 1, 2, 3, (4, 8, 8)))
    for other in (probe_noise(1, 1, 2, 3, (4, 8, 8)), probe_noise(0, 0, 2, 3, (4, 8, 8)),
                  probe_noise(0, 1, 3, 3, (4, 8, 8)), probe_noise(0, 1, 2, 4, (4, 8, 8))):
        assert not torch.equal(a, other)
    assert a.dtype == torch.float32 and abs(a.std().item() - 1) < 0.2


def test_sets_round_trip_and_refuse_other_settings(tmp_path):
    s = ProbeSet("preserve", [torch.randn(4, 8, 6), torch.randn(4, 6, 8)], ["car, wrc", ""], [(64, 48), (48, 64)],
                 [(0, 0), (2, 0)], [(64, 48), (48, 64)], ["car, wrc#0", "#0"])
    path = save_sets([s], tmp_path / "sets.safetensors", "abc")
    (back,) = load_sets(path, "abc")
    assert back.prompts == s.prompts and back.keys == s.keys
    assert back.original_size_hw == s.original_size_hw and back.crop_top_left == s.crop_top_left
    assert all(torch.equal(a, b) for a, b in zip(back.latents, s.latents))
    assert load_sets(path, "other") is None
    assert load_sets(tmp_path / "missing.safetensors") is None
