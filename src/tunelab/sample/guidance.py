"""Guidance for sampling: CFG, CFG++, PAG, SEG, guidance rescale, FreeU and the hires-fix plan.

What is reused and what is hand-written, and why:

- FreeU is diffusers' own (`UNet2DConditionModel.enable_freeu`); only the SDXL defaults live here.
- Guidance rescale (Lin et al. 2023, for zero-terminal-SNR models) is diffusers' `rescale_noise_cfg`.
- CFG++ (Chung et al. 2024) is written here: diffusers has no CFG++ sampler. The guided prediction
  (with a small scale lambda; A1111 convention: lambda = CFG scale / 12.5) gives the denoised
  estimate, but the step back to the next noise level uses the *unconditional* noise estimate.
  `EulerCFGPPScheduler` and `DDIMCFGPPScheduler` are diffusers schedulers whose `step` does that;
  the pure step functions are tested on hand-worked numbers.
- PAG (Ahn et al. 2024) and SEG (Hong 2024) are written as one attention processor: diffusers'
  PAG processors assume their own pipeline's fixed batch layout ([uncond, cond, perturbed]) and
  cannot be combined with SEG, while the field runs PAG and SEG together. Our `GuidedUNet` stacks
  every branch in one batch, [uncond, cond, pag, seg] (only those in use), so one UNet call per
  step serves them all. PAG replaces the self-attention map with the identity (output = V); SEG
  blurs the self-attention query with a Gaussian of `seg_sigma` latent pixels (infinite sigma =
  the query's mean, i.e. uniform attention). The blur is an exact matrix on the token grid with
  mirrored edges, so it works at any size, even where the kernel is wider than the feature map
  (SDXL's middle block is 32 x 32 tokens at 1024 px, the toy's 2 x 2; sigma 11 spans 67 taps).

The combined prediction is
    out = u + s (c - u) + pag_scale (c - p) + seg_scale (c - g)
with u/c the unconditional/conditional outputs, p/g the PAG/SEG-perturbed conditional ones, and
s the CFG scale (lambda for CFG++). Everything is linear in the model output, so it holds for
epsilon and v-prediction alike.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

CFGPP_DIVISOR = 12.5  # A1111: the CFG++ lambda is the user's CFG scale / 12.5 (CFG 6 -> 0.48)
FREEU_SDXL = {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}  # the FreeU authors' SDXL values


@dataclass
class Guidance:
    """How one image is guided. Scales of 0 switch a method off."""

    cfg: float = 7.0  # classifier-free guidance scale (for CFG++ divided by 12.5)
    cfg_pp: bool = False  # CFG++ (DDIM and Euler only)
    pag_scale: float = 0.0  # perturbed-attention guidance; the field uses 1
    pag_layers: str = "mid"  # which self-attention layers PAG perturbs (see select_layers)
    seg_scale: float = 0.0  # smoothed-energy guidance; the paper uses 3
    seg_sigma: float = 11.0  # SEG blur in latent pixels; inf = uniform attention
    seg_layers: str = "mid"
    rescale: float = 0.0  # guidance rescale phi; 0.7 for zero-terminal-SNR models

    @property
    def scale(self) -> float:
        return self.cfg / CFGPP_DIVISOR if self.cfg_pp else self.cfg

    def branches(self) -> list[str]:
        """Batch layout of one guided UNet call. The unconditional branch is skipped at scale 1
        without CFG++ (it would cancel out), as A1111 does."""
        names = ["uncond", "cond"] if self.cfg_pp or self.scale != 1.0 else ["cond"]
        return names + (["pag"] if self.pag_scale else []) + (["seg"] if self.seg_scale else [])


def combine(outputs: dict[str, torch.Tensor], g: Guidance) -> torch.Tensor:
    """The guided prediction from the branch outputs (see the module docstring)."""
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

    c = outputs["cond"]
    u = outputs.get("uncond", c)
    out = u + g.scale * (c - u)
    if "pag" in outputs:
        out = out + g.pag_scale * (c - outputs["pag"])
    if "seg" in outputs:
        out = out + g.seg_scale * (c - outputs["seg"])
    if g.rescale > 0:
        out = rescale_noise_cfg(out, c, guidance_rescale=g.rescale)
    return out


# --- CFG++ ------------------------------------------------------------------------------------------------


def euler_cfgpp_step(sample: torch.Tensor, sigma: float, sigma_next: float, x0_guided: torch.Tensor,
                     x0_uncond: torch.Tensor) -> torch.Tensor:
    """x_next = x0_guided + sigma_next * eps_uncond, with eps_uncond = (x - x0_uncond) / sigma."""
    return x0_guided + sigma_next * (sample - x0_uncond) / sigma


def ddim_cfgpp_step(alpha_prev: float, x0_guided: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """x_prev = sqrt(a_prev) x0_guided + sqrt(1 - a_prev) eps_uncond (DDIM, eta 0)."""
    return alpha_prev**0.5 * x0_guided + (1 - alpha_prev) ** 0.5 * eps_uncond


class _CFGPPMixin:
    """`uncond_source` is set by the pipeline to the GuidedUNet whose last call produced the
    prediction being stepped; its `last_uncond` is the unconditional output of that call."""

    uncond_source: Any = None

    def _uncond(self, like: torch.Tensor) -> torch.Tensor:
        src = self.uncond_source
        if src is None or src.last_uncond is None or src.last_uncond.shape != like.shape:
            raise RuntimeError("a CFG++ scheduler needs the GuidedUNet that made the prediction (uncond_source)")
        return src.last_uncond


class EulerCFGPPScheduler(_CFGPPMixin, EulerDiscreteScheduler):
    """Euler with CFG++: denoise with the guided output, re-noise with the unconditional one."""

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any,
             return_dict: bool = True, **kwargs: Any):
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        x = sample.to(torch.float32)
        x0_g = self._x0(model_output.float(), x, sigma)
        x0_u = self._x0(self._uncond(model_output).float(), x, sigma)
        prev = euler_cfgpp_step(x, sigma, sigma_next, x0_g, x0_u).to(model_output.dtype)
        self._step_index += 1
        return EulerDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0_g) if return_dict else (prev, x0_g)

    def _x0(self, out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.config.prediction_type == "v_prediction":
            return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        return x - sigma * out  # epsilon


class DDIMCFGPPScheduler(_CFGPPMixin, DDIMScheduler):
    """DDIM (eta 0) with CFG++."""

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any,
             return_dict: bool = True, **kwargs: Any):
        t = int(timestep)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps  # as DDIMScheduler
        a = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        x0_g, _ = self._x0_eps(model_output.float(), sample.float(), a)
        _, eps_u = self._x0_eps(self._uncond(model_output).float(), sample.float(), a)
        prev = ddim_cfgpp_step(float(a_prev), x0_g, eps_u).to(model_output.dtype)
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0_g) if return_dict else (prev, x0_g)

    def _x0_eps(self, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.prediction_type == "v_prediction":
            return a**0.5 * x - (1 - a) ** 0.5 * out, a**0.5 * out + (1 - a) ** 0.5 * x
        return (x - (1 - a) ** 0.5 * out) / a**0.5, out


# --- SEG: Gaussian blur of the query on the token grid ---------------------------------------------------


def _mirror(i: int, n: int) -> int:
    """Mirror an index into [0, n) with the edge sample repeated (numpy's "symmetric" padding),
    folding as often as needed when the kernel is wider than the grid. With this boundary the blur
    tends to the plain mean as sigma grows, which is SEG's infinite-blur limit (uniform attention);
    mirroring without the edge would weigh edge tokens half."""
    i %= 2 * n
    return i if i < n else 2 * n - 1 - i


@lru_cache(maxsize=64)
def blur_matrix(n: int, sigma: float) -> torch.Tensor:
    """(n, n) matrix of a 1-D Gaussian blur with mirrored edges: row i holds the weights that
    output position i gives each input position. Radius 3 sigma; sigma inf = the mean."""
    if math.isinf(sigma):
        return torch.full((n, n), 1.0 / n)
    if sigma <= 0:
        return torch.eye(n)
    radius = math.ceil(3 * sigma)
    m = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for k in range(-radius, radius + 1):
            m[i, _mirror(i + k, n)] += math.exp(-(k * k) / (2 * sigma * sigma))
    return (m / m.sum(dim=1, keepdim=True)).float()


def smooth_query(query: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """Blur (B, H*W, C) queries over their H x W grid: separable, rows then columns."""
    b, n, c = query.shape
    q = query.reshape(b, height, width, c).float()
    q = torch.einsum("ih,bhwc->biwc", blur_matrix(height, sigma).to(q.device), q)
    q = torch.einsum("jw,biwc->bijc", blur_matrix(width, sigma).to(q.device), q)
    return q.reshape(b, n, c).to(query.dtype)


def grid_of(n_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The H x W grid of a block's tokens: the latent size divided by 2^k (ceil, as the UNet's
    stride-2 convolutions round up)."""
    h, w = latent_hw
    while h * w > n_tokens and h > 1:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != n_tokens:
        raise RuntimeError(f"cannot place {n_tokens} tokens on a grid of latent size {latent_hw}")
    return h, w


# --- the perturbed self-attention processor --------------------------------------------------------------


@dataclass
class BranchPlan:
    """Which rows of the current UNet batch are perturbed, set by GuidedUNet before each call."""

    pag_rows: slice | None = None
    seg_rows: slice | None = None
    seg_sigma: float = 11.0
    latent_hw: tuple[int, int] = (1, 1)


@dataclass
class PerturbedSelfAttnProcessor:
    """Self-attention (attn1 of a transformer block) with PAG and/or SEG on some batch rows."""

    plan: BranchPlan
    pag: bool = False  # is this layer one of the PAG layers
    seg: bool = False
    calls: int = field(default=0, compare=False)  # how often a perturbation ran (tests)

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any, **kwargs: Any):
        if hidden_states.ndim != 3 or encoder_hidden_states is not None or attention_mask is not None:
            raise RuntimeError("PAG/SEG apply to transformer self-attention layers (attn1) only")
        b, n, _ = hidden_states.shape  # (B, N, C)
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        seg_rows = self.plan.seg_rows if self.seg else None
        if seg_rows is not None:
            h, w = grid_of(n, self.plan.latent_hw)
            q = q.clone()
            q[seg_rows] = smooth_query(q[seg_rows], h, w, self.plan.seg_sigma)
            self.calls += 1
        heads, d = attn.heads, k.shape[-1] // attn.heads
        qh, kh, vh = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, d)
        if attn.norm_q is not None:
            qh = attn.norm_q(qh)
        if attn.norm_k is not None:
            kh = attn.norm_k(kh)
        out = F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(b, n, heads * d).to(q.dtype)
        if self.pag and self.plan.pag_rows is not None:
            out = out.clone()
            out[self.plan.pag_rows] = v[self.plan.pag_rows]  # identity attention map: each token sees itself
            self.calls += 1
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


_LAYER_ALIASES = {"mid": "mid_block.", "middle": "mid_block.", "down": "down_blocks.", "up": "up_blocks.",
                  "input": "down_blocks.", "output": "up_blocks."}


def select_layers(names: list[str], spec: str) -> list[str]:
    """Self-attention processor names matching a comma-separated spec.

    Each item: "mid", "down", "up" (all of a part), "down.2" / "up.0" (one level), "up.0.1"
    (one transformer of a level), or a literal prefix of diffusers' names.
    """
    self_attn = [n for n in names if n.endswith("attn1.processor")]
    chosen: list[str] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        head, *rest = item.split(".")
        prefix = item
        if head in _LAYER_ALIASES:
            prefix = _LAYER_ALIASES[head] + (rest[0] + "." if rest else "")
            prefix += f"attentions.{rest[1]}." if len(rest) > 1 else ""
        hits = [n for n in self_attn if n.startswith(prefix)]
        if not hits:
            raise TunelabError(f"layer {item!r} matches no self-attention layer; use mid, down.N, up.N or up.N.M "
                               f"(this model has: {', '.join(sorted({n.split('.attentions')[0] for n in self_attn}))})")
        chosen += [h for h in hits if h not in chosen]
    return chosen


@contextlib.contextmanager
def perturbed_attention(unet: torch.nn.Module, g: Guidance, plan: BranchPlan) -> Iterator[dict[str, Any]]:
    """Install PAG/SEG processors on the chosen layers for the duration of the block."""
    if not (g.pag_scale or g.seg_scale):
        yield {}
        return
    saved = dict(unet.attn_processors)
    pag = set(select_layers(list(saved), g.pag_layers)) if g.pag_scale else set()
    seg = set(select_layers(list(saved), g.seg_layers)) if g.seg_scale else set()
    mine = {n: PerturbedSelfAttnProcessor(plan, n in pag, n in seg) for n in pag | seg}
    unet.set_attn_processor({n: mine.get(n, p) for n, p in saved.items()})
    try:
        yield mine
    finally:
        unet.set_attn_processor(saved)


# --- the guided UNet the pipeline calls --------------------------------------------------------------------


class GuidedUNet(torch.nn.Module):
    """Stands in for the pipeline's UNet during one generation: receives the pipeline's
    conditional batch, runs every guidance branch in one UNet call, returns the combined output.

    The pipeline is called with guidance_scale=1 (so it does no CFG of its own); the negative
    conditioning lives here. Attributes the pipeline reads (config, dtype, add_embedding, ...)
    are the wrapped UNet's.
    """

    def __init__(self, unet: torch.nn.Module, g: Guidance, neg_context: torch.Tensor, neg_pooled: torch.Tensor,
                 plan: BranchPlan):
        super().__init__()
        self.unet, self.g, self.plan = unet, g, plan
        self.neg_context, self.neg_pooled = neg_context, neg_pooled  # (1, 77*chunks, D), (1, P)
        self.last_uncond: torch.Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("unet"), name)

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict[str, torch.Tensor], return_dict: bool = False, **kwargs: Any):
        names = self.g.branches()
        b = sample.shape[0]  # (B, 4, h, w)
        neg_ctx = self.neg_context.to(encoder_hidden_states).expand(b, -1, -1)
        neg_pool = self.neg_pooled.to(added_cond_kwargs["text_embeds"]).expand(b, -1)
        ctx = torch.cat([neg_ctx if n == "uncond" else encoder_hidden_states for n in names])
        pooled = torch.cat([neg_pool if n == "uncond" else added_cond_kwargs["text_embeds"] for n in names])
        rows = {n: slice(i * b, (i + 1) * b) for i, n in enumerate(names)}
        self.plan.pag_rows, self.plan.seg_rows = rows.get("pag"), rows.get("seg")
        self.plan.latent_hw = (sample.shape[-2], sample.shape[-1])
        out = self.unet(
            torch.cat([sample] * len(names)), timestep, encoder_hidden_states=ctx,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": added_cond_kwargs["time_ids"].repeat(len(names), 1)},
            return_dict=False, **{k: v for k, v in kwargs.items() if k in ("timestep_cond", "cross_attention_kwargs")},
        )[0].to(sample.dtype)  # in the latents' dtype: a UNet that accelerate prepared returns float32 whatever its own
        parts = dict(zip(names, out.chunk(len(names))))
        self.last_uncond = parts.get("uncond", parts["cond"])
        return (combine(parts, self.g),)


# --- FreeU and hires fix ------------------------------------------------------------------------------------


@contextlib.contextmanager
def freeu(unet: torch.nn.Module, params: dict[str, float] | None) -> Iterator[None]:
    """FreeU (diffusers' implementation) on for the block when params is given (e.g. FREEU_SDXL)."""
    if params is None:
        yield
        return
    unet.enable_freeu(**params)
    try:
        yield
    finally:
        unet.disable_freeu()


def hires_plan(steps: int, denoise: float) -> tuple[int, int]:
    """(first step index, steps actually run) of the hires pass, as diffusers' img2img does it:
    a `steps`-long schedule of which the last round(down)(steps * denoise) steps run."""
    if not 0 < denoise <= 1:
        raise TunelabError(f"hires denoise must be in (0, 1], got {denoise}")
    run = min(int(steps * denoise), steps)
    if run < 1:
        raise TunelabError(f"hires pass would run 0 steps ({steps} steps x denoise {denoise}); raise hires steps or denoise")
    return steps - run, run


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The hires target size, rounded to whole latent pixels (multiples of 8)."""
    return max(8, round(width * scale / 8) * 8), max(8, round(height * scale / 8) * 8)


def upscale_latents(latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """A1111's "Latent" upscaler: bilinear resize of (B, 4, h, w) latents to the target pixel size / 8."""
    return F.interpolate(latents.float(), size=(height // 8, width // 8), mode="bilinear",
                         align_corners=False).to(latents.dtype)
