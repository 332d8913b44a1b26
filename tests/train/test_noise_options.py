"""The noise, timestep and loss options (kohya's semantics), each against its formula written out
with the same generator in the documented order; with every option off the draws are unchanged."""

from __future__ import annotations

import pytest
import torch

from tunelab.config import LossSection, ObjectiveSection, RunConfig, parse_config
from tunelab.errors import TunelabError
from tunelab.models.arch import scheduler_config
from tunelab.train.losses import debiased_weight
from tunelab.train.objectives import Objective

LATENTS = torch.randn(3, 4, 16, 12, generator=torch.Generator().manual_seed(0))


def _objective(loss: dict | None = None, objective: dict | None = None, offset: float = 0.0) -> Objective:
    ob = ObjectiveSection(**(objective or {}))
    return Objective.from_config(ob, scheduler_config("toy"), offset, LossSection(**(loss or {})))


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_with_every_option_off_the_draws_are_the_ones_before():
    plain = Objective.from_config(ObjectiveSection(), scheduler_config("toy"), 0.05).sample(LATENTS, _gen())
    options_off = _objective(offset=0.05).sample(LATENTS, _gen())
    for a, b in zip(plain, options_off):
        assert torch.equal(a, b)


def test_timestep_range_and_random_offset_strength():
    t = _objective(objective={"min_timestep": 200, "max_timestep": 300}).draw_timesteps(4096, _gen())
    assert int(t.min()) >= 200 and int(t.max()) < 300 and len(t.unique()) == 100
    noise = _objective({"noise_offset_random_strength": True}, offset=0.1).draw_noise(LATENTS, _gen(5))
    g = _gen(5)
    base = torch.randn(LATENTS.shape, generator=g)
    u = float(torch.rand((1,), generator=g))
    expected = base + 0.1 * u * torch.randn((3, 4, 1, 1), generator=g)
    torch.testing.assert_close(noise, expected, rtol=0, atol=0)


def test_multires_noise_is_kohyas_pyramid():
    noise = _objective({"multires_noise_iterations": 3, "multires_noise_discount": 0.4}).draw_noise(LATENTS, _gen(2))
    g = _gen(2)
    n = torch.randn(LATENTS.shape, generator=g)
    out = n.clone()
    for i in range(3):
        r = 2.0 + 2.0 * float(torch.rand((1,), generator=g))
        h, w = max(1, int(16 / r ** i)), max(1, int(12 / r ** i))
        out += torch.nn.functional.interpolate(torch.randn((3, 4, h, w), generator=g), size=(16, 12), mode="bilinear") * 0.4 ** i
        if h == 1 or w == 1:
            break
    torch.testing.assert_close(noise, out / out.std(), rtol=0, atol=1e-6)
    assert abs(float(noise.std()) - 1.0) < 1e-5


def test_input_perturbation_noise_changes_the_input_not_the_target():
    obj = _objective({"ip_noise_gamma": 0.1})
    batch = obj.sample(LATENTS, _gen(3))
    g = _gen(3)
    noise = torch.randn(LATENTS.shape, generator=g)
    extra = torch.randn(LATENTS.shape, generator=g)
    t = torch.randint(0, 1000, (3,), generator=g)
    assert torch.equal(batch.timesteps, t)
    torch.testing.assert_close(batch.noisy, obj.make(LATENTS, noise + 0.1 * extra, t).noisy, rtol=0, atol=0)
    torch.testing.assert_close(batch.target, obj.make(LATENTS, noise, t).target, rtol=0, atol=0)  # the target: the noise


def test_debiased_estimation_weights():
    snr = torch.tensor([4.0, 0.25, float("inf")])
    torch.testing.assert_close(debiased_weight(snr, "epsilon"), torch.tensor([0.5, 2.0, 1000 ** -0.5]))
    torch.testing.assert_close(debiased_weight(snr, "v"), torch.tensor([0.2, 0.8, 1 / 1001]))


def test_block_lr_values_are_learning_rates_as_kohya_means_them():
    cfg = RunConfig.model_validate({"optim": {"lr_unet": 2e-6},
                                    "train": {"parts": {"block_lr_values": [1e-6] * 3 + [0.0] * 6 + [2e-6] * 14}}})
    assert cfg.train.parts.block_lrs == [0.5] * 3 + [0.0] * 6 + [1.0] * 14
    again = RunConfig.model_validate(cfg.model_dump(mode="json"))  # the resolved config.json reads back
    assert again.train.parts.block_lrs == cfg.train.parts.block_lrs
    with pytest.raises(TunelabError, match="disagree"):
        parse_config({"optim": {"lr_unet": 2e-6}, "train": {"parts": {"block_lr_values": [1e-6] * 23,
                                                                      "block_lrs": [1.0] * 23}}})
    with pytest.raises(TunelabError, match="min_timestep"):
        parse_config({"objective": {"min_timestep": 500, "max_timestep": 400}})
    with pytest.raises(TunelabError, match="debiased_estimation"):
        parse_config({"objective": {"prediction": "flow"}, "loss": {"debiased_estimation": True}})
