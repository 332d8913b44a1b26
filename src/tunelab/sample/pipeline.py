"""Sampling SDXL checkpoints from tunelab-loaded modules, the way A1111 v1.10 samples them.

A render: the prompts are encoded (prompts.py: A1111 weighting, long prompts); each image's
initial noise comes from a CPU generator seeded with its seed (A1111's `rng.ImageRNG` with its
"CPU" RNG source, so an image depends neither on the device nor on its grid neighbours); one
sampling pass by an A1111 sampler (samplers.py) over the checkpoint's noise schedule
(schedules.py, from its prediction record: models/prediction.py) with a `GuidedUNet` as the model
(guidance.py: CFG, CFG++, PAG, SEG, FreeU; denoiser.py); then, with the hires fix, A1111's second
pass (`_hires`); and the VAE decode, converted to 8 bits as A1111 converts it (truncating).

Reused: the loaded diffusers modules (UNet, VAE, text encoders), diffusers' FreeU and guidance
rescale. Written here: the loop that joins them, with SDXL's size conditioning as A1111 and
diffusers give it (original size = target size = the pass's size, crop 0, 0), the hires fix and the
VAE override loading. No diffusers pipeline or scheduler is involved: their timestep spacings and
noise draws are not A1111's.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.errors import TunelabError
from tunelab.models.arch import Components, load_arch
from tunelab.models.prediction import PredictionRecord
from tunelab.sample import guidance as G
from tunelab.sample import samplers as SP
from tunelab.sample import schedules as S
from tunelab.sample.denoiser import Denoiser
from tunelab.sample.prompts import encode_pair

log = logging.getLogger(__name__)

SAMPLERS = SP.SAMPLERS  # A1111 sampler name -> SamplerSpec (samplers.py)
ALL_SAMPLERS = tuple(SP.SAMPLERS)
SCHEDULE_TYPES = tuple(S.SCHEDULES)
resolve_sampler = SP.split_sampler  # (sampler, schedule type) -> (SamplerSpec, Schedule); errors name the choices
canonical_sampler = SP.canonical_sampler
canonical_schedule = SP.canonical_schedule


# --- building -------------------------------------------------------------------------------------------


@dataclass
class SamplingModel:
    """The modules a render uses (the loaded ones, not copies), plus what the infotext needs to
    name the model."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: tuple[torch.nn.Module, torch.nn.Module]
    tokenizers: tuple[Any, Any]
    scheduler_config: dict[str, Any]
    prediction: PredictionRecord
    name: str = "model"
    hash: str | None = None
    vae_name: str | None = None

    @cached_property
    def noise(self) -> S.NoiseSchedule:
        return S.NoiseSchedule.of(self.scheduler_config, self.prediction)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def default_size(self) -> int:
        """The architecture's resolution in pixels (the UNet's sample size x the VAE's factor 8)."""
        return int(self.unet.config.sample_size) * 8


def build_pipeline(comps: Components, tokenizers: tuple[Any, Any], vae: torch.nn.Module | None = None,
                   name: str = "model", model_hash: str | None = None, vae_name: str | None = None) -> SamplingModel:
    """A SamplingModel over `comps`' own modules (nothing is copied or downloaded)."""
    pred = PredictionRecord.of(comps)
    pred.diffusers_name  # a record tunelab cannot sample is refused here, with the reason
    if pred != PredictionRecord():
        log.info("%s: %s", name, pred.describe())
    return SamplingModel(comps.unet, vae or comps.vae, (comps.text_encoder_1, comps.text_encoder_2), tokenizers,
                         dict(load_arch(comps.arch).scheduler), pred, name, model_hash, vae_name)


def load_vae(path: str | Path, arch: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A VAE override: a diffusers VAE folder, a full SGM checkpoint, or a lone VAE file in the
    SGM/LDM key layout (`encoder.down.0...`, as sdxl-vae-fp16-fix ships) or diffusers layout."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from tunelab.models import keys as K
    from tunelab.models.arch import build_components

    path = Path(path)
    if path.is_dir():
        return AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=dtype).eval()
    if not path.is_file():
        raise TunelabError(f"VAE {path} does not exist")
    sd = load_file(str(path))
    vae = build_components(arch, device="meta").vae
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in sd):  # diffusers says down_blocks/up_blocks
        sd = {K.VAE + k: v for k, v in sd.items()}  # a lone VAE in the LDM layout
    if any(k.startswith(K.VAE) for k in sd):
        rules = [r for r in K.rules_for_arch(arch) if r.component == "vae"]
        missing = [r.sgm for r in rules if r.sgm not in sd]
        if missing:
            raise TunelabError(f"{path}: not a {arch} VAE ({len(missing)} keys missing, e.g. {missing[0]})")
        sd = {n: t for r in rules for n, t in zip(r.names, K.from_sgm_tensor(r, sd[r.sgm]))}
    try:
        vae.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise TunelabError(f"{path}: does not fit the {arch} VAE: {detail}") from None
    return vae.to(dtype=dtype).eval() if dtype is not None else vae.eval()


# --- one image --------------------------------------------------------------------------------------------


@dataclass
class SampleSettings:
    """Everything that decides one image (besides the model). Field names are the grid's axis names."""

    prompt: str = ""
    negative: str = ""
    seed: int = 0
    steps: int = 28
    cfg: float = 5.0
    sampler: str = "Euler"  # an A1111 sampler name (samplers.py); "DPM++ 2M Karras" = DPM++ 2M + Karras
    schedule_type: str = "Automatic"  # A1111's "Schedule type": Automatic = the sampler's own (Karras for DPM++ 2M)
    width: int | None = None  # None: the architecture's resolution
    height: int | None = None
    clip_skip: int = 2
    pag_scale: float = 0.0
    pag_layers: str = "mid"
    seg_scale: float = 0.0
    seg_sigma: float = 11.0
    seg_layers: str = "mid"
    freeu: bool = False
    hires_scale: float = 1.0  # 1 = no hires fix
    hires_denoise: float = 0.7
    hires_steps: int = 0  # 0 = the same as steps
    hires_upscaler: str = "latent"  # latent (A1111 "Latent") or lanczos
    guidance_rescale: float | None = None  # None: 0.7 for zero-terminal-SNR models, else 0
    uncond: str = "zeros"  # an empty negative prompt: zeros (A1111's SDXL) or empty (encode "", ComfyUI)
    max_chunks: int = 3
    comma_backtrack: int = 20  # A1111's comma back-off when cutting 75-token chunks; 0 = cut at 75 (kohya, training)
    pad_conds: bool = False  # A1111's "Pad prompt/negative prompt": pad the shorter instead of a second UNet call
    clip_skip_te2: bool = False  # clip_skip on TE2 too (ComfyUI, the trainer); A1111 keeps TE2 penultimate

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def problems(self) -> list[str]:
        """Numbers no sampler can use, as 'name: why' (checked before any model loads: steps 0
        used to end in a ZeroDivisionError inside the scheduler, a negative width in torch)."""
        out = []
        for name, low in (("steps", 1), ("hires_steps", 0), ("clip_skip", 1), ("max_chunks", 1)):
            if getattr(self, name) < low:
                out.append(f"{name} must be at least {low}, got {getattr(self, name)}")
        for name in ("cfg", "pag_scale", "seg_scale"):
            if not getattr(self, name) >= 0:  # also refuses NaN
                out.append(f"{name} must be 0 or more, got {getattr(self, name)}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                out.append(f"{name} must be a positive multiple of 8 (the VAE's factor), got {value}")
        if not 0 < self.hires_denoise <= 1:
            out.append(f"hires_denoise must be in (0, 1], got {self.hires_denoise}")
        if self.hires_upscaler not in ("latent", "lanczos"):
            out.append(f"hires_upscaler must be 'latent' or 'lanczos', got {self.hires_upscaler!r}")
        if self.uncond not in ("zeros", "empty"):
            out.append(f"uncond must be 'zeros' (A1111) or 'empty' (encode the empty string), got {self.uncond!r}")
        if not 0 <= self.comma_backtrack <= 74:
            out.append(f"comma_backtrack must be 0..74 tokens (A1111's default 20; 0 = none), got {self.comma_backtrack}")
        try:
            spec, _ = resolve_sampler(self.sampler, self.schedule_type)
        except TunelabError:
            return out  # the names are refused where they are read, with their choices
        if self.steps < spec.min_steps:
            out.append(f"steps must be at least {spec.min_steps} for {spec.name} (its order), got {self.steps}")
        if spec.timesteps and self.steps > 1000:
            out.append(f"steps must be at most 1000 for {spec.name} (one per training timestep), got {self.steps}")
        return out


@dataclass
class Sample:
    image: Any  # PIL.Image
    settings: SampleSettings
    size: tuple[int, int]  # final (width, height)
    extras: dict[str, Any] = field(default_factory=dict)


def applied_rescale(s: SampleSettings, model: SamplingModel) -> float:
    """The CFG rescale phi a render applies: the setting, or unset 0.7 for zero-terminal-SNR models."""
    return s.guidance_rescale if s.guidance_rescale is not None else (0.7 if model.prediction.ztsnr else 0.0)


def _guidance(s: SampleSettings, model: SamplingModel, spec: SP.SamplerSpec) -> G.Guidance:
    if spec.cfg_pp and spec.cfg_divisor == 1 and s.cfg > 2 and (spec.name, s.cfg) not in _WARNED:
        _WARNED.add((spec.name, s.cfg))
        log.warning("%s takes the CFG scale as the CFG++ lambda itself (%s's convention): %g is far above the "
                    "usual 0.5-1.5 (A1111's DDIM CFG++ divides by %g instead)", spec.name, spec.source, s.cfg,
                    SP.CFGPP_DIVISOR)
    return G.Guidance(cfg=s.cfg, cfg_pp=spec.cfg_pp, cfg_divisor=spec.cfg_divisor, pag_scale=s.pag_scale,
                      pag_layers=s.pag_layers, seg_scale=s.seg_scale, seg_sigma=s.seg_sigma,
                      seg_layers=s.seg_layers, rescale=applied_rescale(s, model))


_WARNED: set[tuple[str, float]] = set()


class SeedNoise:
    """A1111's `rng.ImageRNG` with its "CPU" RNG source: one torch CPU generator per image, seeded
    with the image's seed. The first draw is the pass's initial noise; later draws are the extra
    noise ancestral samplers add, from the same generators (eta noise seed delta 0)."""

    def __init__(self, seeds: list[int], shape: tuple[int, int, int], device: torch.device):
        self.seeds = [int(seed) for seed in seeds]
        self.generators = [torch.Generator("cpu").manual_seed(seed) for seed in self.seeds]
        self.shape, self.device = shape, device  # shape (4, h, w) of one image

    def __call__(self) -> torch.Tensor:
        """The next (B, 4, h, w) draw, float32 on the model's device."""
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(self.device)


def _plan(model: SamplingModel, s: SampleSettings) -> tuple[SP.SamplerSpec, S.Schedule]:
    spec, sched = resolve_sampler(s.sampler, s.schedule_type)
    problems = s.problems()
    if problems:
        raise TunelabError("; ".join(problems))
    if model.prediction.type == "flow" and spec.name != "Euler":
        raise TunelabError(f"sampler {s.sampler!r} cannot sample a rectified-flow model; use Euler "
                           "(the flow-matching Euler sampler, as ComfyUI's ModelSamplingSD3 + euler)")
    if model.prediction.continuous and spec.timesteps:
        raise TunelabError(f"sampler {s.sampler!r} steps on 1000 discrete timesteps and cannot sample "
                           f"{model.prediction.describe()} (continuous EDM sigmas); choose a k-diffusion sampler "
                           "such as Euler or DPM++ 2M")
    return spec, sched


def _sample(model: SamplingModel, s: SampleSettings, plan: tuple[SP.SamplerSpec, S.Schedule], g: G.Guidance,
            cond: tuple[Any, Any], size_hw: tuple[int, int], noise: SeedNoise, steps: int,
            init: torch.Tensor | None = None, denoise: float = 1.0) -> torch.Tensor:
    """One sampling pass: from noise (txt2img) or from `init` latents at `denoise` (img2img, as
    A1111's `sample_img2img`); returns the (B, 4, h, w) float32 latents."""
    spec, sched = plan
    pos, neg = cond
    unet, ns = model.unet, model.noise
    branch_plan = G.BranchPlan(seg_sigma=s.seg_sigma)
    guided = G.GuidedUNet(unet, g, neg.context.to(unet.dtype), neg.pooled.to(unet.dtype), branch_plan)
    h, w = size_hw  # SDXL's size conditioning: original size = target size = this pass's, crop (0, 0)
    time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).repeat(len(noise.generators), 1)
    device = model.device
    den = Denoiser(guided, ns, pos.context.to(device), pos.pooled.to(device), time_ids.to(device))
    with torch.no_grad(), G.perturbed_attention(unet, g, branch_plan), G.freeu(unet, G.FREEU_SDXL if s.freeu else None):
        if spec.timesteps:
            return _timestep_pass(spec, ns, den, noise, steps, init, denoise)
        if init is None:
            sigmas = every = SP.sigmas_for(spec, sched, ns, steps).to(device)
            x = ns.noise_scaling(sigmas[0], noise(), torch.zeros((), device=device))
        else:  # a schedule of int(steps / denoise) levels, of which the last steps + 1 run
            total, t_enc = S.img2img_steps(steps, denoise)
            every = SP.sigmas_for(spec, sched, ns, total).to(device)
            sigmas = every[total - t_enc - 1:]
            x = ns.noise_scaling(sigmas[0], noise(), init)
        extra = SP.BrownianNoise(noise.seeds, noise.shape, every, device) if spec.brownian else noise
        return spec.run(den, x, sigmas, extra)


def _timestep_pass(spec: SP.SamplerSpec, ns: S.NoiseSchedule, den: Denoiser, noise: SeedNoise, steps: int,
                   init: torch.Tensor | None, denoise: float) -> torch.Tensor:
    """DDIM / PLMS / UniPC (A1111 `CompVisSampler.sample` / `sample_img2img`)."""
    extra: dict[str, Any] = {}
    if init is None:
        timesteps, x = S.timesteps_for(steps), noise()
    else:  # noised to timesteps[t_enc]; the sampler then runs timesteps[:t_enc], as A1111's does
        total, t_enc = S.img2img_steps(steps, denoise)
        every = S.timesteps_for(total)
        timesteps, a = every[:t_enc], ns.alphas_cumprod[every[t_enc]]
        x = init * torch.sqrt(a).to(init.device) + noise() * torch.sqrt(1 - a).to(init.device)
        if spec.name == "UniPC":
            extra["t_start"] = (timesteps[-1] / 1000 + 1 / 1000).item() if len(timesteps) else 1.0
    return spec.run(den, x, timesteps, noise, ns.alphas_cumprod, **extra)


def _size(model: SamplingModel, s: SampleSettings) -> tuple[int, int]:
    width, height = s.width or model.default_size, s.height or model.default_size
    if width % 8 or height % 8:
        raise TunelabError(f"width and height must be multiples of 8, got {width}x{height}")
    return width, height


def _render(model: SamplingModel, prompts: list[str], seeds: list[int], s: SampleSettings,
            output_type: str) -> list[Sample]:
    """Every (prompt, seed) image of one set of settings, in one batch: first pass, hires pass, decode."""
    plan = _plan(model, s)
    width, height = _size(model, s)
    pairs = [encode_pair(model.tokenizers, model.text_encoders, p, s.negative, s.uncond, s.max_chunks, s.clip_skip,
                         comma_backtrack=s.comma_backtrack, pad_conds=s.pad_conds, clip_skip_te2=s.clip_skip_te2)
             for p in prompts]
    if len({pos.context.shape for pos, _ in pairs}) > 1:
        raise TunelabError("generate_batch: the prompts encode to different numbers of chunks; render them one by one")
    pos = type(pairs[0][0])(torch.cat([p.context for p, _ in pairs]), torch.cat([p.pooled for p, _ in pairs]),
                            pairs[0][0].n_chunks, [t for p, _ in pairs for t in p.truncated])
    cond, g = (pos, pairs[0][1]), _guidance(s, model, plan[0])
    shape = (model.unet.config.in_channels, height // 8, width // 8)  # (4, H/8, W/8)
    latents = _sample(model, s, plan, g, cond, (height, width), SeedNoise(seeds, shape, model.device), s.steps)
    size, extras = (width, height), {}
    if s.hires_scale > 1.0:
        latents, size = _hires(model, s, plan, g, cond, latents, seeds)
        extras["first_pass"] = (width, height)
    images = list(latents) if output_type == "latent" else _to_images(model, latents)
    return [Sample(image, s, size, dict(extras)) for image in images]


def generate(model: SamplingModel, s: SampleSettings, output_type: str = "pil") -> Sample:
    """Render one image (with the hires fix when hires_scale > 1); output_type="latent" returns
    the final latents (4, H/8, W/8), float32, instead of a PIL image (tests, probes)."""
    return _render(model, [s.prompt], [s.seed], s, output_type)[0]


def generate_batch(model: SamplingModel, prompts: list[str], seeds: list[int], s: SampleSettings) -> list[Any]:
    """PIL images of several (prompt, seed) pairs with one set of settings, in one batch.

    Each image gets the noise `generate` gives its seed (its own generator, as A1111 does in a
    batch), so the images match single renders up to the kernels' rounding for another batch
    size. For many small images (probes, scores); every prompt must encode to the same number of
    chunks."""
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError("generate_batch needs one seed per prompt and at least one prompt")
    return [sample.image for sample in _render(model, list(prompts), list(seeds), s, "pil")]


def _hires(model: SamplingModel, s: SampleSettings, plan: tuple[SP.SamplerSpec, S.Schedule], g: G.Guidance,
           cond: tuple[Any, Any], latents: torch.Tensor, seeds: list[int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """A1111's hires fix (`StableDiffusionProcessingTxt2Img.sample_hr_pass`): the first pass upscaled
    to int(size x scale) (latent: bilinear; lanczos: decoded, resized, encoded again), fresh noise
    from a new generator per seed at the new size, then an img2img pass of `hires_steps` (0 = steps)
    steps at the denoising strength, conditioned on the new size."""
    width0, height0 = latents.shape[-1] * 8, latents.shape[-2] * 8
    width, height = G.hires_size(width0, height0, s.hires_scale)
    if s.hires_upscaler == "latent":
        init = G.upscale_latents(latents, width, height)
    else:
        from PIL import Image

        resized = [im.resize((width, height), Image.Resampling.LANCZOS) for im in _to_images(model, latents)]
        init = _to_latents(model, resized)
    noise = SeedNoise(seeds, tuple(init.shape[1:]), model.device)
    out = _sample(model, s, plan, g, cond, (height, width), noise, s.hires_steps or s.steps, init, s.hires_denoise)
    return out, (out.shape[-1] * 8, out.shape[-2] * 8)


class _VAEDtype:
    """The VAE in float32 for the block when it is fp16 and its config says it overflows there
    (SDXL's original VAE: `force_upcast`, as diffusers' pipelines and A1111's auto-upcast do)."""

    def __init__(self, vae: torch.nn.Module):
        self.vae = vae
        self.upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))

    def __enter__(self) -> torch.dtype:
        if self.upcast:
            self.vae.to(torch.float32)
        return self.vae.dtype

    def __exit__(self, *exc: Any) -> None:
        if self.upcast:
            self.vae.to(torch.float16)  # fp16 -> fp32 -> fp16 is exact


def _to_images(model: SamplingModel, latents: torch.Tensor) -> list[Any]:
    """Decoded PIL images, 8-bit as A1111 converts them: clamp((x + 1) / 2), x 255, truncated."""
    from PIL import Image

    vae = model.vae
    with torch.no_grad(), _VAEDtype(vae) as dtype:
        device = next(vae.parameters()).device
        pixels = vae.decode(latents.to(device, dtype) / vae.config.scaling_factor, return_dict=False)[0]
    pixels = torch.clamp((pixels.float() + 1.0) / 2.0, min=0.0, max=1.0).cpu().numpy()
    return [Image.fromarray((255.0 * np.moveaxis(p, 0, 2)).astype(np.uint8)) for p in pixels]


def _to_latents(model: SamplingModel, images: list[Any]) -> torch.Tensor:
    """Scaled latents of PIL images: the VAE posterior's mean (A1111 draws a sample from it with its
    global RNG, which no seed pins; the mean is its deterministic centre)."""
    vae = model.vae
    pixels = torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]))
    pixels = pixels.permute(0, 3, 1, 2) * 2 - 1  # (B, 3, H, W) in [-1, 1]
    with torch.no_grad(), _VAEDtype(vae) as dtype:
        device = next(vae.parameters()).device
        mean = vae.encode(pixels.to(device, dtype)).latent_dist.mean
    return mean.float() * vae.config.scaling_factor
