"""Objectives on hand-computed tensors: eps / v / flow targets, zero-terminal SNR, logit-normal
timesteps with shift, noise offset, and determinism from the explicit generator."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.config import ObjectiveSection
from tunelab.models.arch import load_arch
from tunelab.train.objectives import Objective, alphas_cumprod, shift_timesteps

SCHED = load_arch("sdxl").scheduler


def _objective(prediction: str, ac: torch.Tensor | None = None, **kw) -> Objective:
    ac = torch.tensor([0.64, 0.36, 0.0]) if ac is None else ac  # sqrt: 0.8/0.6, 0.6/0.8, 0/1
    return Objective(prediction, ac, **kw)


X0 = torch.tensor([1.0, -2.0]).view(2, 1, 1, 1).expand(2, 1, 1, 2).contiguous()  # (B=2, C=1, H=1, W=2)
N = torch.tensor([0.5, 3.0]).view(2, 1, 1, 1).expand(2, 1, 1, 2).contiguous()


def test_scaled_linear_schedule_matches_hand_computation():
    ac = alphas_cumprod(SCHED)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    torch.testing.assert_close(ac, torch.cumprod(1 - betas, 0))
    assert ac.shape == (1000,)


def test_zero_terminal_snr_rescale():
    base, zt = alphas_cumprod(SCHED), alphas_cumprod(SCHED, zero_terminal_snr=True)
    assert zt[-1] == 0.0
    torch.testing.assert_close(zt[0], base[0])
    assert torch.all(zt[1:] < zt[:-1])  # still strictly decreasing
    # Lin et al. Alg. 1: sqrt(a) shifted and scaled linearly
    s, s0, sT = base.sqrt(), base[0].sqrt(), base[-1].sqrt()
    torch.testing.assert_close(zt.sqrt(), (s - sT) * s0 / (s0 - sT), atol=1e-5, rtol=1e-4)
    ob = Objective.from_config(ObjectiveSection(prediction="v", zero_terminal_snr=True), SCHED)
    assert ob.snr(torch.tensor([999])).item() == 0.0


def test_epsilon_target_is_noise():
    out = _objective("epsilon").make(X0, N, torch.tensor([0, 1]))
    # x_t = sqrt(a) x0 + sqrt(1-a) n: sample 0: 0.8*1 + 0.6*0.5 = 1.1; sample 1: 0.6*-2 + 0.8*3 = 1.2
    torch.testing.assert_close(out.noisy[:, 0, 0, 0], torch.tensor([1.1, 1.2]))
    torch.testing.assert_close(out.target, N)
    torch.testing.assert_close(out.snr, torch.tensor([0.64 / 0.36, 0.36 / 0.64]))


def test_v_target():
    out = _objective("v").make(X0, N, torch.tensor([0, 1]))
    # v = alpha n - sigma x0: 0.8*0.5 - 0.6*1 = -0.2; 0.6*3 - 0.8*-2 = 3.4
    torch.testing.assert_close(out.target[:, 0, 0, 0], torch.tensor([-0.2, 3.4]))
    torch.testing.assert_close(out.noisy[:, 0, 0, 0], torch.tensor([1.1, 1.2]))
    # at zero SNR: x_t = n, v = -x0
    last = _objective("v").make(X0, N, torch.tensor([2, 2]))
    torch.testing.assert_close(last.noisy, N)
    torch.testing.assert_close(last.target, -X0)
    assert torch.all(last.snr == 0)


def test_flow_target_and_interpolation():
    ob = _objective("flow")
    out = ob.make(X0, N, torch.tensor([250.0, 750.0]))  # t = 0.25, 0.75
    # x_t = (1-t) x0 + t n: 0.75*1 + 0.25*0.5 = 0.875; 0.25*-2 + 0.75*3 = 1.75
    torch.testing.assert_close(out.noisy[:, 0, 0, 0], torch.tensor([0.875, 1.75]))
    torch.testing.assert_close(out.target, N - X0)
    torch.testing.assert_close(out.snr, torch.tensor([9.0, 1 / 9]))


def test_shift():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    # 3 * 0.5 / (1 + 2 * 0.5) = 0.75;  3 * 0.25 / (1 + 0.5) = 0.5
    torch.testing.assert_close(shift_timesteps(t, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(shift_timesteps(t, 1.0), t)


def test_logit_normal_timesteps_with_shift():
    ob = _objective("flow", flow_logit_mean=0.5, flow_logit_std=2.0, flow_shift=3.0)
    ts = ob.draw_timesteps(4, torch.Generator().manual_seed(3))
    u = torch.randn(4, generator=torch.Generator().manual_seed(3)) * 2.0 + 0.5
    t = torch.sigmoid(u)
    torch.testing.assert_close(ts, 1000 * 3 * t / (1 + 2 * t))
    assert ts.dtype == torch.float32
    many = _objective("flow", flow_shift=1.0).draw_timesteps(20000, torch.Generator().manual_seed(0))
    assert abs(many.median().item() - 500) < 15  # logit-normal(0, 1): median t = 0.5
    shifted = _objective("flow", flow_shift=3.0).draw_timesteps(20000, torch.Generator().manual_seed(0))
    assert abs(shifted.median().item() - 750) < 15  # shift(0.5) = 0.75


def test_eps_timesteps_are_uniform_indices():
    ob = Objective.from_config(ObjectiveSection(), SCHED)
    ts = ob.draw_timesteps(5000, torch.Generator().manual_seed(0))
    assert ts.dtype == torch.long and ts.min() >= 0 and ts.max() <= 999 and ts.max() > 990


def test_noise_offset_is_per_image_and_channel():
    g = torch.Generator().manual_seed(1)
    lat = torch.zeros(2, 4, 3, 3)
    noise = _objective("epsilon", noise_offset=0.1).draw_noise(lat, g)
    g2 = torch.Generator().manual_seed(1)
    expected = torch.randn(2, 4, 3, 3, generator=g2) + 0.1 * torch.randn(2, 4, 1, 1, generator=g2)
    torch.testing.assert_close(noise, expected)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "flow"])
def test_sample_is_deterministic_and_ordered(prediction):
    ob = Objective.from_config(ObjectiveSection(prediction=prediction), SCHED, noise_offset=0.05)
    lat = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    a = ob.sample(lat, torch.Generator().manual_seed(5))
    b = ob.sample(lat, torch.Generator().manual_seed(5))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert a.noisy.dtype == torch.bfloat16 and a.target.dtype == torch.float32 and a.snr.shape == (3,)
    # documented draw order: noise, offset noise, timesteps
    g = torch.Generator().manual_seed(5)
    noise = ob.draw_noise(lat, g)
    ts = ob.draw_timesteps(3, g)
    torch.testing.assert_close(ob.make(lat, noise, ts).target, a.target)
    assert torch.equal(ts, a.timesteps)


def test_unknown_prediction():
    with pytest.raises(ValueError, match="prediction"):
        Objective("x0", torch.ones(3))
    assert math.isfinite(_objective("epsilon").snr(torch.tensor([0])).item())
