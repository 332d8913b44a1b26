"""Guidance for sampling: CFG, CFG++, PAG, SEG, guidance rescale, FreeU and the hires-fix sizes.

What is reused and what is hand-written, and why:

- FreeU is diffusers' own (`UNet2DConditionModel.enable_freeu`); only the SDXL defaults live here.
- Guidance rescale (Lin et al. 2023, for zero-terminal-SNR models) is diffusers' `rescale_noise_cfg`.
- CFG++ (Chung et al. 2024): the guided prediction, with a small scale lambda, gives the denoised
  estimate, and the step back to the next noise level uses the *unconditional* one, which
  `GuidedUNet.last_uncond` keeps; the samplers that do it are in samplers.py. Lambda is the CFG
  scale / `Guidance.cfg_divisor`: 12.5 for A1111's DDIM CFG++, 1 for ComfyUI's Euler CFG++.
- PAG (Ahn et al. 2024) and SEG (Hong 2024) are written as one attention processor: diffusers'
  PAG processors assume their own pipeline's fixed batch layout ([uncond, cond, perturbed]) and
  cannot be combined with SEG, while the field runs PAG and SEG together. Our `GuidedUNet` stacks
  every branch in one batch, [uncond, cond, pag, seg] (only those in use), so one UNet call per
  step serves them all. PAG replaces the self-attention map with the identity (output = V); SEG
  blurs the self-attention query over the layer's token grid with a Gaussian of `seg_sigma`
  *tokens* (SDXL's middle block is 32 x 32 tokens at 1024 px: one token = 4 latent pixels = 32
  image pixels), exactly as the SEG reference does it (SusungHong/SEG-SDXL, pipeline_seg.py,
  `gaussian_blur_2d`; the same function in pamparamm/sd-perturbed-attention, the extension Forge
  and ComfyUI users run): ceil(6 sigma) taps rounded up to odd, capped at the map's width
  (33 taps on a 32-wide map), edges mirrored without repeating the edge token (torch's "reflect"
  padding); sigma above 9999 (the reference's "infinite" 9999999), inf or below 0 (the extension's
  -1) = the mean query, i.e. uniform attention. The blur is written as a matrix on the grid
  (`blur_matrix`), which also handles maps whose height is under half their width, where the
  reference's torch padding refuses to run (the reflection folds again, as numpy's does).

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

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

FREEU_SDXL = {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}  # the FreeU authors' SDXL values


@dataclass
class Guidance:
    """How one image is guided. Scales of 0 switch a method off."""

    cfg: float = 7.0  # classifier-free guidance scale (CFG++: lambda x cfg_divisor)
    cfg_pp: bool = False  # CFG++: the unconditional branch always runs (the sampler steps with it)
    cfg_divisor: float = 1.0  # the guidance scale is cfg / cfg_divisor (A1111's DDIM CFG++: 12.5)
    pag_scale: float = 0.0  # perturbed-attention guidance; the field uses 1
    pag_layers: str = "mid"  # which self-attention layers PAG perturbs (see select_layers)
    seg_scale: float = 0.0  # smoothed-energy guidance; the paper uses 3
    seg_sigma: float = 11.0  # SEG blur in tokens of the layer's grid; > 9999, inf or < 0 = uniform attention
    seg_layers: str = "mid"
    rescale: float = 0.0  # guidance rescale phi; 0.7 for zero-terminal-SNR models

    @property
    def scale(self) -> float:
        return self.cfg / self.cfg_divisor

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


# --- SEG: Gaussian blur of the query on the token grid ---------------------------------------------------


SEG_INFINITE = 9999.0  # the reference's threshold: a larger sigma is infinite blur (the mean query)


def seg_is_infinite(sigma: float) -> bool:
    """Infinite blur: sigma above 9999 (SEG-SDXL's `inf_blur_threshold`; its README's "infinite" is
    9999999), inf, or negative (pamparamm/sd-perturbed-attention's -1, its default)."""
    return sigma > SEG_INFINITE or sigma < 0


def seg_kernel_size(sigma: float, width: int) -> int:
    """Taps of the reference's Gaussian: ceil(6 sigma), made odd by adding one, capped at the
    largest odd number <= width + 1 (`gaussian_blur_2d` caps by the map's last axis, its width)."""
    c = math.ceil(6 * sigma)
    return min(c + 1 - c % 2, width - (width % 2 - 1))


def _reflect(i: int, n: int) -> int:
    """Index i mirrored into [0, n) without repeating the edge (torch's "reflect" padding:
    ... 2 1 | 0 1 2 ... n-1 | n-2 ...), folding again where a pad is wider than the side."""
    if n == 1:
        return 0
    i %= 2 * (n - 1)
    return i if i < n else 2 * (n - 1) - i


@lru_cache(maxsize=64)
def blur_matrix(n: int, sigma: float, width: int | None = None) -> torch.Tensor:
    """(n, n) matrix of the reference's 1-D blur along a side of n tokens on a map `width` tokens
    wide (default n: a square map): row i holds the weights output i gives each input. The
    kernel is normalised over its taps, in float64 (the reference uses float32: ~1e-7 apart).
    Sigma 0 = the identity (the reference would divide 0 by 0); infinite sigma = the mean."""
    if math.isnan(sigma):
        raise TunelabError("seg_sigma is NaN; give a blur in tokens (e.g. 11), or inf for uniform attention")
    if seg_is_infinite(sigma):
        return torch.full((n, n), 1.0 / n)
    size = seg_kernel_size(sigma, width or n) if sigma > 0 else 1
    half = size // 2
    taps = [math.exp(-0.5 * (k / sigma) ** 2) if sigma > 0 else 1.0 for k in range(-half, half + 1)]
    total = sum(taps)
    m = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for k, w in zip(range(-half, half + 1), taps):
            m[i, _reflect(i + k, n)] += w / total
    return m.float()


def smooth_query(query: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """Blur (B, H*W, C) queries over their H x W grid as the reference does: one 2-D kernel (the
    outer product of the 1-D one, sized by the width) applied separably, rows then columns;
    infinite sigma = every query replaced by the mean query."""
    b, n, c = query.shape
    if seg_is_infinite(sigma):
        return query.float().mean(dim=1, keepdim=True).expand(b, n, c).to(query.dtype)
    q = query.reshape(b, height, width, c).float()
    q = torch.einsum("ih,bhwc->biwc", blur_matrix(height, sigma, width).to(q.device), q)
    q = torch.einsum("jw,biwc->bijc", blur_matrix(width, sigma, width).to(q.device), q)
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


# --- the guided UNet the samplers call --------------------------------------------------------------------


class GuidedUNet(torch.nn.Module):
    """Stands in for the UNet during one generation (denoiser.py calls it): receives the
    conditional batch, runs every guidance branch in one UNet call (two when the negative prompt
    has another chunk count), returns the combined output.

    The negative conditioning lives here. Other attributes (config, dtype, ...) are the wrapped
    UNet's.
    """

    def __init__(self, unet: torch.nn.Module, g: Guidance, neg_context: torch.Tensor, neg_pooled: torch.Tensor,
                 plan: BranchPlan):
        super().__init__()
        self.unet, self.g, self.plan = unet, g, plan
        self.neg_context, self.neg_pooled = neg_context, neg_pooled  # (1, 77*chunks, D), (1, P)
        self.last_uncond: torch.Tensor | None = None
        # Set per call by the denoiser: the map from a branch's UNet output to the sampler's space
        # (denoised), applied before the branches combine, as A1111 combines (without CFG rescale,
        # which is defined on the UNet's outputs). The combination is linear, so this changes only
        # the rounding, which sigma_max 4519 of zero-terminal-SNR schedules amplifies.
        self.branch_map: Any = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("unet"), name)

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict[str, torch.Tensor], return_dict: bool = False, **kwargs: Any):
        names = self.g.branches()
        # A negative prompt of another chunk count than the prompt gets a UNet call of its own, as
        # A1111 does unless its "Pad prompt/negative prompt" option is on (prompts.encode_pair).
        apart = "uncond" in names and self.neg_context.shape[1] != encoder_hidden_states.shape[1]
        groups = [[n for n in names if n != "uncond"], ["uncond"]] if apart else [names]
        parts: dict[str, torch.Tensor] = {}
        for group in groups:
            parts.update(self._branches(group, sample, timestep, encoder_hidden_states, added_cond_kwargs, kwargs))
        if self.branch_map is not None and not self.g.rescale:
            parts = {n: self.branch_map(p) for n, p in parts.items()}
        self.last_uncond = parts.get("uncond", parts["cond"])
        return (combine(parts, self.g),)

    def _branches(self, names: list[str], sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                  added_cond_kwargs: dict[str, torch.Tensor], kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One UNet call for the named branches, stacked [names[0] rows, names[1] rows, ...]."""
        b = sample.shape[0]  # (B, 4, h, w)
        neg_ctx = self.neg_context.to(encoder_hidden_states).expand(b, -1, -1)
        neg_pool = self.neg_pooled.to(added_cond_kwargs["text_embeds"]).expand(b, -1)
        ctx = torch.cat([neg_ctx if n == "uncond" else encoder_hidden_states for n in names])
        pooled = torch.cat([neg_pool if n == "uncond" else added_cond_kwargs["text_embeds"] for n in names])
        rows = {n: slice(i * b, (i + 1) * b) for i, n in enumerate(names)}
        self.plan.pag_rows, self.plan.seg_rows = rows.get("pag"), rows.get("seg")
        self.plan.latent_hw = (sample.shape[-2], sample.shape[-1])
        if torch.is_tensor(timestep) and timestep.ndim == 1:  # one timestep per image: one per row
            timestep = timestep.repeat(len(names))
        out = self.unet(
            torch.cat([sample] * len(names)), timestep, encoder_hidden_states=ctx,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": added_cond_kwargs["time_ids"].repeat(len(names), 1)},
            return_dict=False, **{k: v for k, v in kwargs.items() if k in ("timestep_cond", "cross_attention_kwargs")},
        )[0].to(sample.dtype)  # in the latents' dtype: a UNet that accelerate prepared returns float32 whatever its own
        return dict(zip(names, out.chunk(len(names))))


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


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The hires target size as A1111 computes it (`calculate_target_resolution`: int(side x scale),
    not rounded to 8): the pass is conditioned on it, its latents are that // 8 (the image that
    comes out is a multiple of 8)."""
    size = int(width * scale), int(height * scale)
    if min(size) < 8:
        raise TunelabError(f"hires target {size[0]}x{size[1]} is smaller than one latent pixel; raise hires_scale")
    return size


def upscale_latents(latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """A1111's "Latent" upscaler: bilinear resize of (B, 4, h, w) latents to the target pixel size / 8."""
    return F.interpolate(latents.float(), size=(height // 8, width // 8), mode="bilinear",
                         align_corners=False).to(latents.dtype)
