"""bf16 weights that keep their updates: stochastic rounding, Kahan compensation, and the
low-precision AdamW / Lion against torch's AdamW and tunelab's Lion (hand-checkable tensors)."""

from __future__ import annotations

import pytest
import torch

from tunelab.train.lowprec import (LowPrecisionAdamW, LowPrecisionLion, fraction_vanishing, join_fp32, master_weights,
                                   split_fp32, stochastic_round_bf16)
from tunelab.train.optim import Lion


def test_stochastic_rounding_lands_on_the_two_neighbours_with_the_right_odds():
    # 1 + 2^-10 lies a quarter of the way from 1 to the next bf16 (1 + 2^-7... spacing at 1 is 2^-7)
    x = torch.full((200_000,), 1.0 + 2.0**-9)  # a quarter of the bf16 spacing 2^-7 above 1
    gen = torch.Generator().manual_seed(0)
    out = stochastic_round_bf16(x, gen).float()
    assert set(out.unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    p_up = float((out > 1).double().mean())
    assert abs(p_up - 0.25) < 4 * (0.25 * 0.75 / x.numel()) ** 0.5  # within 4 standard errors
    assert abs(float(out.double().mean()) - (1 + 2.0**-9)) < 4 * 2.0**-7 * (0.25 * 0.75 / x.numel()) ** 0.5


def test_stochastic_rounding_is_exact_on_bf16_values_and_keeps_signs_and_specials():
    x = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.140625, float("inf"), float("-inf")])
    assert torch.equal(stochastic_round_bf16(x).float(), x)
    neg = stochastic_round_bf16(torch.full((1000,), -(1.0 + 2.0**-9)), torch.Generator().manual_seed(1)).float()
    assert set(neg.unique().tolist()) == {-1.0, -(1.0 + 2.0**-7)}
    assert torch.isnan(stochastic_round_bf16(torch.tensor([float("nan")]))).all()


def _grads(p, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen) for _ in range(n)]


def test_fp32_weights_take_torchs_adamw_steps():
    w0 = torch.randn(64, generator=torch.Generator().manual_seed(3))
    a, b = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    ours = LowPrecisionAdamW([a], lr=1e-2, weight_decay=0.1, update="stochastic")
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1, foreach=False)
    for g in _grads(a, 5):
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_fp32_weights_take_lions_steps():
    """Lion by hand (Chen et al. 2023, Algorithm 2) against the optimizer on fp32 weights."""
    w0 = torch.randn(64, generator=torch.Generator().manual_seed(4))
    a, b = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    ours, m = LowPrecisionLion([a], lr=1e-3, weight_decay=0.1), torch.zeros(64)
    plain = Lion([b], lr=1e-3, weight_decay=0.1)
    ref = w0.clone()
    for g in _grads(a, 5):
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        plain.step()
        ref = ref * (1 - 1e-3 * 0.1) - 1e-3 * torch.sign(0.9 * m + 0.1 * g)
        m = 0.99 * m + 0.01 * g
    torch.testing.assert_close(a.detach(), ref, rtol=0, atol=1e-7)
    torch.testing.assert_close(b.detach(), ref, rtol=0, atol=1e-7)


@pytest.mark.parametrize("update", ["stochastic", "kahan"])
def test_bf16_weights_follow_fp32_where_nearest_stands_still(update):
    """300 steps of a constant gradient at lr 1.5e-6 on weights of 0.02 (an SDXL weight's size): each
    step is far below half a bf16 step there (6.1e-5). fp32 moves 4.5e-4 in all; nearest not at all."""
    w0 = torch.full((4096,), 0.02)
    runs = {}
    for name, dtype, mode in (("fp32", torch.float32, "nearest"), ("nearest", torch.bfloat16, "nearest"),
                              (update, torch.bfloat16, update)):
        p = w0.clone().to(dtype).requires_grad_()
        start = p.detach().float().clone()  # 0.02 itself is not a bf16 value
        opt = LowPrecisionAdamW([p], lr=1.5e-6, weight_decay=0.0, update=mode, seed=5)
        for _ in range(300):
            p.grad = torch.ones_like(p)
            opt.step()
        held = p.detach().float()
        if mode == "kahan":  # the weight moves once the kept error reaches half a step; weight + error is the sum
            held = held + opt.state[p]["compensation"].float()
        runs[name] = (start - held).double()
    fp32 = float(runs["fp32"].mean())
    assert fp32 == pytest.approx(300 * 1.5e-6, rel=1e-3)
    assert float(runs["nearest"].abs().max()) == 0.0  # every update vanished
    # the remedy keeps the progress (stochastic: within ~4 standard errors of the 4096-element mean)
    assert float(runs[update].mean()) == pytest.approx(fp32, rel=0.03)


def test_kahan_recovers_the_fp32_sum_bit_for_bit_in_expectation_free_form():
    """Kahan is deterministic: weight + compensation track the fp32 trajectory to bf16 precision of
    the compensation, whatever the step size."""
    p = torch.full((8,), 1.0, dtype=torch.bfloat16, requires_grad=True)
    ref = torch.full((8,), 1.0, requires_grad=True)
    opt = LowPrecisionAdamW([p], lr=1e-5, weight_decay=0.0, update="kahan")
    ref_opt = LowPrecisionAdamW([ref], lr=1e-5, weight_decay=0.0, update="nearest")
    for g in _grads(ref, 200, seed=2):
        p.grad, ref.grad = g.to(torch.bfloat16), g.clone()
        opt.step()
        ref_opt.step()
    total = p.detach().float() + opt.state[p]["compensation"].float()
    assert (total - ref.detach()).abs().max() < 2e-5  # vs an accumulated move of ~2e-3


def test_resumed_stochastic_rounding_draws_the_same_bits():
    def run(split: bool):
        p = torch.full((512,), 0.7, dtype=torch.bfloat16, requires_grad=True)
        opt = LowPrecisionAdamW([p], lr=1e-4, update="stochastic", seed=9)
        for i, g in enumerate(_grads(p, 6, seed=1)):
            if split and i == 3:  # save, rebuild, load: what a resume does
                state = opt.state_dict()
                opt = LowPrecisionAdamW([p], lr=1e-4, update="stochastic", seed=9)
                opt.load_state_dict(state)
            p.grad = g.to(torch.bfloat16)
            opt.step()
        return p.detach().clone()

    assert torch.equal(run(False), run(True))
    p = torch.ones(4, dtype=torch.bfloat16, requires_grad=True)
    opt = LowPrecisionAdamW([p], lr=1e-3)
    p.grad = torch.ones_like(p)
    opt.step()
    again = LowPrecisionAdamW([p], lr=1e-3)
    again.load_state_dict(opt.state_dict())
    assert again.state[p]["exp_avg_sq"].dtype == torch.float32  # not cast to the weights' bf16


def test_fraction_vanishing_counts_weights_above_the_threshold():
    # half a bf16 step exceeds lr = 1.5e-6 once |w| >= 2^-9 * 2 ... : |w| = 1 -> 2^-8 > lr (lost); |w| = 1e-4 -> kept
    w = torch.tensor([1.0, -0.5, 1e-4, 0.0])
    assert fraction_vanishing([w], 1.5e-6) == pytest.approx(0.5)
    assert fraction_vanishing([w], 1.0) == 0.0


def test_split_fp32_is_bf16_plus_the_other_16_bits_exactly():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200_000, generator=g) * torch.logspace(-30, 30, 200_000)
    w = torch.cat([w, torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), -float("inf"), 3.4e38, -3.4e38, 1e-40, -1e-40])])
    high, low = split_fp32(w)
    assert high.dtype == torch.bfloat16 and low.dtype == torch.int16
    assert torch.equal(join_fp32(high, low).view(torch.int32), w.view(torch.int32))  # bit for bit, signs and specials
    # the bf16 half is the nearest bf16 (ties away from zero where torch's cast goes to even)
    differ = high != w.to(torch.bfloat16)
    finite = torch.isfinite(w) & (w.abs() < 3e38) & (w.abs() > 1e-37)  # normal numbers: relative error bound
    assert int(differ[finite].sum()) <= 3
    assert (high.float() - w)[finite].abs().le(w[finite].abs() * 2.0**-8).all()


def test_exact_bf16_weights_take_the_fp32_steps_bit_for_bit():
    """The whole weight (bf16 half + low bits) is the fp32 AdamW trajectory from the same start and
    gradients, step for step; the bf16 half is its nearest bf16; a resume keeps the low bits."""
    start = torch.randn(4096, generator=torch.Generator().manual_seed(4)).mul(0.05).to(torch.bfloat16)
    p = start.clone().requires_grad_()
    ref = start.float().clone().requires_grad_()
    opt = LowPrecisionAdamW([p], lr=1.5e-6, weight_decay=1e-2, update="exact")
    ref_opt = LowPrecisionAdamW([ref], lr=1.5e-6, weight_decay=1e-2, update="nearest")
    for i, g in enumerate(_grads(ref, 200, seed=3)):
        if i == 100:  # save, rebuild, load: what a resume does
            state = opt.state_dict()
            opt = LowPrecisionAdamW([p], lr=1.5e-6, weight_decay=1e-2, update="exact")
            opt.load_state_dict(state)
            assert opt.state[p]["low_bits"].dtype == torch.int16
        p.grad, ref.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).float()  # the same gradient values
        opt.step()
        ref_opt.step()
    whole = opt.master_weight(p)
    assert torch.equal(whole, ref.detach())
    assert (whole != start.float()).float().mean() > 0.99  # every weight moved, as in fp32
    assert (p.detach() != start).float().mean() < 0.2  # while few bf16 halves did
    with master_weights(opt):
        assert p.dtype == torch.float32 and torch.equal(p.detach(), ref.detach())
    assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), split_fp32(ref.detach())[0])
