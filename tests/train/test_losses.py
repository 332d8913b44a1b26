"""Losses, huber schedules and min-SNR weights on hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.config import LossSection
from tunelab.train import losses as L

PRED = torch.tensor([[0.0, 3.0], [1.0, 1.0]]).view(2, 1, 1, 2)  # (B=2, C=1, H=1, W=2)
TARGET = torch.tensor([[0.0, -1.0], [1.0, 1.0 + 0.75]]).view(2, 1, 1, 2)  # d = (0, 4) and (0, -0.75)


def test_l2_per_sample():
    torch.testing.assert_close(L.per_sample(L.elementwise_loss(PRED, TARGET, "l2")), torch.tensor([8.0, 0.28125]))


def test_pseudo_huber_and_smooth_l1():
    c = torch.tensor([3.0, 1.0])
    # sample 0, d = 4, c = 3: sqrt(16 + 9) - 3 = 2 -> huber 2*3*2 = 12, smooth_l1 2*2 = 4; d = 0 -> 0
    # sample 1, d = 0.75, c = 1: sqrt(0.5625 + 1) - 1 = 0.25 -> huber 2*1*0.25 = 0.5 = smooth_l1
    torch.testing.assert_close(L.per_sample(L.elementwise_loss(PRED, TARGET, "huber", c)), torch.tensor([6.0, 0.25]))
    torch.testing.assert_close(L.per_sample(L.elementwise_loss(PRED, TARGET, "smooth_l1", c)), torch.tensor([2.0, 0.25]))
    with pytest.raises(ValueError, match="threshold"):
        L.elementwise_loss(PRED, TARGET, "huber")


def test_huber_behaves_like_l2_for_small_errors_and_l1_for_large():
    c = torch.tensor([1.0])
    small, large = torch.full((1, 1, 1, 1), 1e-3), torch.full((1, 1, 1, 1), 1e3)
    zero = torch.zeros(1, 1, 1, 1)
    assert L.elementwise_loss(small, zero, "huber", c).item() == pytest.approx(1e-6, rel=1e-3)
    assert L.elementwise_loss(large, zero, "huber", c).item() == pytest.approx(2 * 1e3 - 2, rel=1e-5)


def test_huber_schedules():
    ts = torch.tensor([0, 500, 1000])
    snr = torch.tensor([1.0, 4.0, 0.0])
    torch.testing.assert_close(L.huber_c_for("constant", 0.1, ts, snr), torch.full((3,), 0.1))
    # exponential: c = huber_c ** (t / T): 1 at t = 0, sqrt(0.1) at T/2, 0.1 at T
    torch.testing.assert_close(L.huber_c_for("exponential", 0.1, ts, snr, 1000), torch.tensor([1.0, 0.1**0.5, 0.1]))
    # snr: sigma = 1/sqrt(snr) = 1, 0.5, inf -> 0.9/4 + 0.1 = 0.325; 0.9/2.25 + 0.1 = 0.5; 0.1
    torch.testing.assert_close(L.huber_c_for("snr", 0.1, ts, snr), torch.tensor([0.325, 0.5, 0.1]))
    with pytest.raises(ValueError, match="schedule"):
        L.huber_c_for("cosine", 0.1, ts, snr)


def test_min_snr_weights():
    snr = torch.tensor([1.0, 5.0, 20.0, 0.0])
    # eps: min(s, 5) / s = 1, 1, 0.25, (0 -> 0 finite)
    torch.testing.assert_close(L.min_snr_weight(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.25, 0.0]))
    # v: min(s, 5) / (s + 1) = 0.5, 5/6, 5/21, 0
    torch.testing.assert_close(L.min_snr_weight(snr, 5.0, "v"), torch.tensor([0.5, 5 / 6, 5 / 21, 0.0]))
    with pytest.raises(ValueError, match="flow"):
        L.min_snr_weight(snr, 5.0, "flow")


def test_compute_loss_combines_schedule_and_weight():
    cfg = LossSection(type="huber", huber_schedule="snr", huber_c=0.1, min_snr_gamma=5.0)
    snr = torch.tensor([1.0, 20.0])
    loss = L.compute_loss(PRED, TARGET, cfg, "v", torch.tensor([10, 20]), snr)
    # sample 0: c = 0.325, d = 4: 2c (sqrt(16 + c^2) - c) / 2 elements, times min(1,5)/2
    c0 = 0.325
    l0 = 2 * c0 * (math.sqrt(16 + c0**2) - c0) / 2 * 0.5
    # sample 1: c = 0.9 / (1 + 1/sqrt(20))^2 + 0.1, d = 0.75, weight 5/21
    c1 = 0.9 / (1 + 20**-0.5) ** 2 + 0.1
    l1 = 2 * c1 * (math.sqrt(0.5625 + c1**2) - c1) / 2 * 5 / 21
    torch.testing.assert_close(loss, torch.tensor([l0, l1]))
    plain = L.compute_loss(PRED, TARGET, LossSection(), "epsilon", torch.tensor([1, 2]), snr)
    torch.testing.assert_close(plain, torch.tensor([8.0, 0.28125]))
