"""tunelab's samplers against the reference tools: k-diffusion's own sampler functions (what A1111
v1.10 samples with) over the same model, sigmas and noise; A1111's timestep samplers, schedule types
and hires fix, and ComfyUI's Euler CFG++, written out below from their code (cited at each).

The model is a tiny real diffusers UNet (one cross-attention level, random weights) beside the toy
text encoders, so each sampler costs a few milliseconds per step. tunelab renders through
`generate`; the conditioning it used is read off the UNet's first call (a forward hook), so the
references see exactly the same prompt embeddings.
"""

from __future__ import annotations

import dataclasses
import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.kdiffusion import load
from tunelab.models.arch import scheduler_config
from tunelab.models.prediction import PredictionRecord
from tunelab.sample import samplers as SP
from tunelab.sample import schedules as S
from tunelab.sample.guidance import hires_size
from tunelab.sample.infotext import format_infotext, parse_infotext, settings_params
from tunelab.sample.pipeline import SampleSettings, SamplingModel, generate

# torchsde warns when k-diffusion's float32 sigmas meet its float64 interval ends (both sides; harmless)
pytestmark = pytest.mark.filterwarnings("ignore:Should have t")

BASE = SampleSettings(prompt="red (circle:1.2)", negative="", seed=11, steps=3, cfg=5.0, width=64, height=64)
TOL = 1e-5  # relative L2 of the final latents


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def kd():
    return load()


def _tiny_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(8,), layers_per_block=1, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=96, attention_head_dim=2, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=64 + 6 * 8,  # the toy's pooled (64) + six size ids
    ).eval()


@pytest.fixture(scope="module")
def tiny(sample_components, toy_tokenizers):
    """(epsilon model, v + zero-terminal-SNR model) over one tiny UNet and the toy text encoders."""
    c = sample_components
    unet = _tiny_unet()
    make = lambda pred: SamplingModel(unet, c.vae, (c.text_encoder_1, c.text_encoder_2), toy_tokenizers,  # noqa: E731
                                      scheduler_config("toy"), pred, "tiny")
    return make(PredictionRecord()), make(PredictionRecord("v", True))


def _render(model: SamplingModel, s: SampleSettings):
    """tunelab's final latents (1, 4, h, w), and every UNet call's (timestep, context, pooled, time_ids)."""
    calls = []

    def hook(module, args, kwargs):
        added = kwargs["added_cond_kwargs"]
        calls.append((args[1], kwargs["encoder_hidden_states"], added["text_embeds"], added["time_ids"]))

    handle = model.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        lat = generate(model, s, output_type="latent").image[None]
    finally:
        handle.remove()
    return lat, calls


# --- the reference side -------------------------------------------------------------------------------------


def a1111_alphas_cumprod() -> torch.Tensor:
    """SDXL's alphas_cumprod as A1111 v1.10 keeps it: sgm LegacyDDPMDiscretization (float64 numpy
    cumprod of 1 - linspace(sqrt 0.00085, sqrt 0.012)^2) cast to float32 (sd_models_xl.extend_sdxl)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.asarray(np.cumprod(1.0 - betas.numpy(), axis=0), dtype=torch.float32)


def a1111_rescale_ztsnr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """A1111 v1.10 modules/sd_models.py, rescale_zero_terminal_snr_abar."""
    s = alphas_cumprod.sqrt()
    s0, s_t = s[0].clone(), s[-1].clone()
    s -= s_t
    s *= s0 / (s0 - s_t)
    out = s**2
    out[-1] = 4.8973451890853435e-08
    return out


class CompVisModel:
    """What k-diffusion's CompVisDenoiser wraps in A1111 (the sd_model): alphas_cumprod and
    apply_model(x, t, cond), here the UNet with SDXL's size ids."""

    def __init__(self, unet, alphas_cumprod, time_ids):
        self.unet, self.alphas_cumprod, self.time_ids = unet, alphas_cumprod, time_ids

    def apply_model(self, x, t, cond):
        ctx, pooled = cond
        return self.unet(x, t, encoder_hidden_states=ctx, return_dict=False,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": self.time_ids.expand(x.shape[0], -1)})[0]


class CFG:
    """A1111 v1.10 sd_samplers_cfg_denoiser.CFGDenoiser for one prompt: [cond, uncond] in one batch,
    denoised = uncond + (cond - uncond) * (cfg_scale * cond_scale_miltiplier) (combine_denoised);
    keeps the unconditional output (last_noise_uncond) for the CFG++ samplers."""

    def __init__(self, inner, conds, scale):
        self.inner, self.scale = inner, scale
        (self.c_ctx, self.c_pool), (self.u_ctx, self.u_pool) = conds
        self.uncond = None

    def __call__(self, x, t):
        b = x.shape[0]
        t = t * x.new_ones([b]) if t.ndim == 0 else t
        out = self.inner(torch.cat([x, x]), torch.cat([t, t]),
                         cond=(torch.cat([self.c_ctx, self.u_ctx]), torch.cat([self.c_pool, self.u_pool])))
        cond, self.uncond = out[:b], out[b:]
        return self.uncond + (cond - self.uncond) * self.scale


class TimestepsEps(torch.nn.Module):
    """A1111 v1.10 sd_samplers_timesteps.CompVisTimestepsDenoiser / CompVisTimestepsVDenoiser."""

    def __init__(self, model: CompVisModel, v: bool):
        super().__init__()
        self.model, self.v = model, v

    def forward(self, x, t, cond):
        out = self.model.apply_model(x, t, cond)
        if not self.v:
            return out
        a = self.model.alphas_cumprod[t.to(torch.int)][:, None, None, None]
        return a.sqrt() * out + (1 - a).sqrt() * x  # predict_eps_from_z_and_v


def conditioning(calls, b: int = 1):
    """(cond, uncond) as tunelab fed them: GuidedUNet's batch is [uncond, cond]."""
    _, ctx, pooled, ids = calls[0]
    return ((ctx[b:2 * b], pooled[b:2 * b]), (ctx[:b], pooled[:b])), ids[:1]


def cpu_rng(seed: int, shape=(1, 4, 8, 8)):
    """A1111 v1.10 modules/rng.py ImageRNG with randn_source "CPU": a torch CPU generator seeded with
    the seed; first() is the initial noise, next() (k-diffusion's randn_like, via TorchHijack) more."""
    gen = torch.Generator("cpu").manual_seed(seed)
    return lambda *_: torch.randn(shape, generator=gen)


def a1111_sigmas(kd, mw, sched: str, steps: int, discard: bool = False) -> torch.Tensor:
    """A1111 v1.10 sd_samplers_kdiffusion.KDiffusionSampler.get_sigmas with the schedule functions of
    modules/sd_schedulers.py, over k-diffusion's DiscreteSchedule `mw` (CompVisDenoiser)."""
    n = steps + (1 if discard else 0)
    smin, smax = mw.sigmas[0].item(), mw.sigmas[-1].item()
    start, end = mw.sigma_to_t(torch.tensor(smax)), mw.sigma_to_t(torch.tensor(smin))
    if sched in ("Automatic", "Uniform"):
        sig = mw.get_sigmas(n)
    elif sched == "Karras":
        sig = kd.sampling.get_sigmas_karras(n=n, sigma_min=smin, sigma_max=smax)
    elif sched == "Exponential":
        sig = kd.sampling.get_sigmas_exponential(n=n, sigma_min=smin, sigma_max=smax)
    elif sched == "Polyexponential":
        sig = kd.sampling.get_sigmas_polyexponential(n=n, sigma_min=smin, sigma_max=smax, rho=1.0)
    elif sched == "SGM Uniform":
        sig = torch.FloatTensor([mw.t_to_sigma(ts) for ts in torch.linspace(start, end, n + 1)[:-1]] + [0.0])
    elif sched == "Normal":
        sig = torch.FloatTensor([mw.t_to_sigma(ts) for ts in torch.linspace(start, end, n)] + [0.0])
    elif sched == "KL Optimal":
        a_min, a_max = torch.arctan(torch.tensor(smin)), torch.arctan(torch.tensor(smax))
        i = torch.arange(n + 1)
        sig = torch.tan(i / n * a_min + (1.0 - i / n) * a_max)
    elif sched == "Align Your Steps":  # get_align_your_steps_sigmas, SDXL list, loglinear_interp
        levels = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]
        if n != len(levels):
            ys = np.exp(np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(levels)), np.log(levels[::-1])))[::-1]
            levels = np.append(ys.copy(), [0.0])
        else:
            levels = levels + [0.0]
        sig = torch.FloatTensor(levels)
    elif sched == "Simple":
        ss = len(mw.sigmas) / n
        sig = torch.FloatTensor([float(mw.sigmas[-(1 + int(x * ss))]) for x in range(n)] + [0.0])
    elif sched == "DDIM":
        ss, sigs, x = max(len(mw.sigmas) // n, 1), [], 1
        while x < len(mw.sigmas):
            sigs.append(float(mw.sigmas[x]))
            x += ss
        sig = torch.FloatTensor(sigs[::-1] + [0.0])
    else:
        raise AssertionError(sched)
    return torch.cat([sig[:-2], sig[-1:]]) if discard else sig


# --- schedules -----------------------------------------------------------------------------------------------


def test_noise_schedule_is_a1111s(kd):
    ns = S.NoiseSchedule.of(scheduler_config("sdxl"), PredictionRecord())
    ac = a1111_alphas_cumprod()
    assert torch.equal(ns.alphas_cumprod, ac)
    mw = kd.external.CompVisDenoiser(types.SimpleNamespace(alphas_cumprod=ac))
    assert torch.equal(ns.sigmas, mw.sigmas)
    assert ns.sigma_max == pytest.approx(14.6146, abs=1e-4) and ns.sigma_min == pytest.approx(0.0292, abs=1e-4)
    probe = torch.tensor([14.6146, 3.35, 1.0, 0.1, 0.0292])
    assert torch.allclose(ns.sigma_to_t(probe), mw.sigma_to_t(probe), rtol=0, atol=1e-4)
    t = torch.tensor([999.0, 700.79, 10.5, 0.0])
    assert torch.allclose(ns.t_to_sigma(t), mw.t_to_sigma(t), rtol=1e-6)
    # zero terminal SNR: A1111's rescale, finite sigma_max (ComfyUI's constant)
    z = S.NoiseSchedule.of(scheduler_config("sdxl"), PredictionRecord("v", True))
    assert torch.allclose(z.alphas_cumprod, a1111_rescale_ztsnr(ac), rtol=1e-6, atol=0)
    assert z.sigma_max == pytest.approx(math.sqrt((1 - 4.8973451890853435e-08) / 4.8973451890853435e-08), rel=1e-4)


@pytest.mark.parametrize("label", [s for s in S.SCHEDULES if s != "Automatic"])
def test_schedule_types_are_a1111s(kd, label):
    ns = S.NoiseSchedule.of(scheduler_config("sdxl"), PredictionRecord())
    mw = kd.external.CompVisDenoiser(types.SimpleNamespace(alphas_cumprod=a1111_alphas_cumprod()))
    for n in (3, 11, 48):
        ours, ref = S.SCHEDULES[label].function(n, ns), a1111_sigmas(kd, mw, label, n)
        assert ours.shape == ref.shape and (label == "DDIM" or len(ours) == n + 1)  # DDIM: every (1000 // n)-th level
        assert torch.allclose(ours, ref, rtol=2e-6, atol=1e-7), (label, n, ours, ref)


def test_first_steps_start_where_a1111s_do(tiny):
    """A1111's k-diffusion samplers start at t = 999 (sigma_max); its DDIM at range(0, 1000, 1000 // N)[-1] + 1
    (981 for 48 steps, 50 timesteps = 49 UNet calls); UniPC at t = 999, one call per timestep."""
    eps, _ = tiny
    ns = eps.noise
    for name in ("Euler", "DPM++ 2M", "Euler a"):
        sigmas = SP.sigmas_for(*SP.split_sampler(name), ns, 48)
        assert ns.timestep(sigmas[:1]).item() == pytest.approx(999.0, abs=1e-3)
    ts = S.timesteps_for(48)
    assert len(ts) == 50 and ts[-1].item() == 981 and ts[0].item() == 1
    _, calls = _render(eps, dataclasses.replace(BASE, sampler="Euler"))
    assert calls[0][0][0].item() == pytest.approx(999.0, abs=1e-3) and len(calls) == 3
    _, calls = _render(eps, dataclasses.replace(BASE, sampler="DDIM", steps=5))  # range(0, 1000, 200) + 1
    assert [c[0][0].item() for c in calls] == [801.0, 601.0, 401.0, 201.0]
    _, calls = _render(eps, dataclasses.replace(BASE, sampler="UniPC", steps=4))  # 4 timesteps, t = 999 .. 0
    assert [round(c[0][0].item(), 3) for c in calls] == [999.0, 749.25, 499.5, 249.75]


# --- k-diffusion samplers --------------------------------------------------------------------------------------

KDIFF = [  # (A1111 name, k-diffusion function, its extra noise) as A1111 v1.10's samplers_k_diffusion lists them:
    # "rng" = ImageRNG.next() through TorchHijack, "tree" = create_noise_sampler's Brownian tree (brownian_noise)
    ("Euler", "sample_euler", None), ("Euler a", "sample_euler_ancestral", "rng"), ("Heun", "sample_heun", None),
    ("LMS", "sample_lms", None), ("DPM2", "sample_dpm_2", None), ("DPM2 a", "sample_dpm_2_ancestral", "rng"),
    ("DPM++ 2M", "sample_dpmpp_2m", None), ("DPM++ 2S a", "sample_dpmpp_2s_ancestral", "rng"),
    ("DPM++ SDE", "sample_dpmpp_sde", "tree"), ("DPM++ 2M SDE", "sample_dpmpp_2m_sde", "tree"),
    ("DPM++ 2M SDE Heun", "sample_dpmpp_2m_sde", "tree"), ("DPM++ 3M SDE", "sample_dpmpp_3m_sde", "tree"),
]


def _kdiffusion(kd, model, s, calls, func, noise_kind, v=False, alphas=None):
    spec, sched = SP.split_sampler(s.sampler, s.schedule_type)
    conds, ids = conditioning(calls)
    inner = CompVisModel(model.unet, alphas if alphas is not None else a1111_alphas_cumprod(), ids)
    mw = (kd.external.CompVisVDenoiser if v else kd.external.CompVisDenoiser)(inner)
    label = SP.effective_schedule(spec, sched).label
    sigmas = a1111_sigmas(kd, mw, label, s.steps, spec.discard_penultimate)
    rng = cpu_rng(s.seed)
    x = rng() * sigmas[0]  # KDiffusionSampler.sample: x * sigmas[0] (sgm_noise_multiplier off by default)
    extra = {"noise_sampler": rng} if noise_kind == "rng" else {}
    if noise_kind == "tree":  # Sampler.create_noise_sampler: the iteration's seeds, the whole schedule's range
        extra = {"noise_sampler": kd.sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=[s.seed])}
    if spec.name == "DPM++ 2M SDE Heun":
        extra["solver_type"] = "heun"  # its options' solver_type
    return getattr(kd.sampling, func)(CFG(mw, conds, s.cfg), x, sigmas, disable=True, **extra)


@pytest.mark.parametrize("name,func,noise_kind", KDIFF, ids=[k[0] for k in KDIFF])
def test_k_diffusion_samplers_match(kd, tiny, name, func, noise_kind):
    eps, _ = tiny
    s = dataclasses.replace(BASE, sampler=name)
    ours, calls = _render(eps, s)
    assert _rel(ours, _kdiffusion(kd, eps, s, calls, func, noise_kind)) < TOL


@pytest.mark.parametrize("sampler,schedule", [("Euler", "Karras"), ("DPM++ 2M", "Exponential"), ("DPM++ 2M Karras", "Automatic"),
                                              ("Euler a", "SGM Uniform"), ("LMS", "KL Optimal")])
def test_schedule_types_drive_the_samplers(kd, tiny, sampler, schedule):
    eps, _ = tiny
    s = dataclasses.replace(BASE, sampler=sampler, schedule_type=schedule)
    spec, _ = SP.split_sampler(sampler, schedule)
    func, noise_kind = next((f, a) for n, f, a in KDIFF if n == spec.name)
    ours, calls = _render(eps, s)
    assert _rel(ours, _kdiffusion(kd, eps, s, calls, func, noise_kind)) < TOL


def test_v_prediction_zero_terminal_snr_matches(kd, tiny):
    """CompVisVDenoiser over A1111's rescaled schedule ("Noise schedule: Zero Terminal SNR")."""
    _, vz = tiny
    s = dataclasses.replace(BASE, sampler="Euler a", guidance_rescale=0.0)  # A1111 has no built-in CFG rescale
    ours, calls = _render(vz, s)
    ref = _kdiffusion(kd, vz, s, calls, "sample_euler_ancestral", "rng", v=True,
                      alphas=a1111_rescale_ztsnr(a1111_alphas_cumprod()))
    assert _rel(ours, ref) < TOL


def test_lms_coefficients_are_k_diffusions(kd):
    t = np.array([14.6, 6.1, 2.9, 1.2, 0.4, 0.0], dtype=np.float32)
    for i in range(5):
        for order in range(1, min(i + 1, 4) + 1):
            for j in range(order):
                # k-diffusion integrates numerically, in float32 under NumPy 2 (np.float32 levels): ~1e-7 off exact
                assert SP.lms_coefficient(order, t, i, j) == pytest.approx(kd.sampling.linear_multistep_coeff(order, t, i, j), rel=1e-6)


# --- CFG++ ----------------------------------------------------------------------------------------------------


def comfy_euler_cfg_pp(model: CFG, x, sigmas):
    """ComfyUI comfy/k_diffusion/sampling.py sample_euler_cfg_pp = sample_euler_ancestral_cfg_pp with
    eta 0, s_noise 0, on an epsilon model (half-log-SNR lambda = -log sigma, so alpha = 1); the CFG
    scale is lambda itself (CFGGuider passes cfg unchanged; disable_cfg1_optimization)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            alpha_s = sigmas[i] * sigmas[i].log().neg().exp()
            alpha_t = sigmas[i + 1] * sigmas[i + 1].log().neg().exp()
            d = (x - alpha_s * model.uncond) / sigmas[i]
            x = alpha_t * denoised + alpha_t * (sigmas[i + 1] / alpha_t) * d
    return x


def test_euler_cfg_pp_is_comfyuis(kd, tiny):
    eps, _ = tiny
    s = dataclasses.replace(BASE, sampler="Euler CFG++", cfg=0.8)
    ours, calls = _render(eps, s)
    conds, ids = conditioning(calls)
    mw = kd.external.CompVisDenoiser(CompVisModel(eps.unet, a1111_alphas_cumprod(), ids))
    sigmas = mw.get_sigmas(s.steps)  # Automatic = the model's uniform timesteps (ComfyUI's "normal")
    ref = comfy_euler_cfg_pp(CFG(mw, conds, 0.8), cpu_rng(s.seed)() * sigmas[0], sigmas)
    assert _rel(ours, ref) < TOL
    assert SP.SAMPLERS["Euler CFG++"].cfg_divisor == 1 and SP.SAMPLERS["DDIM CFG++"].cfg_divisor == 12.5


# --- A1111's timestep samplers ---------------------------------------------------------------------------------


def a1111_timesteps(steps):
    """A1111 v1.10 sd_samplers_timesteps.CompVisSampler.get_timesteps."""
    return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)


def a1111_ddim(model: CFG, x, timesteps, ac, cfg_pp=False):
    """A1111 v1.10 sd_samplers_timesteps_impl.ddim / ddim_cfgpp, eta 0 (opts.eta_ddim)."""
    alphas = ac[timesteps]
    alphas_prev = ac[F.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    s_in, s_x = x.new_ones((x.shape[0])), x.new_ones((x.shape[0], 1, 1, 1))
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in)
        a_t, a_prev = alphas[index].item() * s_x, alphas_prev[index].item() * s_x
        sigma_t = 0.0 * s_x
        pred_x0 = (x - sqrt_one_minus_alphas[index].item() * s_x * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * (model.uncond if cfg_pp else e_t)
        x = a_prev.sqrt() * pred_x0 + dir_xt + sigma_t * torch.zeros_like(x)
    return x


def a1111_plms(model: CFG, x, timesteps, ac):
    """A1111 v1.10 sd_samplers_timesteps_impl.plms."""
    alphas, alphas_prev = ac[timesteps], ac[F.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    s_in, s_x = x.new_ones([x.shape[0]]), x.new_ones((x.shape[0], 1, 1, 1))
    old_eps = []

    def x_prev_of(e_t, index):
        a_t, a_prev = alphas[index].item() * s_x, alphas_prev[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus_alphas[index].item() * s_x * e_t) / a_t.sqrt()
        return a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * e_t

    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in)
        if len(old_eps) == 0:
            e_t_next = model(x_prev_of(e_t, index), timesteps[max(index - 1, 0)].item() * s_in)
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x_prev_of(e_t_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
    return x


def a1111_unipc(model: CFG, x, steps, ac, t_start=None, order=3):
    """A1111 v1.10 sd_samplers_timesteps_impl.unipc -> modules/models/diffusion/uni_pc/uni_pc.py:
    NoiseScheduleVP('discrete'), UniPC(predict_x0=True, variant='bh1').sample(method='multistep',
    skip_type='time_uniform', order=3, lower_order_final=True), model time (t - 1/N) * 1000."""
    log_alpha = 0.5 * torch.log(ac)
    t_array = torch.linspace(0.0, 1.0, 1001)[1:]

    def lm(t):  # interpolate_fn between the keypoints
        k = int(torch.searchsorted(t_array, t.reshape(-1))[0].clamp(1, 999))
        return log_alpha[k - 1] + (t - t_array[k - 1]) * (log_alpha[k] - log_alpha[k - 1]) / (t_array[k] - t_array[k - 1])

    std = lambda t: torch.sqrt(1.0 - torch.exp(2.0 * lm(t)))  # noqa: E731
    lam = lambda t: lm(t) - 0.5 * torch.log(1.0 - torch.exp(2.0 * lm(t)))  # noqa: E731

    def data(x_, t):
        eps = model(x_, (t - 1.0 / 1000) * 1000.0)
        return (x_ - std(t)[:, None, None, None] * eps) / torch.exp(lm(t))[:, None, None, None]

    def update(x_, models, ts, t, k, corrector):
        h = lam(t) - lam(ts[-1])
        rks = [((lam(ts[-(i + 1)]) - lam(ts[-1])) / h)[0] for i in range(1, k)] + [1.0]
        d1s = [(models[-(i + 1)] - models[-1]) / rks[i - 1] for i in range(1, k)]
        rks = torch.tensor([float(r) for r in rks])
        hh = -h[0]
        h_phi_1, h_phi_k, fact, R, b = torch.expm1(hh), torch.expm1(hh) / hh - 1, 1, [], []
        for i in range(1, k + 1):
            R.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * fact / hh)
            fact *= i + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        R, b = torch.stack(R), torch.tensor([float(v) for v in b])
        alpha_t = torch.exp(lm(t))[:, None, None, None]
        x_t_ = (std(t) / std(ts[-1]))[:, None, None, None] * x_ - alpha_t * h_phi_1 * models[-1]
        D1s = torch.stack(d1s, dim=1) if d1s else None
        x_t = x_t_
        if D1s is not None:
            rhos_p = torch.tensor([0.5]) if k == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
            x_t = x_t_ - alpha_t * hh * torch.einsum("k,bkchw->bchw", rhos_p, D1s)
        if not corrector:
            return x_t, None
        rhos_c = torch.tensor([0.5]) if k == 1 else torch.linalg.solve(R, b)
        model_t = data(x_t, t)
        corr = torch.einsum("k,bkchw->bchw", rhos_c[:-1], D1s) if D1s is not None else 0
        return x_t_ - alpha_t * hh * (corr + rhos_c[-1] * (model_t - models[-1])), model_t

    grid = torch.linspace(1.0 if t_start is None else t_start, 1.0 / 1000, steps + 1)
    vec = lambda i: grid[i].expand(x.shape[0])  # noqa: E731
    models, ts = [data(x, vec(0))], [vec(0)]
    for k in range(1, order):
        x, m = update(x, models, ts, vec(k), k, True)
        models.append(m)
        ts.append(vec(k))
    for step in range(order, steps + 1):
        x, m = update(x, models, ts, vec(step), min(order, steps + 1 - step), step != steps)
        models, ts = models[1:] + models[-1:], ts[1:] + [vec(step)]
        if step < steps:
            models[-1] = m
    return x


def _timestep_reference(model, s, calls, v=False, alphas=None, x=None, timesteps=None, t_start=None):
    conds, ids = conditioning(calls)
    ac = alphas if alphas is not None else a1111_alphas_cumprod()
    scale = s.cfg * (1 / 12.5) if s.sampler == "DDIM CFG++" else s.cfg  # ddim_cfgpp: cond_scale_miltiplier
    cfg = CFG(TimestepsEps(CompVisModel(model.unet, ac, ids), v), conds, scale)
    x = cpu_rng(s.seed)() if x is None else x
    timesteps = a1111_timesteps(s.steps) if timesteps is None else timesteps
    if s.sampler == "UniPC":
        return a1111_unipc(cfg, x, len(timesteps), ac, t_start)
    if s.sampler == "PLMS":
        return a1111_plms(cfg, x, timesteps, ac)
    return a1111_ddim(cfg, x, timesteps, ac, cfg_pp=s.sampler == "DDIM CFG++")


@pytest.mark.parametrize("name,steps", [("DDIM", 5), ("DDIM CFG++", 5), ("PLMS", 4), ("UniPC", 4)])
def test_timestep_samplers_are_a1111s(tiny, name, steps):
    eps, _ = tiny
    s = dataclasses.replace(BASE, sampler=name, steps=steps, cfg=6.0)
    ours, calls = _render(eps, s)
    assert _rel(ours, _timestep_reference(eps, s, calls)) < TOL


def test_ddim_on_v_prediction_zero_terminal_snr(tiny):
    _, vz = tiny
    s = dataclasses.replace(BASE, sampler="DDIM", steps=4, guidance_rescale=0.0)
    ours, calls = _render(vz, s)
    ref = _timestep_reference(vz, s, calls, v=True, alphas=a1111_rescale_ztsnr(a1111_alphas_cumprod()))
    assert _rel(ours, ref) < TOL


# --- hires fix --------------------------------------------------------------------------------------------------


def test_hires_schedule_numbers_are_a1111s(kd):
    """A1111 v1.10 sd_samplers_common.setup_img2img_steps with the hires pass's steps: a schedule of
    int(steps / min(denoise, 0.999)) steps, t_enc = steps - 1; sample_img2img runs sigmas[steps - t_enc - 1:]."""
    assert S.img2img_steps(48, 0.7) == (68, 47) and S.img2img_steps(20, 1.0) == (20, 19)
    ns = S.NoiseSchedule.of(scheduler_config("sdxl"), PredictionRecord())
    mw = kd.external.CompVisDenoiser(types.SimpleNamespace(alphas_cumprod=a1111_alphas_cumprod()))
    total, t_enc = S.img2img_steps(48, 0.7)
    ref = mw.get_sigmas(total)[total - t_enc - 1:]
    ours = SP.sigmas_for(*SP.split_sampler("Euler"), ns, total)[total - t_enc - 1:]
    assert torch.allclose(ours, ref) and len(ours) == 49  # 48 steps
    assert ours[0].item() == pytest.approx(3.35, abs=0.01)  # not steps x denoise = 33 steps from 2.65
    # DDIM: noised to timesteps[t_enc], then timesteps[:t_enc] (sd_samplers_timesteps.sample_img2img)
    ts = S.timesteps_for(total)
    assert ts[t_enc].item() == 659 and ts[t_enc - 1].item() == 645 and len(ts[:t_enc]) == 47
    # the target is int(side x scale) (processing.py calculate_target_resolution), not rounded to 8
    assert hires_size(1000, 1000, 1.5) == (1500, 1500) and hires_size(872, 1024, 1.5) == (1308, 1536)


@pytest.mark.parametrize("name", ["Euler a", "DDIM", "DPM++ 2M SDE"])
def test_hires_pass_is_a1111s(kd, tiny, name):
    """txt2img, latent upscale (bilinear, no antialias: shared.latent_upscale_modes["Latent"]), a new
    ImageRNG with the seeds at the hires size for the noise (processing.py sample_hr_pass), the
    img2img pass at hires steps / denoise with the hires size's conditioning."""
    eps, _ = tiny
    s = dataclasses.replace(BASE, sampler=name, steps=3, hires_scale=1.5, hires_denoise=0.6, hires_steps=4)
    ours, calls = _render(eps, s)
    assert ours.shape == (1, 4, 12, 12)
    first = dataclasses.replace(s, hires_scale=1.0)
    func, extra_noise = next(((f, a) for n, f, a in KDIFF if n == name), (None, None))
    if name == "DDIM":
        low = _timestep_reference(eps, first, calls)
    else:
        low = _kdiffusion(kd, eps, first, calls, func, extra_noise)
    up = F.interpolate(low, size=(96 // 8, 96 // 8), mode="bilinear", antialias=False)
    rng = cpu_rng(s.seed, (1, 4, 12, 12))
    noise = rng()
    total, t_enc = int(4 / min(0.6, 0.999)), 4 - 1
    hires_ids = torch.tensor([[96, 96, 0, 0, 96, 96]], dtype=torch.float32)
    conds, _ = conditioning(calls)
    ac = a1111_alphas_cumprod()
    if name == "DDIM":
        ts = a1111_timesteps(total)
        a = ac[ts[t_enc]]
        xi = up * torch.sqrt(a) + noise * torch.sqrt(1 - a)
        hires_calls = [(None, torch.cat([conds[1][0], conds[0][0]]), torch.cat([conds[1][1], conds[0][1]]), hires_ids)]
        ref = _timestep_reference(eps, s, hires_calls, x=xi, timesteps=ts[:t_enc])
    else:  # KDiffusionSampler.sample_img2img: sigma_sched = sigmas[steps - t_enc - 1:], xi = x + noise * sigma_sched[0]
        mw = kd.external.CompVisDenoiser(CompVisModel(eps.unet, ac, hires_ids))
        spec, sched_type = SP.split_sampler(name)
        every = a1111_sigmas(kd, mw, SP.effective_schedule(spec, sched_type).label, total)
        sched = every[total - t_enc - 1:]
        if extra_noise == "tree":  # create_noise_sampler(x, sigmas, p): the whole schedule's range
            rng = kd.sampling.BrownianTreeNoiseSampler(up, every[every > 0].min(), every.max(), seed=[s.seed])
        ref = getattr(kd.sampling, func)(CFG(mw, conds, s.cfg), up + noise * sched[0], sched, disable=True,
                                         noise_sampler=rng)
    assert _rel(ours, ref) < TOL


# --- names and infotext -------------------------------------------------------------------------------------


def test_old_names_and_schedule_types():
    """A1111 v1.10 sd_samplers.get_sampler_and_scheduler: a schedule suffix on the name wins."""
    spec, sched = SP.split_sampler("DPM++ 2M Karras", "Automatic")
    assert (spec.name, sched.label) == ("DPM++ 2M", "Karras")
    spec, sched = SP.split_sampler("euler a sgm uniform")
    assert (spec.name, sched.label) == ("Euler a", "SGM Uniform")
    assert SP.canonical_sampler("dpm++ 2m karras") == "DPM++ 2M Karras" and SP.canonical_sampler("k_euler") == "Euler"
    assert SP.canonical_schedule("sgm_uniform") == "SGM Uniform" and SP.canonical_schedule("karras") == "Karras"
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="did you mean 'Karras'"):
        S.schedule("Karas")
    with pytest.raises(TunelabError, match="unknown sampler"):
        SP.split_sampler("DPM++ 9M")


def test_schedule_type_in_the_infotext():
    """A1111 v1.10 processing.create_infotext writes "Schedule type" right after "Sampler": p.scheduler,
    replaced by the label get_sigmas ran (extra_generation_params) when the schedule has a function."""
    def fields(**kw):
        s = dataclasses.replace(BASE, **kw)
        return parse_infotext(format_infotext(s.prompt, s.negative, settings_params(s, (64, 64), "m", None)))

    assert (fields(sampler="DPM++ 2M")["Schedule type"], fields(sampler="Euler")["Schedule type"]) == ("Karras", "Automatic")
    old = fields(sampler="DPM++ 2M Karras")
    assert (old["Sampler"], old["Schedule type"]) == ("DPM++ 2M", "Karras")
    assert fields(sampler="Euler", schedule_type="exponential")["Schedule type"] == "Exponential"
    assert fields(sampler="DDIM")["Schedule type"] == "Automatic"  # the timestep samplers run no schedule
    line = format_infotext("p", "", settings_params(dataclasses.replace(BASE, sampler="DPM++ 2M"), (64, 64), "m", None))
    assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5," in line
    # the noise is A1111's "CPU" source: create_infotext writes "RNG" when it is not GPU (its default), and
    # infotext_utils maps it back to the randn_source setting, so pasting reproduces the noise
    assert fields()["RNG"] == "CPU"
    # hires fields where create_infotext puts them: Denoising strength in the base dict (before Clip skip and RNG),
    # the Hires ones from extra_generation_params after them
    hires = format_infotext("p", "", settings_params(dataclasses.replace(BASE, hires_scale=1.5, hires_steps=20),
                                                     (96, 96), "m", None, extra={"first_pass": (64, 64)}))
    assert ("Size: 64x64, Model: m, Denoising strength: 0.7, Clip skip: 2, RNG: CPU, Hires upscale: 1.5, "
            "Hires steps: 20, Hires upscaler: Latent,") in hires


# --- hand-worked steps ------------------------------------------------------------------------------------------


class _Fixed:
    """A model whose guided and unconditional estimates are fixed numbers."""

    def __init__(self, guided: float, uncond: float):
        self.g, self.u = torch.tensor([guided]), torch.tensor([uncond])
        self.uncond = self.eps_uncond = None

    def __call__(self, x, sigma):
        self.uncond = self.u
        return self.g

    def eps(self, x, t):
        self.eps_uncond = self.u
        return self.g


def test_cfg_pp_steps_hand_worked():
    # Euler CFG++: x = 1, sigma 2 -> 1, guided denoised 0.5, unconditional 0:
    # x_next = 0.5 + 1 * (1 - 0) / 2 = 1.0 (plain Euler: 1 + (1 - 0.5) / 2 * (1 - 2) = 0.75); at sigma 0 the guided estimate
    x, m = torch.tensor([1.0]), _Fixed(0.5, 0.0)
    assert SP.euler_cfg_pp(m, x, torch.tensor([2.0, 1.0]), None).item() == pytest.approx(1.0)
    assert SP.euler(m, x, torch.tensor([2.0, 1.0]), None).item() == pytest.approx(0.75)
    assert SP.euler_cfg_pp(m, x, torch.tensor([2.0, 0.0]), None).item() == 0.5
    # DDIM CFG++: a_t 0.36, a_prev 0.64, x = 1, guided eps 0.5 -> x0 = (1 - 0.8 * 0.5) / 0.6 = 1; unconditional
    # eps 0.25: x_prev = 0.8 * 1 + 0.6 * 0.25 = 0.95 (plain DDIM: 0.8 + 0.6 * 0.5 = 1.1)
    ac, ts, m = torch.tensor([0.9, 0.64, 0.36]), torch.tensor([1, 2]), _Fixed(0.5, 0.25)
    assert SP.ddim_cfgpp(m, x, ts, None, ac).item() == pytest.approx(0.95)
    assert SP.ddim(m, x, ts, None, ac).item() == pytest.approx(1.1)


def test_flow_euler_is_diffusers_flow_match_euler(tiny):
    """Rectified flow (not an A1111 model type): the sigmas and steps of diffusers'
    FlowMatchEulerDiscreteScheduler (= ComfyUI's ModelSamplingDiscreteFlow + normal + euler), the
    UNet at shifted sigma x 1000, CFG on the velocity."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    eps, _ = tiny
    flow = dataclasses.replace(eps, prediction=PredictionRecord("flow", flow_shift=3.0))
    s = dataclasses.replace(BASE, steps=4)
    ours, calls = _render(flow, s)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(s.steps)
    assert torch.allclose(flow.noise.uniform(s.steps), sched.sigmas, rtol=1e-6, atol=1e-7)
    (c_ctx, c_pool), (u_ctx, u_pool) = conditioning(calls)[0]
    ids = conditioning(calls)[1]
    x = cpu_rng(s.seed)()
    for t in sched.timesteps:
        v = flow.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([c_ctx, u_ctx]), return_dict=False,
                      added_cond_kwargs={"text_embeds": torch.cat([c_pool, u_pool]), "time_ids": ids.expand(2, -1)})[0]
        x = sched.step(v[1:] + (v[:1] - v[1:]) * s.cfg, t, x).prev_sample
    assert [round(c[0][0].item(), 2) for c in calls] == [round(t.item(), 2) for t in sched.timesteps]
    assert _rel(ours, x) < TOL


def test_run_file_grid_sampler_is_checked_before_training():
    from tunelab.config import parse_config
    from tunelab.errors import TunelabError

    assert parse_config({"grid": {"sampler": "DPM++ 2M Karras"}}).grid.schedule_type == "Automatic"
    assert parse_config({"grid": {"sampler": "Euler", "schedule_type": "sgm uniform"}})
    with pytest.raises(TunelabError, match="grid.sampler / grid.schedule_type: unknown schedule type 'Karas'"):
        parse_config({"grid": {"schedule_type": "Karas"}})


def test_decode_is_8_bit_as_a1111_converts(tiny):
    """A1111 v1.10 processing.process_images_inner: clamp((x + 1) / 2, 0, 1), 255 * x, astype(np.uint8)
    (truncation; diffusers' image processor rounds)."""
    from tunelab.sample.pipeline import _to_images

    eps, _ = tiny
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x = eps.vae.decode(lat / eps.vae.config.scaling_factor, return_dict=False)[0][0]
    x = torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0)
    want = (255.0 * np.moveaxis(x.numpy(), 0, 2)).astype(np.uint8)
    assert np.array_equal(np.asarray(_to_images(eps, lat)[0]), want)
    assert not np.array_equal(want, (255.0 * np.moveaxis(x.numpy(), 0, 2)).round().astype(np.uint8))
