"""Training objectives: noise, timesteps and targets for epsilon, v-prediction and rectified flow.

The noise schedule (betas, and the zero-terminal-SNR rescale) comes from diffusers'
`DDPMScheduler`, built from the preset's scheduler config, so training uses exactly the
`alphas_cumprod` that diffusers' samplers use at inference. The few lines that draw noise and
timesteps and form targets are written here, because the trainer needs every random number to come
from one explicit `torch.Generator` (exact resume) in a fixed, documented order, and a pure
`make(latents, noise, timesteps)` that probes call with fixed noise and timesteps.

Formulas (x0 = clean latents, n = noise, a_t = alphas_cumprod[t]):

    epsilon   x_t = sqrt(a_t) x0 + sqrt(1 - a_t) n           target = n
    v         x_t as epsilon                                 target = sqrt(a_t) n - sqrt(1 - a_t) x0
              (Salimans & Ho 2022, "Progressive distillation", v = alpha n - sigma x0)
    SNR       snr_t = a_t / (1 - a_t)
    zero-terminal SNR (Lin et al. 2023, "Common diffusion noise schedules and sample steps are
              flawed", Alg. 1): shift sqrt(a) so the last is 0 and rescale so the first is unchanged;
              then a_T = 0, snr_T = 0 (pure noise at the last step; needs v-prediction).
    flow      (rectified flow, Liu et al. 2022; SD3's training recipe, Esser et al. 2024)
              t = sigmoid(u), u ~ N(mean, std)              logit-normal timesteps
              t' = shift t / (1 + (shift - 1) t)            timestep shift (shift > 1 = noisier)
              x_t = (1 - t') x0 + t' n                       target = n - x0
              the UNet gets t' * 1000; snr_t = ((1 - t') / t')^2

Noise offset (Guttenberg 2023, "Diffusion with offset noise"): n = N(0, 1) + offset * N(0, 1) of
shape (B, C, 1, 1), a per-image, per-channel constant shift that lets the model learn very dark and
bright images.

Options users expect (kohya's sd-scripts, `library/train_util.py` and `custom_train_functions.py`):
random offset strength (offset x U(0, 1) per batch); multi-resolution noise (`pyramid_noise_like`:
for level i, noise of size (H, W) / r^i, r = 2 + 2 U(0, 1), upsampled bilinearly and added with
weight discount^i, stopping at a side of 1; the sum divided by its std); input-perturbation noise
(the noisy input is formed with noise + gamma x N(0, 1), gamma x U(0, 1) with random strength; the
target keeps the noise); a timestep range [min_timestep, max_timestep) for epsilon / v.

Timestep bias (diffusers' examples/text_to_image/train_text_to_image_sdxl.py, `generate_timestep_weights`
and its `torch.multinomial(weights, bsz, replacement=True)`): weights 1 for every timestep, times the
multiplier on the biased span -- the lowest `int(portion T)` ('earlier'), the highest ('later'), or
[begin, end) ('range') -- then normalised; timesteps are drawn from them with replacement. Here the
weights of timesteps outside [min_timestep, max_timestep) are 0, so the window and the bias compose
(config refuses a bias that changes nothing inside the window). One difference, on purpose: a portion
so small that int(portion T) = 0 biases nothing (diffusers' `slice(-0, None)` would bias every
timestep for 'later'; config refuses both as changing nothing).

Random draws, in this order, all from the given generator on the generator's device (so a CPU
generator gives the same numbers whatever device the latents live on): noise (B, C, H, W); the
offset's random strength (1) when on; offset noise (B, C, 1, 1) when noise_offset > 0; per
multi-resolution level r (1) and its noise; the input-perturbation strength (1) when random and its
noise (B, C, H, W) when ip_noise_gamma > 0; timesteps (B,) -- randint for epsilon / v (multinomial
over the bias weights when a timestep bias is on), normal for flow. With every option off, the draws
are the same as before they existed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import torch

from tunelab.config import ObjectiveSection
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

FLOW_TIMESTEP_SCALE = 1000.0  # the UNet's timestep embedding expects 0..1000


class NoisedBatch(NamedTuple):
    noisy: torch.Tensor  # (B, C, H, W) x_t, in the latents' dtype: the UNet input
    timesteps: torch.Tensor  # (B,) what the UNet gets: long indices (eps / v) or float t * 1000 (flow)
    target: torch.Tensor  # (B, C, H, W) float32: what the UNet output is compared with
    snr: torch.Tensor  # (B,) float32 signal-to-noise ratio of each sample (min-SNR, huber 'snr')


def alphas_cumprod(scheduler: Mapping[str, Any], zero_terminal_snr: bool = False) -> torch.Tensor:
    """(T,) float32 alphas_cumprod of a diffusers scheduler config, optionally rescaled to zero SNR."""
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler(
        num_train_timesteps=scheduler["num_train_timesteps"],
        beta_start=scheduler["beta_start"],
        beta_end=scheduler["beta_end"],
        beta_schedule=scheduler["beta_schedule"],
        rescale_betas_zero_snr=zero_terminal_snr,
    )
    return ddpm.alphas_cumprod.clone()


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Flow timestep shift t' = shift t / (1 + (shift - 1) t); shift 1 is the identity."""
    return shift * t / (1 + (shift - 1) * t)


def _randn(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    # drawn in float32 on the generator's device: the numbers do not depend on the latents' device/dtype
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)


def _rand(generator: torch.Generator) -> float:
    return float(torch.rand((1,), generator=generator, device=generator.device, dtype=torch.float32))


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """kohya's `pyramid_noise_like` (multi-resolution noise), drawn from `generator`."""
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = 2.0 + 2.0 * _rand(generator)
        hn, wn = max(1, int(h / (r ** i))), max(1, int(w / (r ** i)))
        level = _randn((b, c, hn, wn), generator).to(noise.device)
        out = out + torch.nn.functional.interpolate(level, size=(h, w), mode="bilinear") * discount ** i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


BIAS_STRATEGIES = ("none", "earlier", "later", "range")


def bias_span(strategy: str, num_timesteps: int, portion: float, begin: int, end: int) -> tuple[int, int]:
    """The biased timesteps [lo, hi) of a strategy other than 'none' (module docstring)."""
    n = int(portion * num_timesteps)  # diffusers' num_to_bias
    if strategy == "earlier":
        return 0, n
    if strategy == "later":
        return num_timesteps - n, num_timesteps
    if strategy == "range":
        return begin, end
    raise ValueError(f"timestep bias strategy {strategy!r}: one of {', '.join(BIAS_STRATEGIES[1:])} has a span")


def timestep_weights(strategy: str, num_timesteps: int, multiplier: float = 1.0, portion: float = 0.25,
                     begin: int = 0, end: int = 1000) -> torch.Tensor:
    """(T,) float32 sampling weights summing to 1: diffusers' `generate_timestep_weights` (module docstring)."""
    weights = torch.ones(num_timesteps, dtype=torch.float32)
    if strategy == "none":
        return weights / num_timesteps
    lo, hi = bias_span(strategy, num_timesteps, portion, begin, end)
    if not 0 <= lo <= hi <= num_timesteps:
        raise TunelabError(f"objective.timestep_bias_begin / _end ({begin}, {end}) must lie in 0..{num_timesteps} "
                           f"(the schedule's {num_timesteps} timesteps)")
    weights[lo:hi] *= multiplier
    return weights / weights.sum()


@dataclass(frozen=True)
class NoiseOptions:
    """The noise and timestep options of the module docstring (all off by default)."""

    offset_random_strength: bool = False
    multires_iterations: int = 0
    multires_discount: float = 0.3
    ip_noise_gamma: float = 0.0
    ip_random_strength: bool = False
    min_timestep: int = 0
    max_timestep: int = 1000
    bias_strategy: str = "none"
    bias_multiplier: float = 1.0
    bias_portion: float = 0.25
    bias_begin: int = 0
    bias_end: int = 1000

    @classmethod
    def from_config(cls, objective: ObjectiveSection, loss: Any) -> "NoiseOptions":
        ob = objective
        return cls(loss.noise_offset_random_strength, loss.multires_noise_iterations, loss.multires_noise_discount,
                   loss.ip_noise_gamma, loss.ip_noise_gamma_random_strength, ob.min_timestep, ob.max_timestep,
                   ob.timestep_bias_strategy, ob.timestep_bias_multiplier, ob.timestep_bias_portion,
                   ob.timestep_bias_begin, ob.timestep_bias_end)


class Objective:
    """One objective (`epsilon`, `v`, `flow`) over a fixed noise schedule; holds no model."""

    def __init__(self, prediction: str, alphas_cumprod: torch.Tensor, noise_offset: float = 0.0,
                 flow_logit_mean: float = 0.0, flow_logit_std: float = 1.0, flow_shift: float = 1.0,
                 options: "NoiseOptions | None" = None) -> None:
        if prediction not in ("epsilon", "v", "flow"):
            raise ValueError(f"prediction must be 'epsilon', 'v' or 'flow', got {prediction!r}")
        self.prediction = prediction
        self.alphas_cumprod = alphas_cumprod.to(torch.float32)  # (T,)
        self.num_train_timesteps = len(alphas_cumprod)
        self.noise_offset = noise_offset
        self.flow_logit_mean, self.flow_logit_std, self.flow_shift = flow_logit_mean, flow_logit_std, flow_shift
        self.options = options or NoiseOptions()
        self.timestep_weights = self._biased_weights()  # (T,) or None: uniform draws (randint)

    @classmethod
    def from_config(cls, objective: ObjectiveSection, scheduler: Mapping[str, Any], noise_offset: float = 0.0,
                    loss: Any = None) -> "Objective":
        """Build from the run file's [objective] section and `load_arch(arch).scheduler`; the
        [loss] section's noise options when training (`loss`), none for probes."""
        ac = alphas_cumprod(scheduler, objective.zero_terminal_snr)
        opts = NoiseOptions.from_config(objective, loss) if loss is not None else None
        return cls(objective.prediction, ac, noise_offset, objective.flow_logit_mean,
                   objective.flow_logit_std, objective.flow_shift, opts)

    def _biased_weights(self) -> torch.Tensor | None:
        """The timestep bias' weights inside [min_timestep, max_timestep), or None without a bias."""
        o = self.options
        if o.bias_strategy == "none" or self.prediction == "flow":  # config refuses a bias with flow
            return None
        w = timestep_weights(o.bias_strategy, self.num_train_timesteps, o.bias_multiplier, o.bias_portion,
                             o.bias_begin, o.bias_end)
        w[:o.min_timestep] = 0.0
        w[o.max_timestep:] = 0.0
        return w

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) SNR of UNet timesteps (indices for eps / v, t * 1000 for flow)."""
        if self.prediction == "flow":
            t = timesteps.float() / FLOW_TIMESTEP_SCALE
            return ((1 - t) / t) ** 2
        a = self.alphas_cumprod.to(timesteps.device)[timesteps.long()]
        return a / (1 - a)

    def draw_noise(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, C, H, W) float32 noise on the latents' device, with the noise offset added."""
        b, c = latents.shape[:2]
        o = self.options
        noise = _randn(tuple(latents.shape), generator)
        if self.noise_offset > 0:
            offset = self.noise_offset * (_rand(generator) if o.offset_random_strength else 1.0)
            noise = noise + offset * _randn((b, c, 1, 1), generator)
        if o.multires_iterations > 0:
            noise = pyramid_noise(noise, generator, o.multires_iterations, o.multires_discount)
        return noise.to(latents.device)

    def draw_timesteps(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """(B,) UNet timesteps on the generator's device: long in [0, T) or float t' * 1000 in (0, 1000)."""
        if self.prediction == "flow":
            u = _randn((batch,), generator) * self.flow_logit_std + self.flow_logit_mean
            t = shift_timesteps(torch.sigmoid(u), self.flow_shift)
            return t * FLOW_TIMESTEP_SCALE
        o = self.options
        if self.timestep_weights is not None:  # diffusers' multinomial over the bias weights
            w = self.timestep_weights.to(generator.device)
            return torch.multinomial(w, batch, replacement=True, generator=generator)
        high = min(o.max_timestep, self.num_train_timesteps)
        return torch.randint(o.min_timestep, high, (batch,), generator=generator, device=generator.device)

    def make(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> NoisedBatch:
        """The noisy input and target for given noise and timesteps (pure; probes use it directly)."""
        timesteps = timesteps.to(latents.device)
        x0, n = latents.float(), noise.to(latents.device, torch.float32)
        if self.prediction == "flow":
            t = (timesteps.float() / FLOW_TIMESTEP_SCALE).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
            noisy, target = (1 - t) * x0 + t * n, n - x0
        else:
            a = self.alphas_cumprod.to(latents.device)[timesteps.long()].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
            alpha, sigma = a.sqrt(), (1 - a).sqrt()
            noisy = alpha * x0 + sigma * n
            target = n if self.prediction == "epsilon" else alpha * n - sigma * x0
        return NoisedBatch(noisy.to(latents.dtype), timesteps, target, self.snr(timesteps))

    def sample(self, latents: torch.Tensor, generator: torch.Generator) -> NoisedBatch:
        """Draw noise and timesteps from `generator` (order: module docstring) and form the batch."""
        noise = self.draw_noise(latents, generator)
        o = self.options
        perturbed = None
        if o.ip_noise_gamma > 0:
            gamma = o.ip_noise_gamma * (_rand(generator) if o.ip_random_strength else 1.0)
            perturbed = noise + gamma * _randn(tuple(latents.shape), generator).to(noise.device)
        timesteps = self.draw_timesteps(latents.shape[0], generator)
        if perturbed is None:
            return self.make(latents, noise, timesteps)
        noisy = self.make(latents, perturbed, timesteps)  # the input sees the perturbed noise,
        return noisy._replace(target=self.make(latents, noise, timesteps).target)  # the target does not
