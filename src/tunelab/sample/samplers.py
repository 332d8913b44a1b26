"""The samplers, by the names A1111 gives them, and their update rules.

A1111 v1.10 samples SDXL two ways, and so does tunelab:

- **k-diffusion samplers** (`modules/sd_samplers_kdiffusion.py`) step in sigma space over the
  model as a denoiser, `denoised = model(x, sigma)`, from `x = noise * sigmas[0]` down a schedule
  (schedules.py) chosen by the "Schedule type"; "Automatic" is each sampler's own default (Karras
  for DPM++ 2M, the model's uniform timesteps for Euler). Their update rules below are
  k-diffusion's (`k_diffusion/sampling.py`, the version A1111 pins), written out with the same
  arithmetic; tests/sample/test_samplers.py runs k-diffusion's own functions against them.
- **timestep samplers** (`sd_samplers_timesteps.py`: DDIM, DDIM CFG++, PLMS, UniPC) step on A1111's
  `range(0, 1000, 1000 // N) + 1` timesteps with the model's noise prediction, from x = noise.
  UniPC is A1111's own (`modules/models/diffusion/uni_pc`): variant bh1, time-uniform steps,
  order 3, lower order at the end, the defaults of its settings.

Euler CFG++ is not A1111's: it is ComfyUI's `sample_euler_cfg_pp` (which Forge also ships), whose
CFG scale is the CFG++ lambda itself. DDIM CFG++ is A1111's, whose lambda is the CFG scale / 12.5.
Each CFG++ sampler keeps the convention of the tool it comes from (`SamplerSpec.cfg_divisor`).

Extra noise (ancestral samplers) is drawn from each image's own seeded generator, after its
initial noise (A1111's `rng.ImageRNG.next`, with its "CPU" RNG source and eta noise seed delta 0);
the SDE samplers' comes from a Brownian tree per image seed (`BrownianNoise`, which needs torchsde).

Hand-written: k-diffusion is not a dependency (its package pulls torchvision and training extras),
and A1111's timestep samplers and schedule types exist in no library.
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from tunelab.errors import TunelabError
from tunelab.sample import schedules as S

CFGPP_DIVISOR = 12.5  # A1111's DDIM CFG++: lambda = CFG scale / 12.5 (CFG 6 -> 0.48)


class SigmaModel(Protocol):
    """The model as a k-diffusion denoiser (denoiser.py)."""

    uncond: torch.Tensor | None  # the unconditional branch's denoised of the last call (CFG++)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...


class TimestepModel(Protocol):
    """The model as A1111's timestep denoiser: the guided noise prediction at timestep t."""

    eps_uncond: torch.Tensor | None

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


Noise = Callable[[], torch.Tensor]  # the next extra-noise draw, shaped like x


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler as the A1111 (or Forge/ComfyUI) sampler list defines it."""

    name: str
    run: Callable[..., torch.Tensor]  # (model, x, sigmas or timesteps, noise) -> x
    timesteps: bool = False  # a timestep sampler (DDIM, PLMS, UniPC) rather than a sigma one
    schedule: str | None = None  # what "Automatic" means (A1111's options['scheduler']); None = Uniform
    discard_penultimate: bool = False  # A1111 'discard_next_to_last_sigma': steps + 1 levels, the penultimate dropped
    cfg_pp: bool = False
    cfg_divisor: float = 1.0  # CFG scale / cfg_divisor = the guidance scale (CFG++ lambda)
    min_steps: int = 1
    brownian: bool = False  # its noise is a Brownian tree per image seed (BrownianNoise), not fresh draws
    source: str = "A1111"  # whose sampler this is (for the docs and errors)


# --- k-diffusion samplers (sigma space) ----------------------------------------------------------------------


def _to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    return (x - denoised) / sigma  # A1111's to_d (sd_schedulers.py replaces k-diffusion's)


def _ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0):
    """(sigma_down, sigma_up) of an ancestral step (k-diffusion get_ancestral_step)."""
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def euler(model: SigmaModel, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


def euler_ancestral(model: SigmaModel, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1])
        x = x + _to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise() * sigma_up
    return x


def heun(model: SigmaModel, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = _to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1]))
            x = x + (d + d_2) / 2 * dt
    return x


def dpm_2(model: SigmaModel, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = _to_d(x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            x = x + _to_d(x_2, sigma_mid, model(x_2, sigma_mid)) * (sigmas[i + 1] - sigmas[i])
    return x


def dpm_2_ancestral(model: SigmaModel, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1])
        d = _to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            x = x + _to_d(x_2, sigma_mid, model(x_2, sigma_mid)) * (sigma_down - sigmas[i])
            x = x + noise() * sigma_up
    return x


def lms_coefficient(order: int, t: np.ndarray, i: int, j: int) -> float:
    """Integral over [t_i, t_i+1] of the Lagrange basis polynomial j of the last `order` levels
    (k-diffusion's linear_multistep_coeff integrates it numerically; here it is exact)."""
    P = np.polynomial.polynomial
    poly = np.array([1.0])
    for k in range(order):
        if k != j:
            poly = P.polymul(poly, np.array([-float(t[i - k]), 1.0]) / (float(t[i - j]) - float(t[i - k])))
    antideriv = P.polyint(poly)
    return float(P.polyval(float(t[i + 1]), antideriv) - P.polyval(float(t[i]), antideriv))


def lms(model: SigmaModel, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, order: int = 4) -> torch.Tensor:
    levels = sigmas.detach().cpu().numpy()
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        ds.append(_to_d(x, sigmas[i], model(x, sigmas[i])))
        if len(ds) > order:
            ds.pop(0)
        cur = min(i + 1, order)
        coeffs = [lms_coefficient(cur, levels, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


def dpmpp_2m(model: SigmaModel, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), in t = -log sigma."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        t, t_next = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
        h = t_next - t
        if old_denoised is not None and sigmas[i + 1] != 0:
            r = (t - sigmas[i - 1].log().neg()) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        else:
            denoised_d = denoised
        x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def dpmpp_2s_ancestral(model: SigmaModel, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1])
        if sigma_down == 0:
            x = x + _to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = sigmas[i].log().neg(), sigma_down.log().neg()
            h = t_next - t
            s = t + h / 2
            x_2 = (s.neg().exp() / t.neg().exp()) * x - (-h / 2).expm1() * denoised
            denoised_2 = model(x_2, s.neg().exp())
            x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise() * sigma_up
    return x


def dpmpp_sde(model: SigmaModel, x: torch.Tensor, sigmas: torch.Tensor, noise: "BrownianNoise",
              r: float = 1 / 2) -> torch.Tensor:
    """DPM-Solver++ (stochastic), eta 1: two model calls per step, at the step's midpoint in t."""
    sigma_fn, t_fn = (lambda t: t.neg().exp()), (lambda sigma: sigma.log().neg())
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        sd, su = _ancestral_step(sigma_fn(t), sigma_fn(s))
        s_ = t_fn(sd)
        x_2 = (sigma_fn(s_) / sigma_fn(t)) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + noise(sigma_fn(t), sigma_fn(s)) * su
        denoised_2 = model(x_2, sigma_fn(s))
        sd, su = _ancestral_step(sigma_fn(t), sigma_fn(t_next))
        t_next_ = t_fn(sd)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (sigma_fn(t_next_) / sigma_fn(t)) * x - (t - t_next_).expm1() * denoised_d
        x = x + noise(sigma_fn(t), sigma_fn(t_next)) * su
    return x


def dpmpp_2m_sde(model: SigmaModel, x: torch.Tensor, sigmas: torch.Tensor, noise: "BrownianNoise",
                 solver_type: str = "midpoint") -> torch.Tensor:
    """DPM-Solver++(2M) SDE, eta 1 (midpoint or Heun correction of the second-order term)."""
    old_denoised, h_last, h = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = 1.0 * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt()
        old_denoised, h_last = denoised, h
    return x


def dpmpp_2m_sde_heun(model: SigmaModel, x: torch.Tensor, sigmas: torch.Tensor, noise: "BrownianNoise") -> torch.Tensor:
    return dpmpp_2m_sde(model, x, sigmas, noise, solver_type="heun")


def dpmpp_3m_sde(model: SigmaModel, x: torch.Tensor, sigmas: torch.Tensor, noise: "BrownianNoise") -> torch.Tensor:
    """DPM-Solver++(3M) SDE, eta 1."""
    denoised_1 = denoised_2 = h_1 = h_2 = None
    h = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            h_eta = h * (1.0 + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                d = (denoised - denoised_1) / (h_1 / h)
                x = x + (h_eta.neg().expm1() / h_eta + 1) * d
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * 1.0).expm1().neg().sqrt()
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


class BrownianNoise:
    """The SDE samplers' noise as A1111 makes it (`Sampler.create_noise_sampler`: k-diffusion's
    BrownianTreeNoiseSampler with one torchsde BrownianTree per image, entropy = the image's seed,
    over (sigma_min, sigma_max) of the pass's whole schedule; torchsde's draws come from a CPU
    generator of that seed, which is what A1111's patched `_randn` gives with its CPU source).
    The tree lives on the CPU in float32; needs torchsde (pip install torchsde)."""

    def __init__(self, seeds: list[int], shape: tuple[int, ...], sigmas: torch.Tensor, device: torch.device):
        try:
            import torchsde
        except ImportError:
            raise TunelabError("the DPM++ SDE samplers need torchsde for their Brownian-tree noise: "
                               "pip install torchsde (or choose another sampler)") from None
        sigmas = sigmas.detach().float().cpu()
        self.t0, self.t1 = sigmas[sigmas > 0].min(), sigmas.max()
        w0 = torch.zeros(shape)
        self.trees = [torchsde.BrownianTree(self.t0, w0, self.t1, entropy=int(seed)) for seed in seeds]
        self.device = device

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        t0, t1 = torch.as_tensor(sigma).detach().cpu(), torch.as_tensor(sigma_next).detach().cpu()
        lo, hi, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        with warnings.catch_warnings():  # torchsde compares the float32 ends with its float64 ones
            warnings.filterwarnings("ignore", message="Should have t")
            w = torch.stack([tree(lo, hi) for tree in self.trees]) * sign
        return (w / (t1 - t0).abs().sqrt()).to(self.device)


def euler_cfg_pp(model: SigmaModel, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise) -> torch.Tensor:
    """CFG++ (Chung et al. 2024) Euler as ComfyUI's sample_euler_cfg_pp: the guided denoised
    estimate, re-noised along the unconditional branch's noise direction."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = denoised + sigmas[i + 1] * _to_d(x, sigmas[i], model.uncond)
    return x


# --- timestep samplers (A1111 sd_samplers_timesteps_impl.py) -------------------------------------------------


def _ddim_tables(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor):
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    return alphas, alphas_prev, torch.sqrt(1 - alphas)


def _ddim(model: TimestepModel, x: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
          cfg_pp: bool) -> torch.Tensor:
    """DDIM with eta 0 (A1111's default "Eta DDIM"); with CFG++ the direction to x_t is the
    unconditional noise."""
    alphas, alphas_prev, sqrt_one_minus = _ddim_tables(timesteps, alphas_cumprod)
    s_x = x.new_ones((x.shape[0], 1, 1, 1))
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model.eps(x, timesteps[index].item() * x.new_ones([x.shape[0]]))
        a_t, a_prev = alphas[index].item() * s_x, alphas_prev[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus[index].item() * s_x * e_t) / a_t.sqrt()
        x = a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * (model.eps_uncond if cfg_pp else e_t)
    return x


def ddim(model: TimestepModel, x: torch.Tensor, timesteps: torch.Tensor, noise: Noise,
         alphas_cumprod: torch.Tensor) -> torch.Tensor:
    return _ddim(model, x, timesteps, alphas_cumprod, cfg_pp=False)


def ddim_cfgpp(model: TimestepModel, x: torch.Tensor, timesteps: torch.Tensor, noise: Noise,
               alphas_cumprod: torch.Tensor) -> torch.Tensor:
    return _ddim(model, x, timesteps, alphas_cumprod, cfg_pp=True)


def plms(model: TimestepModel, x: torch.Tensor, timesteps: torch.Tensor, noise: Noise,
         alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Pseudo linear multistep (Liu et al. 2022): a pseudo improved-Euler first step, then
    Adams-Bashforth on the noise predictions of up to three earlier steps."""
    alphas, alphas_prev, sqrt_one_minus = _ddim_tables(timesteps, alphas_cumprod)
    s_in, s_x = x.new_ones([x.shape[0]]), x.new_ones((x.shape[0], 1, 1, 1))
    old_eps: list[torch.Tensor] = []

    def step(e_t: torch.Tensor, index: int) -> torch.Tensor:
        a_t, a_prev = alphas[index].item() * s_x, alphas_prev[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus[index].item() * s_x * e_t) / a_t.sqrt()
        return a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * e_t

    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model.eps(x, timesteps[index].item() * s_in)
        if not old_eps:
            e_t_next = model.eps(step(e_t, index), timesteps[max(index - 1, 0)].item() * s_in)
            e_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = step(e_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
    return x


class _VPSchedule:
    """UniPC's NoiseScheduleVP('discrete'): log alpha piecewise linear in t = (n + 1) / N."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.log_alpha = 0.5 * torch.log(alphas_cumprod)
        self.n = len(alphas_cumprod)
        self.t_array = torch.linspace(0.0, 1.0, self.n + 1)[1:]

    def log_mean(self, t: torch.Tensor) -> torch.Tensor:
        xp, yp = self.t_array.to(t.device), self.log_alpha.to(t.device)
        idx = torch.searchsorted(xp, t.reshape(-1)).clamp(1, self.n - 1)
        x0, x1, y0, y1 = xp[idx - 1], xp[idx], yp[idx - 1], yp[idx]
        return (y0 + (t.reshape(-1) - x0) * (y1 - y0) / (x1 - x0)).reshape(-1)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_mean(t))

    def std(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_mean(t)))

    def lam(self, t: torch.Tensor) -> torch.Tensor:
        m = self.log_mean(t)
        return m - 0.5 * torch.log(1.0 - torch.exp(2.0 * m))


def _expand(v: torch.Tensor) -> torch.Tensor:
    return v[:, None, None, None]


def unipc(model: TimestepModel, x: torch.Tensor, timesteps: torch.Tensor, noise: Noise,
          alphas_cumprod: torch.Tensor, t_start: float | None = None, order: int = 3) -> torch.Tensor:
    """UniPC (Zhao et al. 2023) as A1111 runs it: multistep bh1 predictor-corrector on the data
    prediction, len(timesteps) steps evenly in t from t_start (1, or the hires pass's start) to 1/N."""
    ns = _VPSchedule(alphas_cumprod)
    steps = len(timesteps)
    if steps < order:
        raise TunelabError(f"UniPC (order {order}) needs at least {order} timesteps, got {steps}; raise the steps")
    grid = torch.linspace(1.0 if t_start is None else t_start, 1.0 / ns.n, steps + 1).to(x.device)

    def data(x_: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = model.eps(x_, (t - 1.0 / ns.n) * 1000.0)
        return (x_ - _expand(ns.std(t)) * eps) / _expand(ns.alpha(t))

    def vec(i: int) -> torch.Tensor:
        return grid[i].expand(x.shape[0])

    models, ts = [data(x, vec(0))], [vec(0)]
    for k in range(1, order):  # warm-up: orders 1 .. order-1, each with its corrector
        x, model_x = _unipc_update(ns, data, x, models, ts, vec(k), k, True)
        models.append(model_x)
        ts.append(vec(k))
    for step in range(order, steps + 1):
        last = step == steps  # no corrector, and no model call, after the final step
        x, model_x = _unipc_update(ns, data, x, models, ts, vec(step), min(order, steps + 1 - step), not last)
        models, ts = models[1:] + models[-1:], ts[1:] + [vec(step)]
        if not last:
            models[-1] = model_x
    return x


def _unipc_update(ns: _VPSchedule, data: Callable, x: torch.Tensor, models: list[torch.Tensor],
                  ts: list[torch.Tensor], t: torch.Tensor, order: int, use_corrector: bool):
    """One multistep UniPC-bh1 step from ts[-1] to t (uni_pc.multistep_uni_pc_bh_update, data prediction)."""
    t_prev, model_prev = ts[-1], models[-1]
    lambda_prev, lambda_t = ns.lam(t_prev), ns.lam(t)
    sigma_prev, sigma_t = ns.std(t_prev), ns.std(t)
    alpha_t = torch.exp(ns.log_mean(t))
    h = lambda_t - lambda_prev
    rks, d1s = [], []
    for i in range(1, order):
        rk = ((ns.lam(ts[-(i + 1)]) - lambda_prev) / h)[0]
        rks.append(rk)
        d1s.append((models[-(i + 1)] - model_prev) / rk)
    rks.append(1.0)
    rks_t = torch.stack([torch.as_tensor(r, dtype=torch.float32, device=x.device) for r in rks])
    hh = -h[0]
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial, r_rows, b = 1, [], []
    for i in range(1, order + 1):  # B(h) = h for bh1
        r_rows.append(torch.pow(rks_t, i - 1))
        b.append(h_phi_k * factorial / hh)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b_t = torch.stack(r_rows), torch.stack([torch.as_tensor(v, dtype=torch.float32, device=x.device) for v in b])
    D1s = torch.stack(d1s, dim=1) if d1s else None  # (B, K, C, H, W)
    x_t_ = _expand(sigma_t / sigma_prev) * x - _expand(alpha_t * h_phi_1) * model_prev
    x_t = x_t_
    if D1s is not None:
        rhos_p = torch.tensor([0.5], device=x.device) if order == 2 else torch.linalg.solve(R[:-1, :-1], b_t[:-1])
        x_t = x_t_ - _expand(alpha_t * hh) * torch.einsum("k,bkchw->bchw", rhos_p, D1s)
    if not use_corrector:
        return x_t, None
    rhos_c = torch.tensor([0.5], device=x.device) if order == 1 else torch.linalg.solve(R, b_t)
    model_t = data(x_t, t)
    corr = torch.einsum("k,bkchw->bchw", rhos_c[:-1], D1s) if D1s is not None else 0
    return x_t_ - _expand(alpha_t * hh) * (corr + rhos_c[-1] * (model_t - model_prev)), model_t


# --- the table -----------------------------------------------------------------------------------------------

_SPECS = (
    SamplerSpec("DPM++ 2M", dpmpp_2m, schedule="Karras"),
    SamplerSpec("DPM++ SDE", dpmpp_sde, schedule="Karras", brownian=True),
    SamplerSpec("DPM++ 2M SDE", dpmpp_2m_sde, schedule="Exponential", brownian=True),
    SamplerSpec("DPM++ 2M SDE Heun", dpmpp_2m_sde_heun, schedule="Exponential", brownian=True),
    SamplerSpec("DPM++ 2S a", dpmpp_2s_ancestral, schedule="Karras"),
    SamplerSpec("DPM++ 3M SDE", dpmpp_3m_sde, schedule="Exponential", discard_penultimate=True, brownian=True),
    SamplerSpec("Euler a", euler_ancestral),
    SamplerSpec("Euler", euler),
    SamplerSpec("LMS", lms),
    SamplerSpec("Heun", heun),
    SamplerSpec("DPM2", dpm_2, schedule="Karras", discard_penultimate=True),
    SamplerSpec("DPM2 a", dpm_2_ancestral, schedule="Karras", discard_penultimate=True),
    SamplerSpec("DDIM", ddim, timesteps=True),
    SamplerSpec("DDIM CFG++", ddim_cfgpp, timesteps=True, cfg_pp=True, cfg_divisor=CFGPP_DIVISOR),
    SamplerSpec("PLMS", plms, timesteps=True),
    SamplerSpec("UniPC", unipc, timesteps=True, min_steps=3),
    SamplerSpec("Euler CFG++", euler_cfg_pp, cfg_pp=True, source="ComfyUI / Forge"),
)
SAMPLERS: dict[str, SamplerSpec] = {s.name: s for s in _SPECS}
# A1111's own aliases (k_euler, ...) as its samplers_k_diffusion / samplers_timesteps tables list them.
_ALIASES = {"k_euler": "Euler", "k_euler_a": "Euler a", "k_euler_ancestral": "Euler a", "k_lms": "LMS",
            "k_heun": "Heun", "k_dpm_2": "DPM2", "k_dpm_2_a": "DPM2 a", "k_dpmpp_2s_a": "DPM++ 2S a",
            "k_dpmpp_2m": "DPM++ 2M", "k_dpmpp_sde": "DPM++ SDE", "k_dpmpp_2m_sde": "DPM++ 2M SDE",
            "k_dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun", "k_dpmpp_3m_sde": "DPM++ 3M SDE", "ddim": "DDIM",
            "ddim_cfgpp": "DDIM CFG++", "plms": "PLMS", "unipc": "UniPC", "euler_cfg_pp": "Euler CFG++"}


def _lookup(name: str) -> SamplerSpec | None:
    key = name.strip().lower()
    canon = next((s for s in SAMPLERS if s.lower() == key), None) or _ALIASES.get(key)
    return SAMPLERS[canon] if canon else None


def split_sampler(name: str, schedule_type: str = "Automatic") -> tuple[SamplerSpec, S.Schedule]:
    """(sampler, schedule type) of a sampler name and a schedule type, as A1111 reads them
    (`sd_samplers.get_sampler_and_scheduler`): a schedule suffix on the name wins, so the
    pre-1.9 names "DPM++ 2M Karras", "Euler a Exponential", ... mean sampler + schedule type."""
    spec = _lookup(name)
    sched = S.schedule(schedule_type)
    if spec is None:
        for option in S.SCHEDULES.values():
            for suffix in (option.label, option.name, *option.aliases):
                if name.strip().lower().endswith(" " + suffix.lower()):
                    spec = _lookup(name.strip()[: -len(suffix) - 1])
                    if spec is not None:
                        return spec, option
        near = difflib.get_close_matches(name, list(SAMPLERS), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise TunelabError(f"unknown sampler {name!r}{hint}; choose one of: {', '.join(SAMPLERS)} "
                           "(a schedule type may follow, as in 'DPM++ 2M Karras')")
    return spec, sched


def canonical_sampler(name: str) -> str:
    """A sampler name as A1111 writes it ("euler a" -> "Euler a", "dpm++ 2m karras" -> "DPM++ 2M Karras")."""
    spec, sched = split_sampler(name)
    if _lookup(name) is not None:
        return spec.name
    return f"{spec.name} {sched.label}"


def canonical_schedule(name: str) -> str:
    return S.schedule(name).label


def effective_schedule(spec: SamplerSpec, sched: S.Schedule) -> S.Schedule:
    """The schedule a sigma sampler runs: the chosen one, or for Automatic the sampler's default."""
    if sched.function is None and spec.schedule is not None:
        return S.SCHEDULES[spec.schedule]
    return sched


def infotext_names(sampler: str, schedule_type: str) -> tuple[str, str]:
    """("Sampler", "Schedule type") as A1111 writes them: the sampler without a schedule suffix,
    and the schedule that ran (Karras for an automatic DPM++ 2M), or what was chosen where none
    runs (Automatic for Euler's own timesteps and for the timestep samplers)."""
    spec, sched = split_sampler(sampler, schedule_type)
    if spec.timesteps:
        return spec.name, sched.label
    return spec.name, effective_schedule(spec, sched).label


def sigmas_for(spec: SamplerSpec, sched: S.Schedule, ns: S.NoiseSchedule, steps: int) -> torch.Tensor:
    """The noise levels a sigma sampler runs for `steps` steps (KDiffusionSampler.get_sigmas)."""
    n = steps + 1 if spec.discard_penultimate else steps
    chosen = effective_schedule(spec, sched)
    if ns.prediction == "flow" and chosen.label not in ("Automatic", "Uniform"):
        raise TunelabError(f"schedule type {chosen.label!r} is not available for rectified-flow models; use Automatic "
                           "(ComfyUI's normal schedule on the model's shifted timesteps)")
    sigmas = ns.uniform(n) if chosen.function is None else chosen.function(n, ns)
    return torch.cat([sigmas[:-2], sigmas[-1:]]) if spec.discard_penultimate else sigmas


