"""Guidance math on hand-worked numbers: CFG/PAG/SEG combination, the CFG++ scale conventions, SEG
blur, the PAG/SEG attention processor, FreeU, hires-fix sizes. (The CFG++ samplers' steps are in
test_samplers.py.)"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.sample import guidance as G


def test_combine_hand_worked():
    t = lambda v: torch.tensor([v])  # noqa: E731
    out = {"uncond": t(0.0), "cond": t(1.0), "pag": t(0.5), "seg": t(0.75)}
    g = G.Guidance(cfg=2.0, pag_scale=3.0, seg_scale=4.0)
    # 0 + 2 (1 - 0) + 3 (1 - 0.5) + 4 (1 - 0.75) = 2 + 1.5 + 1
    assert G.combine(out, g).item() == pytest.approx(4.5)
    assert G.Guidance(cfg=6.0, cfg_pp=True, cfg_divisor=12.5).scale == pytest.approx(0.48)  # A1111's DDIM CFG++
    assert G.Guidance(cfg=0.8, cfg_pp=True).scale == 0.8  # ComfyUI's Euler CFG++: the scale is lambda
    assert G.Guidance(cfg=1.0).branches() == ["cond"]
    assert G.Guidance(cfg=1.0, cfg_pp=True, pag_scale=1, seg_scale=1).branches() == ["uncond", "cond", "pag", "seg"]


def test_guidance_rescale_is_diffusers():
    c = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    out = G.combine({"uncond": torch.zeros_like(c), "cond": c}, G.Guidance(cfg=3.0, rescale=1.0))
    assert torch.allclose(out, c)  # phi 1: guided rescaled to the conditional std (3c -> c)


def test_blur_matrix_hand_worked():
    # the reference's kernel size: ceil(6 sigma) made odd, capped at the largest odd <= width + 1
    assert [G.seg_kernel_size(s, 128) for s in (0.1, 0.5, 1.0, 11.0)] == [1, 3, 7, 67]
    assert G.seg_kernel_size(11.0, 64) == 65 and G.seg_kernel_size(11.0, 32) == 33 and G.seg_kernel_size(11.0, 33) == 33 and G.seg_kernel_size(11.0, 2) == 3
    w1 = math.exp(-0.5)  # tap at distance 1 (the centre tap weighs 1)
    # n = 2, sigma 1: 7 taps capped to 3; reflection without the edge (1 | 0 1 | 0): 0 sees 1 twice
    assert G.blur_matrix(2, 1.0)[0].tolist() == pytest.approx([1 / (1 + 2 * w1), 2 * w1 / (1 + 2 * w1)], rel=1e-6)
    # n = 4, sigma 0.5: 3 taps; interior rows are the plain kernel, edge rows fold their outer tap
    m, s = G.blur_matrix(4, 0.5), 1 + 2 * math.exp(-2)
    assert m[1].tolist() == pytest.approx([math.exp(-2) / s, 1 / s, math.exp(-2) / s, 0.0], rel=1e-6)
    assert m[0].tolist() == pytest.approx([1 / s, 2 * math.exp(-2) / s, 0.0, 0.0], rel=1e-6)
    for sigma in (float("inf"), 9999999.0, -1.0):  # infinite blur: the mean
        assert torch.allclose(G.blur_matrix(5, sigma), torch.full((5, 5), 0.2))
    assert torch.equal(G.blur_matrix(3, 0.0), torch.eye(3))
    assert not torch.allclose(G.blur_matrix(4, 50.0), torch.full((4, 4), 0.25), atol=1e-2)  # a capped box, not the mean
    with pytest.raises(TunelabError, match="seg_sigma"):
        G.blur_matrix(4, float("nan"))


def _seg_reference(q: torch.Tensor, h: int, w: int, sigma: float) -> torch.Tensor:
    """The SEG reference blur, re-derived: SusungHong/SEG-SDXL pipeline_seg.py, `gaussian_blur_2d`
    and `SEGCFGSelfAttnProcessor.__call__` (sigma > inf_blur_threshold 9999 = the mean query),
    as pamparamm/sd-perturbed-attention guidance_utils.py `gaussian_blur_2d` and
    `seg_attention_wrapper` apply it to an H x W grid (sigma < 0 = the mean query)."""
    b, n, c = q.shape
    img = q.permute(0, 2, 1).reshape(b, c, h, w)  # (B, C, H, W)
    if sigma > 9999 or sigma < 0:
        return img.mean(dim=(-2, -1), keepdim=True).expand_as(img).reshape(b, c, n).permute(0, 2, 1)
    size = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    size = min(size, w - (w % 2 - 1))  # capped by img.shape[-1]
    x = torch.linspace(-(size - 1) * 0.5, (size - 1) * 0.5, steps=size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    kernel = pdf / pdf.sum()
    kernel2d = torch.mm(kernel[:, None], kernel[None, :]).expand(c, 1, size, size)
    img = torch.nn.functional.pad(img, [size // 2] * 4, mode="reflect")
    return torch.nn.functional.conv2d(img, kernel2d, groups=c).reshape(b, c, n).permute(0, 2, 1)


@pytest.mark.parametrize("h, w, sigma", [
    (32, 32, 11.0),  # SDXL's mid block at 1024 px with the field's sigma: the kernel is capped to 33 taps
    (26, 38, 11.0),  # the mid block at 832 x 1216
    (64, 64, 1.0), (5, 5, 0.7), (7, 7, 3.0), (3, 5, 2.0), (2, 2, 11.0), (2, 2, 1.0),
    (32, 32, 9999.0),  # the largest finite sigma: a capped, near-flat kernel
    (32, 32, 9999999.0), (32, 32, float("inf")), (32, 32, -1.0),  # infinite blur: the mean query
])
def test_smooth_query_matches_seg_reference(h, w, sigma):
    q = torch.randn(2, h * w, 8, generator=torch.Generator().manual_seed(h * w))
    ref = _seg_reference(q, h, w, sigma)
    assert (G.smooth_query(q, h, w, sigma) - ref).abs().max().item() <= 1e-6


def test_smooth_query_folds_where_reference_padding_cannot():
    # a 2 x 8 map: 9 taps need a pad of 4 rows on a 2-row side, which torch's reflect refuses;
    # tunelab reflects again, as numpy's "reflect" padding does
    h, w, sigma = 2, 8, 3.0
    q = torch.randn(1, h * w, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with pytest.raises(RuntimeError):
        _seg_reference(q.float(), h, w, sigma)
    size, img = 9, q[0].reshape(h, w, 4).numpy()
    x = np.arange(size) - size // 2
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(img, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    expected = sum(kernel[a] * kernel[b] * padded[a:a + h, b:b + w] for a in range(size) for b in range(size))
    out = G.smooth_query(q.float(), h, w, sigma)[0].reshape(h, w, 4).double().numpy()
    assert np.abs(out - expected).max() <= 1e-6


def test_smooth_query_huge_sigma_is_fast():
    # the reference's "infinite" 9999999 used to loop over 3 sigma = 3e7 taps per row
    G.blur_matrix.cache_clear()
    q = torch.randn(1, 64 * 64, 4, generator=torch.Generator().manual_seed(6))
    start = time.perf_counter()
    for sigma in (9999999.0, 9999.0):
        G.smooth_query(q, 64, 64, sigma)
    assert time.perf_counter() - start < 5.0
    assert torch.allclose(G.smooth_query(q, 64, 64, 9999999.0), q.mean(dim=1, keepdim=True).expand_as(q), atol=1e-6)


def test_smooth_query_is_separable_blur():
    q = torch.arange(12.0).reshape(1, 6, 2)  # (B, H*W, C) on a 2 x 3 grid
    out = G.smooth_query(q, 2, 3, float("inf"))
    assert torch.allclose(out, q.mean(dim=1, keepdim=True).expand_as(q))  # infinite blur = mean query
    assert torch.allclose(G.smooth_query(q, 2, 3, 0.0), q)
    assert G.grid_of(6, (4, 6)) == (2, 3) and G.grid_of(9, (5, 5)) == (3, 3)  # ceil, as stride-2 convs


def _attention():
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=4, heads=1, dim_head=4)
    with torch.no_grad():
        for lin in (attn.to_q, attn.to_k):
            lin.weight.copy_(torch.randn(4, 4, generator=torch.Generator().manual_seed(1)))
        attn.to_v.weight.copy_(2 * torch.eye(4))
        attn.to_out[0].weight.copy_(torch.eye(4))
        attn.to_out[0].bias.zero_()
    return attn.eval()


def test_pag_processor_identity_attention_hand_worked():
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn, h = _attention(), torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(2))  # (B=2, N=4, C=4)
    plan = G.BranchPlan(pag_rows=slice(1, 2), latent_hw=(2, 2))
    proc = G.PerturbedSelfAttnProcessor(plan, pag=True)
    out = proc(attn, h)
    ref = AttnProcessor2_0()(attn, h)
    assert torch.allclose(out[0], ref[0], atol=1e-6)  # unperturbed row: ordinary attention
    assert torch.allclose(out[1], 2 * h[1], atol=1e-6)  # identity map: to_out(to_v(h)) = 2h
    assert proc.calls == 1


def test_seg_processor_blurs_query():
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn, h = _attention(), torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(3))
    plan = G.BranchPlan(seg_rows=slice(1, 2), seg_sigma=float("inf"), latent_hw=(2, 2))
    out = G.PerturbedSelfAttnProcessor(plan, seg=True)(attn, h)
    ref = AttnProcessor2_0()(attn, h)
    assert torch.allclose(out[0], ref[0], atol=1e-6)
    # infinite blur: every query is the mean query, so every token gets the same output
    v = 2 * h[1]
    q = attn.to_q(h[1]).mean(0)
    weights = torch.softmax(attn.to_k(h[1]) @ q / 2.0, dim=0)  # scale 1/sqrt(dim_head=4)
    assert torch.allclose(out[1], (weights[:, None] * v).sum(0).expand(4, 4), atol=1e-5)
    plan.seg_sigma = 0.0
    assert torch.allclose(G.PerturbedSelfAttnProcessor(plan, seg=True)(attn, h), ref, atol=1e-6)


def test_select_layers(sample_components):
    names = list(sample_components.unet.attn_processors)
    mid = G.select_layers(names, "mid")
    assert mid and all(n.startswith("mid_block.") and n.endswith("attn1.processor") for n in mid)
    assert all(n.startswith("up_blocks.0.attentions.1.") for n in G.select_layers(names, "up.0.1"))
    with pytest.raises(TunelabError, match="matches no self-attention"):
        G.select_layers(names, "down.0")  # the first toy (and SDXL) level has no transformer


def test_freeu_math_hand_worked():
    """FreeU (diffusers' apply_freeu): backbone's first half of channels x b1, skip features'
    low frequencies x s1. A constant skip map is pure DC, so it is scaled by s1 exactly."""
    from diffusers.utils.torch_utils import apply_freeu

    hidden, skip = torch.ones(1, 4, 4, 4), torch.full((1, 4, 4, 4), 2.0)
    h, s = apply_freeu(0, hidden.clone(), skip, **G.FREEU_SDXL)
    assert torch.allclose(h[:, :2], torch.full((1, 2, 4, 4), 1.3)) and torch.allclose(h[:, 2:], hidden[:, 2:])
    assert torch.allclose(s, torch.full((1, 4, 4, 4), 2.0 * 0.9), atol=1e-5)


def test_freeu_context_enables_and_disables(sample_components):
    unet = sample_components.unet
    with G.freeu(unet, G.FREEU_SDXL):
        assert unet.up_blocks[0].b1 == 1.3
    assert getattr(unet.up_blocks[0], "b1", None) is None


def test_hires_size_and_upscale():
    assert G.hires_size(64, 64, 1.5) == (96, 96) and G.hires_size(1024, 1024, 1.5) == (1536, 1536)
    assert G.hires_size(872, 1024, 1.5) == (1308, 1536)  # A1111: int(side x scale), not rounded to 8
    with pytest.raises(TunelabError, match="smaller than one latent pixel"):
        G.hires_size(8, 8, 0.5)
    lat = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])  # (1, 1, 2, 2)
    up = G.upscale_latents(lat, 32, 32)  # -> 4 x 4 latent
    assert up.shape == (1, 1, 4, 4)
    # bilinear, half-pixel centres: output (0, 0) is the input corner, (0, 1) is 0.25 of the way to 1
    assert up[0, 0, 0, 0].item() == pytest.approx(0.0) and up[0, 0, 0, 1].item() == pytest.approx(0.25)
