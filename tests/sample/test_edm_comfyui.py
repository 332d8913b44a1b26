"""v-prediction on continuous EDM sigmas (CosXL: the `edm_vpred.*` markers) sampled as ComfyUI samples it.

A toy checkpoint is written with CosXL's markers, loaded and rendered by tunelab; the reference is
ComfyUI's model wrapper written out below from its code, under k-diffusion's own `sample_euler` /
`sample_dpmpp_2m` (tests/kdiffusion.py), on ComfyUI's schedules. References (ComfyUI master):

- comfy/model_base.py, `model_sampling`: ModelType.V_PREDICTION_EDM = V_PREDICTION on
  ModelSamplingContinuousEDM; `BaseModel.apply_model`: the UNet gets calculate_input(sigma, x) at
  timestep model_sampling.timestep(sigma).float(), its output goes through calculate_denoised.
- comfy/model_sampling.py: `ModelSamplingContinuousEDM.set_parameters` (sigmas =
  exp(linspace(ln sigma_min, ln sigma_max, 1000)), float32; sigma_data 1 for this type),
  `.timestep` = 0.25 * ln(sigma), `.sigma` = exp(t / 0.25); `EPS.calculate_input` =
  x / sqrt(sigma^2 + sigma_data^2); `V_PREDICTION.calculate_denoised` = x * sd^2 / (sigma^2 + sd^2)
  - out * sigma * sd / sqrt(sigma^2 + sd^2); `EPS.noise_scaling` with max_denoise: noise *
  sqrt(1 + sigma^2) + latent.
- comfy/samplers.py: `Sampler.max_denoise` (sigmas[0] at or above sigma_max, rel_tol 1e-5),
  `calculate_sigmas` ("karras": k-diffusion's get_sigmas_karras over float(sigma_min),
  float(sigma_max); "normal": `normal_scheduler`), `cfg_function` (uncond + (cond - uncond) * cfg
  on the denoised estimates).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.kdiffusion import load
from tests.sample.test_samplers import _render  # every UNet call recorded, the final latents
from tunelab.errors import TunelabError
from tunelab.models.checkpoint import load_checkpoint
from tunelab.models.prediction import PredictionRecord
from tunelab.sample import samplers as SP
from tunelab.sample import schedules as S
from tunelab.sample.pipeline import SampleSettings, build_pipeline, generate

BASE = SampleSettings(prompt="red (circle:1.2)", negative="", seed=5, steps=4, cfg=4.0, width=64, height=64)
TOL = 1e-5  # relative L2 of the final latents


@pytest.fixture(scope="module")
def kd():
    return load()


@pytest.fixture(scope="module")
def cosxl(tmp_path_factory, toy_checkpoint, toy_tokenizers):
    """The toy checkpoint with CosXL's markers (sigma_max 120, sigma_min 0.002), as a file, loaded."""
    tensors = load_file(toy_checkpoint)
    tensors.update({"edm_vpred.sigma_max": torch.tensor(120.0), "edm_vpred.sigma_min": torch.tensor(0.002)})
    path = tmp_path_factory.mktemp("cosxl") / "cosxl.safetensors"
    save_file(tensors, path)
    return build_pipeline(load_checkpoint(path), toy_tokenizers, name="cosxl")


class ComfyEDMV:
    """ComfyUI's ModelSampling(ModelSamplingContinuousEDM, V_PREDICTION) with sampling_settings
    {sigma_min, sigma_max} (sigma_data 1.0), the fields it has and the methods samplers call."""

    def __init__(self, sigma_min: float, sigma_max: float):
        self.sigma_data = 1.0
        self.sigmas = torch.linspace(math.log(sigma_min), math.log(sigma_max), 1000).exp()
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        return 0.25 * sigma.log()

    def sigma(self, timestep):
        return (timestep / 0.25).exp()

    def calculate_input(self, sigma, noise):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1))
        return noise / (sigma**2 + self.sigma_data**2) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        sd = self.sigma_data
        return model_input * sd**2 / (sigma**2 + sd**2) - model_output * sigma * sd / (sigma**2 + sd**2) ** 0.5

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        noise = noise * torch.sqrt(1.0 + sigma**2.0) if max_denoise else noise * sigma
        return noise + latent_image


def comfy_normal(s: ComfyEDMV, steps: int) -> torch.Tensor:
    """comfy/samplers.py normal_scheduler (sgm=False)."""
    start, end = s.timestep(s.sigma_max), s.timestep(s.sigma_min)
    append_zero = True
    if math.isclose(float(s.sigma(end)), 0, abs_tol=0.00001):
        steps += 1
        append_zero = False
    timesteps = torch.linspace(start, end, steps)
    sigs = [float(s.sigma(ts)) for ts in timesteps]
    return torch.FloatTensor(sigs + ([0.0] if append_zero else []))


def comfy_sigmas(kd, s: ComfyEDMV, name: str, steps: int) -> torch.Tensor:
    """comfy/samplers.py calculate_sigmas for "karras" and "normal"."""
    if name == "karras":
        return kd.sampling.get_sigmas_karras(n=steps, sigma_min=float(s.sigma_min), sigma_max=float(s.sigma_max))
    return comfy_normal(s, steps)


class ComfyCFG:
    """ComfyUI's CFGGuider over BaseModel.apply_model: cond and uncond in one batch, each turned into a
    denoised estimate by calculate_denoised, combined by cfg_function."""

    def __init__(self, unet, ms: ComfyEDMV, conds, time_ids, cfg: float):
        self.unet, self.ms, self.cfg, self.time_ids = unet, ms, cfg, time_ids
        (self.c_ctx, self.c_pool), (self.u_ctx, self.u_pool) = conds
        self.timesteps = []

    def __call__(self, x, sigma):
        b = x.shape[0]
        x2, sigma2 = torch.cat([x, x]), torch.cat([sigma, sigma])
        xc = self.ms.calculate_input(sigma2, x2)
        t = self.ms.timestep(sigma2).float()
        self.timesteps.append(float(t[0]))
        out = self.unet(xc, t, encoder_hidden_states=torch.cat([self.c_ctx, self.u_ctx]), return_dict=False,
                        added_cond_kwargs={"text_embeds": torch.cat([self.c_pool, self.u_pool]),
                                           "time_ids": self.time_ids.expand(2 * b, -1)})[0].float()
        den = self.ms.calculate_denoised(sigma2, out, x2)
        cond, uncond = den[:b], den[b:]
        return uncond + (cond - uncond) * self.cfg


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# --- tests ---------------------------------------------------------------------------------------------------


def test_the_markers_give_comfyuis_continuous_edm_schedule(cosxl):
    assert cosxl.prediction == PredictionRecord("v", edm_sigmas=(0.002, 120.0))
    ns, ms = cosxl.noise, ComfyEDMV(0.002, 120.0)
    assert ns.continuous and ns.prediction == "v"
    torch.testing.assert_close(ns.sigmas, ms.sigmas, rtol=1e-6, atol=0)
    probe = torch.tensor([120.0, 14.6, 1.0, 0.03, 0.002])
    assert torch.equal(ns.timestep(probe), ms.timestep(probe))  # the UNet's timestep: ln(sigma) / 4
    assert torch.equal(ns.t_to_sigma(ms.timestep(probe)), ms.sigma(ms.timestep(probe)))


@pytest.mark.parametrize("lo,hi", [(0.002, 120.0), (0.002, 80.0), (0.01, 160.0)])
@pytest.mark.parametrize("steps", [3, 11, 48])
def test_karras_and_normal_are_comfyuis_on_edm_sigmas(kd, lo, hi, steps):
    ns = S.NoiseSchedule.of({"num_train_timesteps": 1000}, PredictionRecord("v", edm_sigmas=(lo, hi)))
    ms = ComfyEDMV(*PredictionRecord("v", edm_sigmas=(lo, hi)).edm_sigmas)  # the markers' float32 values
    karras, normal = comfy_sigmas(kd, ms, "karras", steps), comfy_sigmas(kd, ms, "normal", steps)
    assert torch.equal(S.karras(steps, ns), karras)
    torch.testing.assert_close(S.normal(steps, ns), normal, rtol=1e-6, atol=0)
    # Automatic / Uniform on these models = ComfyUI's default "normal"; DPM++ 2M's Automatic = Karras (A1111's table)
    assert torch.equal(SP.sigmas_for(*SP.split_sampler("Euler"), ns, steps), S.normal(steps, ns))
    assert torch.equal(SP.sigmas_for(*SP.split_sampler("DPM++ 2M"), ns, steps), S.karras(steps, ns))


@pytest.mark.parametrize("sampler,func,schedule", [("Euler", "sample_euler", "normal"),
                                                   ("DPM++ 2M", "sample_dpmpp_2m", "karras"),
                                                   ("Euler Karras", "sample_euler", "karras"),
                                                   ("DPM++ 2M Normal", "sample_dpmpp_2m", "normal")])
def test_cosxl_samples_as_comfyui(kd, cosxl, sampler, func, schedule):
    s = dataclasses.replace(BASE, sampler=sampler)
    ours, calls = _render(cosxl, s)
    _, ctx, pooled, ids = calls[0]  # tunelab's batch is [uncond, cond]: the reference sees the same embeddings
    ms = ComfyEDMV(0.002, 120.0)
    sigmas = comfy_sigmas(kd, ms, schedule, s.steps)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(s.seed))  # prepare_noise
    max_denoise = math.isclose(float(ms.sigma_max), float(sigmas[0]), rel_tol=1e-05) or float(sigmas[0]) > float(ms.sigma_max)
    assert max_denoise
    x = ms.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), max_denoise)
    model = ComfyCFG(cosxl.unet, ms, ((ctx[1:2], pooled[1:2]), (ctx[:1], pooled[:1])), ids[:1], s.cfg)
    with torch.no_grad():
        ref = getattr(kd.sampling, func)(model, x, sigmas, disable=True)  # inverse_noise_scaling: x itself
    assert [round(float(c[0][0]), 5) for c in calls] == [round(t, 5) for t in model.timesteps]
    assert float(calls[0][0][0]) == pytest.approx(0.25 * math.log(120.0), rel=1e-6)
    assert _rel(ours, ref) < TOL


def test_a_cosxl_hires_pass_and_the_refusals(cosxl):
    # image-to-image starts at noise * sigma (ComfyUI's noise_scaling without max_denoise)
    ns = cosxl.noise
    lat, noise = torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 2.0)
    assert torch.equal(ns.noise_scaling(torch.tensor(3.0), noise, lat), lat + noise * 3.0)
    hires = generate(cosxl, dataclasses.replace(BASE, steps=2, hires_scale=1.5, hires_steps=2), output_type="latent")
    assert hires.image.shape == (4, 12, 12) and torch.isfinite(hires.image).all()
    with pytest.raises(TunelabError, match="DDIM.*continuous EDM sigmas.*Euler or DPM"):
        generate(cosxl, dataclasses.replace(BASE, sampler="DDIM"))
