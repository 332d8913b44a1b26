"""Rendering on the toy model (random weights, 64 px, few steps): every sampler and guidance runs,
seeds, hires fix, VAE override, v / zero-terminal-SNR records. That each sampler computes what A1111
computes is tests/sample/test_samplers.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.models.prediction import PredictionRecord
from tunelab.sample.pipeline import SampleSettings, build_pipeline, generate, load_vae, resolve_sampler

BASE = SampleSettings(prompt="red (circle:1.2)", seed=11, steps=3, cfg=5.0)


def _latents(model, **changes) -> torch.Tensor:
    return generate(model, dataclasses.replace(BASE, **changes), output_type="latent").image


@pytest.fixture(scope="module")
def reference(toy_model):
    return _latents(toy_model)


def test_same_seed_same_image(toy_model):
    a, b = (generate(toy_model, BASE).image for _ in range(2))
    assert a.size == (64, 64) and np.array_equal(np.asarray(a), np.asarray(b))
    c = generate(toy_model, dataclasses.replace(BASE, seed=12)).image
    assert not np.array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("sampler", ["DDIM", "Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "UniPC", "DDIM CFG++",
                                     "Euler CFG++"])  # the rest run on a tiny UNet in test_samplers.py
def test_each_sampler_runs(toy_model, sampler):
    lat = _latents(toy_model, sampler=sampler, steps=3 if sampler == "UniPC" else 2)
    assert lat.shape == (4, 8, 8) and torch.isfinite(lat).all()


def test_unipc_needs_its_order_in_steps(toy_model):
    s = dataclasses.replace(BASE, sampler="UniPC", steps=2)
    assert s.problems() == ["steps must be at least 3 for UniPC (its order), got 2"]
    with pytest.raises(TunelabError, match="at least 3 for UniPC"):
        generate(toy_model, s)


@pytest.mark.parametrize("changes", [
    {"sampler": "Euler CFG++"}, {"sampler": "DDIM CFG++"}, {"pag_scale": 2.0}, {"seg_scale": 3.0},
    {"freeu": True}, {"cfg": 1.0}, {"guidance_rescale": 0.7}, {"clip_skip": 1}, {"prompt": "(red:0) circle"},
], ids=str)
def test_each_guidance_changes_the_output(toy_model, reference, changes):
    base = reference if "CFG++" not in str(changes) else _latents(toy_model, sampler=changes["sampler"].split()[0])
    assert (_latents(toy_model, **changes) - base).abs().max() > 1e-5


def test_pag_and_seg_run_their_processors_and_restore(toy_model):
    unet = toy_model.unet
    before = {n: type(p) for n, p in unet.attn_processors.items()}
    _latents(toy_model, pag_scale=1.0, seg_scale=1.0, pag_layers="mid,up.0", seg_layers="mid")
    assert {n: type(p) for n, p in unet.attn_processors.items()} == before


def test_hires_fix(toy_model):
    s = dataclasses.replace(BASE, hires_scale=1.5, hires_denoise=0.7, hires_steps=4)
    out = generate(toy_model, s)
    assert out.image.size == (96, 96) and out.extras["first_pass"] == (64, 64)
    plain = generate(toy_model, BASE).image.resize((96, 96))
    assert not np.array_equal(np.asarray(out.image), np.asarray(plain))
    lanczos = generate(toy_model, dataclasses.replace(s, hires_upscaler="lanczos")).image
    assert lanczos.size == (96, 96) and not np.array_equal(np.asarray(lanczos), np.asarray(out.image))


def test_sampler_names():
    spec, sched = resolve_sampler("ddim cfg++")
    assert (spec.name, spec.cfg_pp, spec.timesteps, sched.label) == ("DDIM CFG++", True, True, "Automatic")
    assert resolve_sampler("Euler a")[0].name == "Euler a"
    with pytest.raises(TunelabError, match="did you mean 'Euler a'"):
        resolve_sampler("Euler_a")


def test_vpred_ztsnr_checkpoint_is_sampled_as_such(sample_components, toy_tokenizers):
    comps = dataclasses.replace(sample_components, extras={"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])})
    model = build_pipeline(comps, toy_tokenizers)
    assert model.prediction == PredictionRecord("v", True)
    # A1111's "Zero Terminal SNR" noise schedule: rescaled, the last alpha_bar 4.9e-8 (sigma_max ~4519)
    assert model.noise.prediction == "v" and model.noise.alphas_cumprod[-1].item() == pytest.approx(4.8973451890853435e-08)
    assert model.noise.sigma_max == pytest.approx(4518.76, rel=1e-4)
    from tunelab.sample.pipeline import _guidance

    assert _guidance(BASE, model, resolve_sampler("Euler")[0]).rescale == 0.7  # CFG rescale on by default for ztsnr
    for name in ("Euler", "DDIM", "DPM++ 2M"):
        lat = generate(model, dataclasses.replace(BASE, sampler=name, steps=2), output_type="latent").image
        assert torch.isfinite(lat).all()
    plain = build_pipeline(sample_components, toy_tokenizers)
    assert plain.noise.prediction == "epsilon" and plain.noise.sigma_max == pytest.approx(14.6146, abs=1e-4)


def test_vae_override(tmp_path, sample_components, toy_model):
    from safetensors.torch import save_file

    from tunelab.models import keys as K

    # a lone VAE in the SGM/LDM layout (how sdxl-vae-fp16-fix ships), with every weight halved
    sd = sample_components.vae.state_dict()
    rules = [r for r in K.rules_for_arch("toy") if r.component == "vae"]
    ldm = {r.sgm[len(K.VAE):]: K.to_sgm_tensor(r, [sd[n] * 0.5 for n in r.names]).contiguous() for r in rules}
    save_file(ldm, tmp_path / "vae.safetensors")
    vae = load_vae(tmp_path / "vae.safetensors", "toy")
    assert torch.equal(vae.decoder.conv_out.weight, sample_components.vae.decoder.conv_out.weight * 0.5)
    other = build_pipeline(sample_components, toy_model.tokenizers, vae=vae)
    a, b = generate(toy_model, BASE).image, generate(other, BASE).image
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(TunelabError):
        load_vae(tmp_path / "missing.safetensors", "toy")
