"""Diffusers SDXL pipelines built from tunelab-loaded components, driven the way A1111 users sample.

Reused: diffusers' `StableDiffusionXLPipeline` (latents, time ids, scheduler loop, VAE decode)
and `StableDiffusionXLImg2ImgPipeline` (hires fix) built from the *same* module objects (no copy),
and diffusers' schedulers. Written here: the A1111 sampler names -> scheduler table, the
scheduler settings of the checkpoint's prediction record (models/prediction.py; flow
samples with a flow-matching Euler), VAE override
loading, and `generate()`, which encodes prompts itself (A1111 weights, long prompts: see
prompts.py), then calls the pipeline with `prompt_embeds` and a `GuidedUNet` in place of the UNet
(guidance.py), so CFG, CFG++, PAG and SEG are ours while everything else is the pipeline's.

Noise comes from a CPU generator seeded with the image's seed, so an image does not depend on the
device it was made on, nor on what else is in the grid.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import TunelabError
from tunelab.models.arch import Components, load_arch
from tunelab.models.prediction import PredictionRecord
from tunelab.sample import guidance as G
from tunelab.sample.prompts import encode_pair

log = logging.getLogger(__name__)

# A1111 sampler name -> (diffusers scheduler class, settings). Facts from diffusers' docs table
# "A1111/k-diffusion -> diffusers"; DDIM needs clip_sample off for latent diffusion.
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DDIM": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                 "use_karras_sigmas": False}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                        "use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}
CFGPP_SAMPLERS = {"DDIM CFG++": "DDIM", "Euler CFG++": "Euler"}  # A1111 / Forge names
ALL_SAMPLERS = (*SAMPLERS, *CFGPP_SAMPLERS)


def resolve_sampler(name: str) -> tuple[str, bool]:
    """A1111 sampler name -> (base sampler, CFG++?). Case-insensitive; unknown names get a hint."""
    by_lower = {n.lower(): n for n in ALL_SAMPLERS}
    canon = by_lower.get(name.strip().lower())
    if canon is None:
        near = difflib.get_close_matches(name, ALL_SAMPLERS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise TunelabError(f"unknown sampler {name!r}{hint}; choose one of: {', '.join(ALL_SAMPLERS)}")
    return (CFGPP_SAMPLERS[canon], True) if canon in CFGPP_SAMPLERS else (canon, False)


def canonical_sampler(name: str) -> str:
    """The sampler's name as A1111 writes it ("euler a" -> "Euler a")."""
    resolve_sampler(name)
    return next(s for s in ALL_SAMPLERS if s.lower() == name.strip().lower())


def make_scheduler(sampler: str, base_config: dict[str, Any], pred: PredictionRecord = PredictionRecord()):
    """A fresh diffusers scheduler for an A1111 sampler name, on the model's noise schedule and
    prediction record (models/prediction.py)."""
    import diffusers

    name, cfg_pp = resolve_sampler(sampler)
    if pred.type == "flow":
        return _flow_scheduler(sampler, name, cfg_pp, pred)
    cls_name, settings = SAMPLERS[name]
    cls = getattr(diffusers, cls_name)
    if cfg_pp:
        cls = G.DDIMCFGPPScheduler if name == "DDIM" else G.EulerCFGPPScheduler
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    config.update(settings, prediction_type=pred.diffusers_name)
    if pred.ztsnr:
        # "Common Diffusion Noise Schedules and Sample Steps are Flawed": rescaled betas and
        # timesteps that start at the last training step.
        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    accepted = set(inspect.signature(cls.__init__).parameters)
    dropped = sorted(k for k in config if k not in accepted)
    if pred.ztsnr and "rescale_betas_zero_snr" in dropped:
        raise TunelabError(f"sampler {sampler!r} cannot sample zero-terminal-SNR models; use Euler, DDIM or UniPC")
    return cls(**{k: v for k, v in config.items() if k in accepted})


def _flow_scheduler(sampler: str, name: str, cfg_pp: bool, pred: PredictionRecord):
    if name != "Euler" or cfg_pp:
        raise TunelabError(f"sampler {sampler!r} cannot sample a rectified-flow model; use Euler "
                           "(the flow-matching Euler sampler, as ComfyUI's ModelSamplingSD3 + euler)")
    from tunelab.sample.flow import FlowEulerScheduler

    return FlowEulerScheduler(num_train_timesteps=1000, shift=pred.flow_shift if pred.flow_shift is not None else 1.0)


# --- building -------------------------------------------------------------------------------------------


@dataclass
class SamplingModel:
    """A text-to-image and an image-to-image pipeline sharing one set of modules, plus what the
    infotext needs to name the model."""

    pipe: Any  # StableDiffusionXLPipeline
    img2img: Any  # StableDiffusionXLImg2ImgPipeline (same modules)
    tokenizers: tuple[Any, Any]
    scheduler_config: dict[str, Any]
    prediction: PredictionRecord
    name: str = "model"
    hash: str | None = None
    vae_name: str | None = None

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipe.unet


def build_pipeline(comps: Components, tokenizers: tuple[Any, Any], vae: torch.nn.Module | None = None,
                   name: str = "model", model_hash: str | None = None, vae_name: str | None = None) -> SamplingModel:
    """Pipelines over `comps`' own modules (nothing is copied or downloaded)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    pred = PredictionRecord.of(comps)
    base = dict(load_arch(comps.arch).scheduler)
    parts = dict(vae=vae or comps.vae, text_encoder=comps.text_encoder_1, text_encoder_2=comps.text_encoder_2,
                 tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=comps.unet,
                 scheduler=make_scheduler("Euler", base, pred))
    # Our own embeddings are always passed, so diffusers' empty-prompt zeroing must stay off.
    pipe = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=False, add_watermarker=False)
    img2img = StableDiffusionXLImg2ImgPipeline(**parts, requires_aesthetics_score=False,
                                               force_zeros_for_empty_prompt=False, add_watermarker=False)
    for p in (pipe, img2img):
        p.set_progress_bar_config(disable=True)  # the grid shows one bar over cells instead
    if pred != PredictionRecord():
        log.info("%s: %s", name, pred.describe())
    return SamplingModel(pipe, img2img, tokenizers, base, pred, name, model_hash, vae_name)


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
    sampler: str = "Euler"
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
    uncond: str = "empty"  # unconditional branch for an empty negative: empty string or zeros
    max_chunks: int = 3

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
        return out


@dataclass
class Sample:
    image: Any  # PIL.Image
    settings: SampleSettings
    size: tuple[int, int]  # final (width, height)
    extras: dict[str, Any] = field(default_factory=dict)


def _guidance(s: SampleSettings, model: SamplingModel, cfg_pp: bool) -> G.Guidance:
    rescale = s.guidance_rescale if s.guidance_rescale is not None else (0.7 if model.prediction.ztsnr else 0.0)
    return G.Guidance(cfg=s.cfg, cfg_pp=cfg_pp, pag_scale=s.pag_scale, pag_layers=s.pag_layers,
                      seg_scale=s.seg_scale, seg_sigma=s.seg_sigma, seg_layers=s.seg_layers, rescale=rescale)


def _run(model: SamplingModel, pipe: Any, s: SampleSettings, g: G.Guidance, steps: int, cond, **call: Any):
    """One pipeline call with our guided UNet standing in for the real one."""
    pos, neg = cond
    unet = model.unet
    scheduler = make_scheduler(s.sampler, model.scheduler_config, model.prediction)
    plan = G.BranchPlan(seg_sigma=s.seg_sigma)
    dtype = unet.dtype
    wrapper = G.GuidedUNet(unet, g, neg.context.to(dtype), neg.pooled.to(dtype), plan)
    if isinstance(scheduler, G._CFGPPMixin):
        scheduler.uncond_source = wrapper
    pipe.scheduler = scheduler
    with G.perturbed_attention(unet, g, plan), G.freeu(unet, G.FREEU_SDXL if s.freeu else None):
        pipe.unet = wrapper
        try:
            return pipe(prompt_embeds=pos.context.to(dtype), pooled_prompt_embeds=pos.pooled.to(dtype),
                        guidance_scale=1.0, num_inference_steps=steps, **call)
        finally:
            pipe.unet = unet


def generate(model: SamplingModel, s: SampleSettings, output_type: str = "pil") -> Sample:
    """Render one image (with the hires fix when hires_scale > 1); output_type="latent" returns
    the final latents (4, H/8, W/8) instead of a PIL image (tests, probes)."""
    from diffusers.utils.torch_utils import randn_tensor

    _, cfg_pp = resolve_sampler(s.sampler)
    pipe = model.pipe
    width = s.width or pipe.default_sample_size * pipe.vae_scale_factor
    height = s.height or pipe.default_sample_size * pipe.vae_scale_factor
    if width % 8 or height % 8:
        raise TunelabError(f"width and height must be multiples of 8, got {width}x{height}")
    device = pipe._execution_device
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    cond = encode_pair(model.tokenizers, encoders, s.prompt, s.negative, s.uncond, s.max_chunks, s.clip_skip)
    g = _guidance(s, model, cfg_pp)
    gen = torch.Generator("cpu").manual_seed(s.seed)
    shape = (1, pipe.unet.config.in_channels, height // 8, width // 8)  # (1, 4, H/8, W/8)
    latents = randn_tensor(shape, generator=gen, device=torch.device("cpu"), dtype=torch.float32)
    hires = s.hires_scale > 1.0
    out = _run(model, pipe, s, g, s.steps, cond, width=width, height=height, generator=gen,
               latents=latents.to(device, pipe.unet.dtype), output_type="latent" if hires else output_type)
    if not hires:
        return Sample(out.images[0], s, (width, height))
    return _hires(model, s, g, cond, out.images, gen, output_type)


def generate_batch(model: SamplingModel, prompts: list[str], seeds: list[int], s: SampleSettings) -> list[Any]:
    """PIL images of several (prompt, seed) pairs with one set of settings, in one pipeline call.

    Each image starts from the same noise as `generate` with its seed, so the images match
    single renders up to the kernels' rounding for another batch size. For many small images
    (probes, scores); no hires fix, and every prompt must encode to the same number of chunks."""
    from diffusers.utils.torch_utils import randn_tensor

    if len(prompts) != len(seeds) or not prompts:
        raise ValueError("generate_batch needs one seed per prompt and at least one prompt")
    if s.hires_scale > 1.0:
        raise TunelabError("generate_batch does not do the hires fix; render those with generate")
    _, cfg_pp = resolve_sampler(s.sampler)
    pipe = model.pipe
    width = s.width or pipe.default_sample_size * pipe.vae_scale_factor
    height = s.height or pipe.default_sample_size * pipe.vae_scale_factor
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    pairs = [encode_pair(model.tokenizers, encoders, p, s.negative, s.uncond, s.max_chunks, s.clip_skip) for p in prompts]
    if len({pos.context.shape for pos, _ in pairs}) > 1:
        raise TunelabError("generate_batch: the prompts encode to different numbers of chunks; render them one by one")
    pos = type(pairs[0][0])(torch.cat([p.context for p, _ in pairs]), torch.cat([p.pooled for p, _ in pairs]),
                            pairs[0][0].n_chunks, [t for p, _ in pairs for t in p.truncated])
    gens = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    shape = (1, pipe.unet.config.in_channels, height // 8, width // 8)
    latents = torch.cat([randn_tensor(shape, generator=g, device=torch.device("cpu"), dtype=torch.float32) for g in gens])
    out = _run(model, pipe, s, _guidance(s, model, cfg_pp), s.steps, (pos, pairs[0][1]), width=width, height=height,
               generator=gens, latents=latents.to(pipe._execution_device, pipe.unet.dtype), output_type="pil")
    return list(out.images)


def _hires(model: SamplingModel, s: SampleSettings, g: G.Guidance, cond, latents: torch.Tensor, gen,
           output_type: str = "pil") -> Sample:
    """Upscale the first pass (latent bilinear, or decoded and Lanczos-resized), then img2img."""
    width0, height0 = latents.shape[-1] * 8, latents.shape[-2] * 8
    width, height = G.hires_size(width0, height0, s.hires_scale)
    steps = s.hires_steps or s.steps
    G.hires_plan(steps, s.hires_denoise)  # validates: at least one step runs
    if s.hires_upscaler == "latent":
        image: Any = G.upscale_latents(latents, width, height)
    elif s.hires_upscaler == "lanczos":
        from PIL import Image

        decoded = _decode(model, latents)
        image = decoded.resize((width, height), Image.Resampling.LANCZOS)
    else:
        raise TunelabError(f"hires upscaler must be 'latent' or 'lanczos', got {s.hires_upscaler!r}")
    out = _run(model, model.img2img, s, g, steps, cond, image=image, strength=s.hires_denoise,
               generator=gen, output_type=output_type)
    return Sample(out.images[0], s, (width, height), {"first_pass": (width0, height0)})


def _decode(model: SamplingModel, latents: torch.Tensor):
    vae = model.pipe.vae
    with torch.no_grad():
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return model.pipe.image_processor.postprocess(image, output_type="pil")[0]
