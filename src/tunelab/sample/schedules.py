"""Noise levels for sampling, computed the way A1111 v1.10 computes them.

- `NoiseSchedule` is a checkpoint's noise levels, what k-diffusion's `CompVisDenoiser` (A1111's
  wrapper of every SDXL model) holds: sigma_t = sqrt((1 - a_t) / a_t) for the 1000 training steps,
  in float32 from the float32 `alphas_cumprod` of the float64 beta schedule, and sigma <-> t by
  interpolating log sigma (`DiscreteSchedule.sigma_to_t` / `t_to_sigma`). Zero-terminal-SNR models
  get A1111's rescaled schedule (`sd_models.rescale_zero_terminal_snr_abar`: the last alpha_bar is
  4.8973451890853435e-08, not 0, so sigma_max is about 4519; ComfyUI uses the same constant).
  Rectified-flow models get ComfyUI's `ModelSamplingDiscreteFlow`: sigma(t) = shifted t / 1000, and
  the UNet sees sigma * 1000. v-prediction on continuous EDM sigmas (CosXL, the `edm_vpred.*`
  markers) gets ComfyUI's `ModelSamplingContinuousEDM`: the table exp(linspace(ln sigma_min,
  ln sigma_max, 1000)) in float32, sigma <-> t exactly by t = ln(sigma) / 4 (the UNet's timestep),
  sigma_data 1; its "Automatic" / "Uniform" schedule is ComfyUI's "normal" (log-spaced between the
  table's ends) and a txt2img pass starts from noise * sqrt(1 + sigma_max^2), as ComfyUI's
  `noise_scaling` with max_denoise does.
- `SCHEDULES` are A1111's schedule types (`modules/sd_schedulers.py`, the "Schedule type" of the
  infotext) by label; each maps (steps, schedule) to steps + 1 sigmas (KL Optimal ends at
  sigma_min, not 0, as A1111's does).
- `timesteps_for` is A1111's timestep list for DDIM, PLMS and UniPC
  (`sd_samplers_timesteps.py`, `CompVisSampler.get_timesteps`), and `img2img_steps` its
  `sd_samplers_common.setup_img2img_steps` for the hires fix.

Hand-written: no library exposes these (k-diffusion, where some live, is not a dependency; its
test-only copy checks them in tests/sample/test_samplers.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch

from tunelab.errors import TunelabError
from tunelab.models.prediction import ZTSNR_LAST_ALPHA_BAR, PredictionRecord

# Align Your Steps' published SDXL noise levels (A1111 sd_schedulers.get_align_your_steps_sigmas).
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)


class NoiseSchedule:
    """A model's discrete noise levels (k-diffusion's DiscreteSchedule) and its parameterisation."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction: str, flow_shift: float | None = None,
                 edm_sigmas: tuple[float, float] | None = None):
        self.prediction = prediction  # "epsilon", "v" or "flow"
        self.flow_shift = flow_shift
        self.continuous = edm_sigmas is not None  # v on continuous EDM sigmas (ModelSamplingContinuousEDM)
        if self.continuous:
            lo, hi = edm_sigmas
            self.sigmas = torch.linspace(math.log(lo), math.log(hi), len(alphas_cumprod)).exp()  # float32, rising
        elif prediction == "flow":
            shift = flow_shift if flow_shift is not None else 1.0
            s = torch.arange(1, len(alphas_cumprod) + 1, dtype=torch.float32) / len(alphas_cumprod)
            self.sigmas = _flow_shift(s, shift)  # (1000,) rising to 1
        else:
            self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # (1000,) float32, rising
        self.alphas_cumprod = alphas_cumprod
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def of(cls, config: Mapping[str, Any], pred: PredictionRecord) -> "NoiseSchedule":
        """The schedule of a diffusers scheduler config (the preset's) and a prediction record."""
        pred.diffusers_name  # refuses records tunelab cannot sample, with the reason
        n = int(config.get("num_train_timesteps", 1000))
        if pred.continuous:  # alpha_bar = 1 / (1 + sigma^2) at each level, what a VP view of it would use
            sigmas = torch.linspace(math.log(pred.edm_sigmas[0]), math.log(pred.edm_sigmas[1]), n).exp()
            return cls(1 / (sigmas**2 + 1), pred.type, edm_sigmas=pred.edm_sigmas)
        kind = config.get("beta_schedule", "scaled_linear")
        b0, b1 = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
        if kind == "scaled_linear":  # ldm / sgm make_beta_schedule("linear"): sqrt-spaced, float64
            betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float64) ** 2
        elif kind == "linear":
            betas = torch.linspace(b0, b1, n, dtype=torch.float64)
        else:
            raise TunelabError(f"beta_schedule {kind!r} is not supported for sampling (scaled_linear or linear)")
        alphas_cumprod = torch.cumprod(1 - betas, dim=0).float()  # A1111 keeps the float32 copy
        if pred.ztsnr:
            alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
        return cls(alphas_cumprod, pred.type, pred.flow_shift)

    @property
    def sigma_min(self) -> float:
        return self.sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        return self.sigmas[-1].item()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep of a noise level (log-sigma interpolation between table entries;
        continuous EDM sigmas: ln(sigma) / 4, ModelSamplingContinuousEDM.timestep)."""
        if self.continuous:
            return 0.25 * sigma.log()
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.log()
        dists = log_sigma - log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return ((1 - w) * low_idx + w * high_idx).view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        if self.continuous:
            return (t / 0.25).exp()
        log_sigmas = self.log_sigmas.to(t.device)
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx]).exp()

    def uniform(self, n: int) -> torch.Tensor:
        """k-diffusion's own schedule (`get_sigmas`): n timesteps evenly from 999 to 0, plus 0.
        Flow: ComfyUI's "normal" on ModelSamplingDiscreteFlow (= diffusers' FlowMatchEuler); continuous
        EDM sigmas: ComfyUI's "normal" (its default scheduler) on ModelSamplingContinuousEDM."""
        if self.continuous:
            return normal(n, self)
        if self.prediction == "flow":
            t = torch.linspace(self.sigma_max * 1000, self.sigma_min * 1000, n)
            return _append_zero(_flow_shift(t / 1000, self.flow_shift or 1.0))
        return _append_zero(self.t_to_sigma(torch.linspace(len(self.sigmas) - 1, 0, n)))

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """What the UNet is given as its timestep at noise level sigma."""
        return sigma * 1000 if self.prediction == "flow" else self.sigma_to_t(sigma)

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """The start of a pass at sigma (A1111 `x + noise * sigma`; flow mixes). Continuous EDM
        sigmas: ComfyUI's EPS.noise_scaling, whose max_denoise (comfy/samplers.py
        `Sampler.max_denoise`: sigma at or above sigma_max, rel. 1e-5) scales by sqrt(1 + sigma^2)."""
        if self.prediction == "flow":
            return sigma * noise + (1.0 - sigma) * latent
        if self.continuous and (math.isclose(self.sigma_max, float(sigma), rel_tol=1e-05) or float(sigma) > self.sigma_max):
            return latent + noise * torch.sqrt(1.0 + sigma**2.0)
        return latent + noise * sigma


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023's rescale on alpha_bar, A1111's way (float32, last value 4.9e-8)."""
    s = alphas_cumprod.sqrt()
    s0, s_t = s[0].clone(), s[-1].clone()
    s = (s - s_t) * (s0 / (s0 - s_t))
    out = s**2
    out[-1] = ZTSNR_LAST_ALPHA_BAR
    return out


def _flow_shift(s: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * s / (1 + (shift - 1) * s)


def _append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros([1])])


# --- A1111's schedule types (modules/sd_schedulers.py) ------------------------------------------------------


def karras(n: int, ns: NoiseSchedule, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 (k-diffusion get_sigmas_karras)."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = ns.sigma_min ** (1 / rho), ns.sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential(n: int, ns: NoiseSchedule) -> torch.Tensor:
    return _append_zero(torch.linspace(math.log(ns.sigma_max), math.log(ns.sigma_min), n).exp())


def polyexponential(n: int, ns: NoiseSchedule, rho: float = 1.0) -> torch.Tensor:
    ramp = torch.linspace(1, 0, n) ** rho
    lo, hi = math.log(ns.sigma_min), math.log(ns.sigma_max)
    return _append_zero(torch.exp(ramp * (hi - lo) + lo))


def sgm_uniform(n: int, ns: NoiseSchedule) -> torch.Tensor:
    start, end = ns.sigma_to_t(torch.tensor(ns.sigma_max)), ns.sigma_to_t(torch.tensor(ns.sigma_min))
    return _from_timesteps(ns, torch.linspace(start, end, n + 1)[:-1])


def normal(n: int, ns: NoiseSchedule) -> torch.Tensor:
    start, end = ns.sigma_to_t(torch.tensor(ns.sigma_max)), ns.sigma_to_t(torch.tensor(ns.sigma_min))
    return _from_timesteps(ns, torch.linspace(start, end, n))


def _from_timesteps(ns: NoiseSchedule, ts: torch.Tensor) -> torch.Tensor:
    return torch.FloatTensor([float(ns.t_to_sigma(t)) for t in ts] + [0.0])


def kl_optimal(n: int, ns: NoiseSchedule) -> torch.Tensor:
    """Sabour et al. 2024; n + 1 values ending at sigma_min (A1111 appends no zero)."""
    alpha_min, alpha_max = torch.arctan(torch.tensor(ns.sigma_min)), torch.arctan(torch.tensor(ns.sigma_max))
    i = torch.arange(n + 1)
    return torch.tan(i / n * alpha_min + (1.0 - i / n) * alpha_max)


def align_your_steps(n: int, ns: NoiseSchedule) -> torch.Tensor:
    """NVIDIA's SDXL levels, log-linearly interpolated to n steps (numpy, as A1111)."""
    if n == len(AYS_SDXL):
        return torch.FloatTensor([*AYS_SDXL, 0.0])
    xs, ys = np.linspace(0, 1, len(AYS_SDXL)), np.log(AYS_SDXL[::-1])
    interped = np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].copy()
    return torch.FloatTensor(np.append(interped, [0.0]))


def simple(n: int, ns: NoiseSchedule) -> torch.Tensor:
    ss = len(ns.sigmas) / n
    return torch.FloatTensor([float(ns.sigmas[-(1 + int(x * ss))]) for x in range(n)] + [0.0])


def ddim_uniform(n: int, ns: NoiseSchedule) -> torch.Tensor:
    """A1111's "DDIM" schedule type: every (1000 // n)-th level from index 1 up, reversed."""
    ss = max(len(ns.sigmas) // n, 1)
    return torch.FloatTensor([float(ns.sigmas[x]) for x in range(1, len(ns.sigmas), ss)][::-1] + [0.0])


@dataclass(frozen=True)
class Schedule:
    """One of A1111's schedule types: its label (the infotext's), its name and its function."""

    label: str
    name: str
    function: Callable[[int, NoiseSchedule], torch.Tensor] | None  # None: the sampler's own (Automatic)
    aliases: tuple[str, ...] = ()


SCHEDULES: dict[str, Schedule] = {s.label: s for s in (
    Schedule("Automatic", "automatic", None),
    Schedule("Uniform", "uniform", lambda n, ns: ns.uniform(n)),
    Schedule("Karras", "karras", karras),
    Schedule("Exponential", "exponential", exponential),
    Schedule("Polyexponential", "polyexponential", polyexponential),
    Schedule("SGM Uniform", "sgm_uniform", sgm_uniform, ("SGMUniform",)),
    Schedule("KL Optimal", "kl_optimal", kl_optimal),
    Schedule("Align Your Steps", "align_your_steps", align_your_steps),
    Schedule("Simple", "simple", simple),
    Schedule("Normal", "normal", normal),
    Schedule("DDIM", "ddim", ddim_uniform),
)}
AUTOMATIC = SCHEDULES["Automatic"]


def find_schedule(name: str) -> Schedule | None:
    """A schedule type by label, name or alias, in any case ("karras", "SGM Uniform", "sgm_uniform")."""
    key = name.strip().lower()
    spellings = lambda s: {s.label.lower(), s.name, *(a.lower() for a in s.aliases)}  # noqa: E731
    return next((s for s in SCHEDULES.values() if key in spellings(s)), None)


def schedule(name: str) -> Schedule:
    """A schedule type by any of its spellings; unknown names get the list (and a near match)."""
    found = find_schedule(name)
    if found is None:
        import difflib

        near = difflib.get_close_matches(name, list(SCHEDULES), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise TunelabError(f"unknown schedule type {name!r}{hint}; choose one of: {', '.join(SCHEDULES)}")
    return found


# --- DDIM / PLMS / UniPC timesteps and the image-to-image plan ---------------------------------------------


def timesteps_for(steps: int) -> torch.Tensor:
    """A1111's timesteps for its timestep samplers: range(0, 1000, 1000 // steps) + 1, clipped to
    999. Their count is ceil(1000 / (1000 // steps)), so e.g. 48 steps give 50 timesteps."""
    if not 1 <= steps <= 1000:
        raise TunelabError(f"steps must be between 1 and 1000 for DDIM, PLMS and UniPC, got {steps}")
    return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)


def img2img_steps(steps: int, denoise: float) -> tuple[int, int]:
    """(schedule length, t_enc) of an image-to-image pass of `steps` steps at denoising strength
    `denoise`, as A1111 runs the hires fix: a schedule of int(steps / denoise) steps whose last
    t_enc + 1 = steps steps run (48 at 0.7: 68 and 47, so it starts at sigma ~3.35 on SDXL)."""
    if not 0 < denoise <= 1:
        raise TunelabError(f"hires denoise must be in (0, 1], got {denoise}")
    return int(steps / min(denoise, 0.999)), steps - 1
