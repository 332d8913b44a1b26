"""The run file: one TOML file per run, parsed into typed, validated models.

Each section is a small pydantic model that forbids unknown keys; the defaults are documentation
(every field says when to change it: `tunelab config show --fields`). `load_config` validates the
whole file *before* anything heavy is loaded and reports every problem at once, each as the field's
dotted path, what is wrong and what is allowed, with a nearest-name hint for misspelt keys.
Cross-field checks (impossible combinations) live in `RunConfig._check_combinations`.

Relative paths in the run file are relative to the current working directory.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tunelab.data.buckets import BucketConfig
from tunelab.data.captions import CaptionConfig
from tunelab.errors import TunelabError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(_Section):
    name: str = Field("run", description="A short name; shown in logs, metadata and reports.")
    output_dir: str = Field("runs/run", description="The run directory; running again on it resumes the run.")
    seed: int = Field(0, ge=0, description="Seeds noise, timesteps, caption choices and sample order.")


class ModelSection(_Section):
    base: str = Field("toy", description="Base checkpoint (.safetensors SGM file or diffusers folder), or 'toy' for a fresh toy model.")
    arch: Literal["auto", "sdxl", "toy"] = Field("auto", description="Architecture; 'auto' reads it from the checkpoint.")
    tokenizers: str = Field("auto", description="'auto' = the base's own (toy: built in; a diffusers folder: its tokenizer/ and tokenizer_2/); an SDXL .safetensors carries none, so name a folder with tokenizer/ and tokenizer_2/ (docs/text-conditioning.md: fetched once from stabilityai/stable-diffusion-xl-base-1.0), 'toy', or 'hub' (needs allow_download).")
    allow_download: bool = Field(False, description="Allow fetching SDXL's tokenizers from the Hugging Face hub once (cached) when tokenizers = 'hub'. Off: nothing is ever downloaded.")
    max_chunks: int = Field(3, ge=1, le=8, description="75-token windows per prompt (3 = 225 tokens, A1111's long prompts; 1 = classic 77). Longer prompts are truncated and counted (banner, prompts_truncated metric).")
    clip_skip: int = Field(2, ge=1, le=12, description="Which text-encoder layer conditions the UNet, counted from the end; 2 = SDXL's penultimate (keep it).")


class DataSection(_Section):
    index: str = Field("", description="Dataset index (Parquet) built by `tunelab data index`.")
    latents: str = Field("", description="Latent cache folder: shards built by `tunelab data cache`, or kohya's .npz caches as they are (IMAGE.npz / IMAGE_WWWWxHHHH_sdxl.npz beside each image, or KEY.npz in the folder); empty = encode images on the fly.")
    captions: CaptionConfig = Field(default_factory=CaptionConfig)
    # Optional: training always uses the buckets the index was built with. When written, it must
    # equal them (a run file that differs is refused, naming the rebuild command): docs/data.md.
    buckets: BucketConfig = Field(default_factory=BucketConfig, description="The bucket set data.index must have been built with (`tunelab data index --resolution ...`); leave it out to use the index's.")
    crop_conditioning: Literal["kohya", "crop"] = Field("kohya", description="SDXL's crop_top_left conditioning: 'kohya' = where the image would sit fitted inside its bucket (sd-scripts' get_crop_ltrb; what kohya trains with and its caches hold), 'crop' = the pixels really cropped from the top-left (the SDXL paper's). Every cache is converted to it (docs/data.md).")
    flip_aug: bool = Field(False, description="Mirror each sample left-right with probability 0.5 (kohya's flip_aug); the draw depends only on (seed, epoch, image), so a resumed run mirrors the same samples. With data.latents the cache must hold the mirrored images' latents too: `tunelab data cache --flip` (or kohya .npz caches made with --flip_aug). Leave it off for data where left and right matter (text, asymmetric characters).")
    random_crop: bool = Field(False, description="Cut each image's bucket from a random place of the resized image instead of its centre (kohya's random_crop), drawn per sample like flips. Only while encoding images on the fly (data.latents empty): a latent cache fixes every crop. crop_top_left then follows data.crop_conditioning: 'crop' feeds the real random offset, 'kohya' kohya's fitted offset, which ignores it as sd-scripts does.")

    def given_buckets(self) -> BucketConfig | None:
        """`[data.buckets]` if the run file wrote it (checked against the index), else None."""
        return self.buckets if "buckets" in self.model_fields_set else None


class PartsSection(_Section):
    text_encoder: Literal["off", "on", "only"] = Field("off", description="off: UNet only; on: UNet and both text encoders; only: text encoders, UNet frozen.")
    unet: Literal["full", "unet63", "unet68", "unet71"] = Field("full", description="Which UNet parts train: full, or the field's partial presets (63/68/71 % of the parameters).")
    unet_include: list[str] = Field(default_factory=list, description="Extra SGM name patterns (fnmatch, e.g. 'output_blocks.*.1.*') to train.")
    unet_exclude: list[str] = Field(default_factory=list, description="SGM name patterns to freeze, applied after the preset and includes.")
    block_lrs: list[float] = Field(default_factory=list, description="23 UNet block LR *multipliers* of optim.lr_unet, in kohya's block order (BASE, IN00-08, MID00-02, OUT00-08, OUT); 0 freezes a block. Empty = off.")
    block_lr_values: list[float] = Field(default_factory=list, description="The same 23 blocks as *learning rates*, as kohya's --block_lr means them (copy a kohya line verbatim); block_lrs is derived from them (value / lr_unet). Give one of the two.")


class TrainSection(_Section):
    batch_size: int = Field(1, ge=1, description="Images per device per micro-step.")
    grad_accumulation: int | None = Field(None, ge=1, description="Micro-steps per optimizer step. Leave unset to derive it from target_effective_batch.")
    target_effective_batch: int | None = Field(None, ge=1, description="Images per optimizer step across all devices; accumulation = target / (world size x batch). Keeps results comparable when the GPU count changes.")
    expect_world_size: int | None = Field(None, ge=1, description="Refuse to start unless launched on exactly this many processes (guards against a silently smaller effective batch).")
    epochs: int = Field(1, ge=0, description="Passes over the dataset (ignored when max_steps > 0).")
    max_steps: int = Field(0, ge=0, description="Optimizer steps to run; 0 = use epochs.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("bf16", description="Autocast precision; 'no' on CPU-only machines.")
    full_bf16: bool = Field(False, description="Keep the weights themselves in bf16 (saves memory; the field's 24 GB recipe); needs mixed_precision = 'bf16'.")
    bf16_update: Literal["exact", "stochastic", "kahan", "nearest"] = Field("exact", description="How full_bf16 writes an optimizer step back into bf16 weights: 'exact' (the fp32 weight's other 16 bits kept beside it: every update lands as with fp32 master weights, +2 bytes per weight; checkpoints hold the fp32 weight), 'stochastic' rounding (unbiased on average, no extra memory; OneTrainer's default), 'kahan' (compensated, +2 bytes per weight), or 'nearest' (plain rounding: at the field's LRs most updates vanish; the banner gives the estimate). The optimizer's math runs in fp32 for the first three.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward: much less memory, ~20 % slower.")
    compile: bool = Field(False, description="torch.compile the UNet (faster steps after a slow first one).")
    max_grad_norm: float = Field(0.0, ge=0.0, description="Gradient clipping norm; 0 turns clipping off.")
    max_grad_norm_scope: Literal["global", "per_parameter"] = Field("global", description="What max_grad_norm bounds: 'global' = the norm of all gradients together (torch's clip_grad_norm_), or 'per_parameter' = each parameter's gradient on its own, a looser clip (what kohya's --fused_backward_pass does; the only clipping fused_backward can do).")
    fused_backward: bool = Field(False, description="Step each parameter inside backward as soon as its gradient is ready and free that gradient at once, so a step never holds all gradients: saves 4 B per trained parameter (2 with full_bf16), the same weights as without it. Needs one process, grad_accumulation 1, optim adamw / lion / adafactor / came, and max_grad_norm 0 or max_grad_norm_scope 'per_parameter' (kohya's --fused_backward_pass; docs/training.md).")
    max_nonfinite_steps: int = Field(5, ge=1, description="Stop after this many consecutive steps with a NaN/inf loss (each is skipped); the last good state stays intact.")
    dataloader_workers: int = Field(0, ge=0, description="Background processes decoding images / reading latents; raise when the GPU waits for data.")
    parts: PartsSection = Field(default_factory=PartsSection)


class OptimSection(_Section):
    name: Literal["adamw", "adamw8bit", "adafactor", "lion", "prodigy", "came", "adamw_schedulefree", "optimi_adamw",
                  "optimi_lion", "optimi_stableadamw", "optimi_adan", "class"] = Field("adamw", description="Optimizer; adamw8bit needs bitsandbytes and a CUDA GPU; prodigy needs prodigyopt (lr ~1.0), came needs came-pytorch; adamw_schedulefree (pip install schedulefree) is AdamW without a schedule: checkpoints hold its running average of the weights, optim.schedule stays 'constant' and optim.warmup_steps is its own warm-up; optimi_adamw / optimi_lion / optimi_stableadamw / optimi_adan are torch-optimi's (pip install torch-optimi), whose states stay in the weights' dtype and whose bf16 remedy is Kahan summation (train.bf16_update = 'kahan'); 'class' = optim.class_path.")
    class_path: str = Field("", description="optim.name = 'class': any optimizer class by import path, e.g. 'torch.optim.RAdam' (kohya's escape hatch); constructed with the parameter groups, lr and optim.args.")
    args: dict[str, float | int | bool | str] = Field(default_factory=dict, description="Extra keyword arguments for the optimizer (kohya's --optimizer_args), e.g. {relative_step = true} for Adafactor, {d_coef = 0.8} for Prodigy.")
    lr_unet: float = Field(1e-5, ge=0.0, description="UNet learning rate (the field's production value: 1.5e-6).")
    lr_text_encoder_1: float = Field(0.0, ge=0.0, description="TE1 (CLIP ViT-L) learning rate (production: 1.2e-5).")
    lr_text_encoder_2: float = Field(0.0, ge=0.0, description="TE2 (OpenCLIP bigG) learning rate (production: 1.2e-5).")
    weight_decay: float = Field(1e-2, ge=0.0, description="Decoupled weight decay.")
    betas: tuple[float, float] | tuple[float, float, float] = Field((0.9, 0.999), description="Adam/Lion betas; optimi_adan takes three (its gradient, gradient-difference and squared-gradient averages; Adan's own: [0.98, 0.92, 0.99]).")
    eps: float = Field(1e-8, gt=0.0, description="Adam epsilon.")
    schedule: Literal["constant", "constant_with_warmup", "cosine", "linear", "cosine_with_restarts", "polynomial",
                      "warmup_stable_decay"] = Field("constant", description="LR schedule over the optimizer steps (definitions: docs/training.md, as transformers').")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps (every schedule but constant; adamw_schedulefree: its own warm-up, under schedule = 'constant').")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Decaying schedules end at this share of the LR instead of 0 (cosine, linear, cosine_with_restarts, polynomial, warmup_stable_decay).")
    num_cycles: int = Field(1, ge=1, description="cosine_with_restarts: how many cosine cycles (each restarts at the full LR).")
    power: float = Field(1.0, gt=0.0, description="polynomial: the decay's power (1 = linear).")
    decay_steps: int = Field(0, ge=0, description="warmup_stable_decay: the final decay's length in steps; 0 = the last 10 % of the run.")


class ObjectiveSection(_Section):
    prediction: Literal["epsilon", "v", "flow"] = Field("epsilon", description="What the UNet predicts: epsilon (SDXL base), v (v-prediction), flow (rectified flow).")
    zero_terminal_snr: bool = Field(False, description="Rescale the noise schedule to zero SNR at the last step (needs v-prediction).")
    flow_logit_mean: float = Field(0.0, description="Rectified flow: mean of the logit-normal timestep distribution.")
    flow_logit_std: float = Field(1.0, gt=0.0, description="Rectified flow: std of the logit-normal timestep distribution.")
    flow_shift: float = Field(3.0, gt=0.0, description="Rectified flow: timestep shift (higher = noisier timesteps).")
    min_timestep: int = Field(0, ge=0, le=999, description="Epsilon / v: the lowest training timestep drawn (kohya --min_timestep).")
    max_timestep: int = Field(1000, ge=1, le=1000, description="Epsilon / v: timesteps are drawn below this (kohya --max_timestep; 1000 = all).")
    convert_base: bool = Field(False, description="Train another prediction than the base's on purpose (e.g. an epsilon base into v + zero-terminal SNR); without it such a run is refused. Checkpoints always say what the run trained.")
    timestep_bias_strategy: Literal["none", "earlier", "later", "range"] = Field("none", description="Epsilon / v: draw some timesteps more often (diffusers' --timestep_bias_strategy): 'earlier' = the lowest timesteps (little noise: fine detail), 'later' = the highest (much noise: composition, colour), 'range' = timestep_bias_begin..end; 'none' = every timestep equally often.")
    timestep_bias_multiplier: float = Field(1.0, gt=0.0, description="Timestep bias: how many times more often the biased timesteps are drawn (2 = twice, 0.5 = half as often); 1 would change nothing, so a strategy needs another value.")
    timestep_bias_portion: float = Field(0.25, gt=0.0, le=1.0, description="Timestep bias 'earlier' / 'later': the share of all timesteps biased (0.25 = the lowest or highest 250 of 1000).")
    timestep_bias_begin: int = Field(0, ge=0, le=999, description="Timestep bias 'range': the first biased timestep.")
    timestep_bias_end: int = Field(1000, ge=1, le=1000, description="Timestep bias 'range': biased timesteps are below this (diffusers' code slices [begin, end), though its help says 'inclusive').")


class LossSection(_Section):
    type: Literal["l2", "huber", "smooth_l1"] = Field("l2", description="Per-element loss.")
    huber_schedule: Literal["constant", "exponential", "snr"] = Field("snr", description="How huber_c varies with the timestep (huber / smooth_l1 only).")
    huber_c: float = Field(0.1, gt=0.0, description="Huber threshold parameter.")
    min_snr_gamma: float = Field(0.0, ge=0.0, description="Min-SNR weighting gamma (5 is common); 0 = off.")
    noise_offset: float = Field(0.0, ge=0.0, description="Noise offset (0.0357 is a common value); helps very dark/bright images.")
    noise_offset_random_strength: bool = Field(False, description="Scale the noise offset by a uniform random number per batch (kohya --noise_offset_random_strength).")
    multires_noise_iterations: int = Field(0, ge=0, description="Multi-resolution (pyramid) noise: levels added to the noise (kohya --multires_noise_iterations; 6-10 are used); 0 = off.")
    multires_noise_discount: float = Field(0.3, gt=0.0, le=1.0, description="Multi-resolution noise: each level's weight is discount^level (kohya's default 0.3).")
    ip_noise_gamma: float = Field(0.0, ge=0.0, description="Input-perturbation noise (Ning et al. 2023): the noisy input gets noise + gamma x extra noise, the target keeps the noise (0.1 is used); 0 = off.")
    ip_noise_gamma_random_strength: bool = Field(False, description="Scale ip_noise_gamma by a uniform random number per batch.")
    debiased_estimation: bool = Field(False, description="Weight the loss by 1/sqrt(SNR) (epsilon) or 1/(SNR+1) (v), SNR capped at 1000 (kohya --debiased_estimation_loss).")


class SaveSection(_Section):
    every_n_steps: int = Field(0, ge=0, description="Save a checkpoint every N optimizer steps; 0 = off.")
    every_n_epochs: int = Field(1, ge=0, description="Save a checkpoint every N epochs; 0 = off.")
    dtype: Literal["fp32", "fp16", "bf16"] = Field("fp16", description="dtype of saved checkpoints (fp16 is what UIs expect).")
    keep_last: int = Field(0, ge=0, description="Keep only the newest N step/epoch checkpoints; 0 = keep all.")
    keep_states: int = Field(2, ge=1, description="Training states (for resume, each about 3x the model in size) kept; the newest always stays.")


class LogSection(_Section):
    every_n_steps: int = Field(1, ge=1, description="Write scalars every N optimizer steps.")
    wandb: bool = Field(False, description="Also log scalars and grid images to Weights & Biases (pip install 'tunelab[wandb]'); tensorboard and metrics.parquet are always written.")
    wandb_project: str = Field("tunelab", description="W&B project the run is logged under.")
    wandb_mode: Literal["offline", "online"] = Field("offline", description="offline: written under the run directory (RUN/wandb/), nothing leaves the machine; upload later with `wandb sync`. online: streamed to the W&B server (needs `wandb login`).")


class GridSection(_Section):
    """Image grids rendered from the live weights during training (prompts across, seeds down)."""

    prompts: list[str] = Field(default_factory=list, description="Prompts to render during training (empty = no grids). A1111 syntax: (word:1.2), [word], BREAK.")
    negative: str = Field("", description="Negative prompt for every cell.")
    seeds: list[int] = Field(default_factory=lambda: [460372993], description="Fixed seeds, one row per seed (the field's seed bank: 460372993, 744089893, 3033572388, ...).")
    every_n_steps: int = Field(0, ge=0, description="Render every N optimizer steps; 0 = only at the end of training.")
    steps: int = Field(28, ge=1, description="Sampler steps per image.")
    cfg: float = Field(6.0, ge=0.0, description="Classifier-free guidance scale. DDIM CFG++ (A1111's) divides it by 12.5; Euler CFG++ (ComfyUI's) takes it as the CFG++ lambda itself (about 0.5-1.5).")
    sampler: str = Field("Euler", description="A1111 sampler name: Euler, Euler a, Heun, LMS, DPM2, DPM2 a, DPM++ 2M, DPM++ 2S a, DPM++ SDE, DPM++ 2M SDE, DPM++ 2M SDE Heun, DPM++ 3M SDE, DDIM, DDIM CFG++, PLMS, UniPC, Euler CFG++ (old names such as 'DPM++ 2M Karras' = sampler + schedule type).")
    schedule_type: str = Field("Automatic", description="A1111's Schedule type: Automatic (the sampler's own: Karras for DPM++ 2M and DPM2, Exponential for the 2M/3M SDE ones, the model's timesteps for Euler), Uniform, Karras, Exponential, Polyexponential, SGM Uniform, KL Optimal, Align Your Steps, Simple, Normal, DDIM.")
    pag_scale: float = Field(0.0, ge=0.0, description="Perturbed-attention guidance scale (the field uses 1); 0 = off.")
    seg_scale: float = Field(0.0, ge=0.0, description="Smoothed-energy guidance scale; 0 = off.")
    weights: Literal["live", "ema", "both"] = Field("live", description="Which weights the grid draws: the live ones, the EMA's ([ema] enabled; written to samples/ema/step-N/), or both side by side in time (diffusers' validation with --use_ema draws the EMA).")


class ProbeSection(_Section):
    """Probes: fixed-input numbers for what the run learned and what it forgot (docs/probes.md)."""

    enabled: bool = Field(False, description="Measure learn / preserve loss and prediction drift from the base during training (logged as probe/*; table under RUN/probes/).")
    every_n_steps: int = Field(0, ge=0, description="Probe every N optimizer steps; 0 = auto: the interval at which a probe costs about 1 % of the training's compute (the banner states it). Always at step 0 and at the end.")
    learn: str = Field("holdout", description="The learn set: 'holdout' (the index's holdout split; build the index with --holdout), 'train' (training rows: fit, not generalisation), or the path of another index.")
    learn_latents: str = Field("", description="Latent cache of the learn index when `learn` is a path (empty: encode its images with the VAE).")
    learn_samples: int = Field(8, ge=1, description="Images of the learn set (the first N by key hash: the same ones for every checkpoint).")
    preserve_prompts: list[str] = Field(default_factory=list, description="Prompts for the preserve set, rendered by the base with fixed seeds; empty = the architecture's defaults (sdxl: 'car, wrc', 'man with car', 'city street at night', '1girl, solo' and the empty prompt).")
    preserve_seeds: list[int] = Field(default_factory=lambda: [0, 1], description="Seeds per preserve prompt.")
    preserve_steps: int = Field(30, ge=1, description="Sampler steps (Euler) for the preserve images.")
    preserve_cfg: float | None = Field(None, ge=0.0, description="CFG scale for the preserve images; unset = the architecture's (sdxl 5, toy 2).")
    timesteps: int = Field(8, ge=1, le=1000, description="Fixed timesteps per sample: stratified quantiles of the run's timestep distribution, split into low / mid / high noise bands.")
    batch_size: int = Field(8, ge=1, description="UNet forwards per probe batch.")
    seed: int = Field(0, ge=0, description="Seeds the probe's fixed noise.")
    weights: Literal["live", "ema"] = Field("live", description="Which weights the probes measure: the live ones, or the EMA's ([ema] enabled): the model the run will most likely ship.")
    scorer: str = Field("", description="Image-level numbers: 'toy' (the toy world's concept reader) or 'module:function' (image, prompt -> {name: value}); empty = none. Renders the learn set's prompts and the preserve prompts with the preserve seeds.")


class EmaSection(_Section):
    """An exponential moving average of the trained weights (docs/training.md)."""

    enabled: bool = Field(False, description="Keep an EMA of the trained weights and save it beside every checkpoint (checkpoints/ema/).")
    decay: float = Field(0.9999, gt=0.0, lt=1.0, description="The EMA's decay (diffusers' schedule: min(decay, (1 + n) / (10 + n)) after n updates).")
    every_n_steps: int = Field(1, ge=1, description="Update the EMA every N optimizer steps.")
    update_after_step: int = Field(0, ge=0, description="Start updating after this optimizer step.")
    device: Literal["cpu", "same"] = Field("cpu", description="Where the EMA lives: cpu (no GPU memory) or beside the weights.")
    save: bool = Field(True, description="Write checkpoints/ema/<checkpoint name>.safetensors at every checkpoint.")


class ReportSection(_Section):
    """The run report (RUN/report.html; `tunelab report` for the full one and comparisons)."""

    enabled: bool = Field(True, description="Rewrite RUN/report.html at every checkpoint and at the end (a second or so; the drift section appears once `tunelab report RUN` has computed it).")


class RunConfig(_Section):
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)
    loss: LossSection = Field(default_factory=LossSection)
    save: SaveSection = Field(default_factory=SaveSection)
    log: LogSection = Field(default_factory=LogSection)
    grid: GridSection = Field(default_factory=GridSection)
    probe: ProbeSection = Field(default_factory=ProbeSection)
    report: ReportSection = Field(default_factory=ReportSection)
    ema: EmaSection = Field(default_factory=EmaSection)

    @model_validator(mode="after")
    def _check_combinations(self) -> "RunConfig":
        parts = self.train.parts
        if parts.block_lr_values and len(parts.block_lr_values) == 23 and self.optim.lr_unet > 0:
            derived = [round(v / self.optim.lr_unet, 12) for v in parts.block_lr_values]
            if parts.block_lrs and parts.block_lrs != derived:
                raise ValueError("train.parts.block_lrs (multipliers) and train.parts.block_lr_values (learning rates) "
                                 "disagree; give only one of them")
            parts.block_lrs = derived
        problems = [p for check in _COMBINATION_CHECKS if (p := check(self))]
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def accumulation_for(self, world_size: int) -> int:
        """Gradient accumulation for a launch on `world_size` processes (refuses non-divisors)."""
        t = self.train
        if t.target_effective_batch is None:
            return t.grad_accumulation or 1
        per_step = world_size * t.batch_size
        if t.target_effective_batch % per_step:
            raise TunelabError(
                f"train.target_effective_batch = {t.target_effective_batch} is not divisible by world size {world_size} "
                f"x train.batch_size {t.batch_size} = {per_step}; change one of them"
            )
        return t.target_effective_batch // per_step

    def fingerprint(self, fields: tuple[str, ...] = ("train", "optim", "objective", "loss", "data")) -> str:
        """A hash of the settings that must not change across a resume. Settings at their defaults
        are left out, so a setting added in a later version (at a default that keeps the old
        behaviour) does not change the fingerprint of runs made before it."""
        dumped = {k: v for k, v in self.model_dump(mode="json", exclude_defaults=True).items() if k in fields}
        dumped.get("train", {}).pop("fused_backward", None)  # the same steps, bit for bit: may change on resume
        return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:16]


# --- cross-field checks: each returns a message naming the fields to change, or None ----------------------


def _te_only_without_lr(c: RunConfig) -> str | None:
    o = c.optim
    if c.train.parts.text_encoder == "only" and o.lr_text_encoder_1 == 0 and o.lr_text_encoder_2 == 0:
        return ("train.parts.text_encoder = 'only' freezes the UNet, but optim.lr_text_encoder_1 and "
                "optim.lr_text_encoder_2 are both 0, so nothing would train; give at least one encoder a learning rate")
    return None


def _te_on_without_lr(c: RunConfig) -> str | None:
    o = c.optim
    if c.train.parts.text_encoder == "on" and o.lr_text_encoder_1 == 0 and o.lr_text_encoder_2 == 0:
        return ("train.parts.text_encoder = 'on' but both text-encoder learning rates are 0; set "
                "optim.lr_text_encoder_1 / optim.lr_text_encoder_2, or use text_encoder = 'off'")
    return None


def _unet_without_lr(c: RunConfig) -> str | None:
    if c.train.parts.text_encoder != "only" and c.optim.lr_unet == 0:
        return "optim.lr_unet is 0 while the UNet trains; give it a learning rate or set train.parts.text_encoder = 'only'"
    return None


def _accumulation(c: RunConfig) -> str | None:
    t = c.train
    if t.grad_accumulation is not None and t.target_effective_batch is not None:
        return "set either train.grad_accumulation or train.target_effective_batch, not both"
    if t.target_effective_batch is not None and t.expect_world_size is not None:
        per = t.expect_world_size * t.batch_size
        if t.target_effective_batch % per:
            return (f"train.target_effective_batch = {t.target_effective_batch} is not divisible by "
                    f"expect_world_size x batch_size = {per}")
    return None


def _length(c: RunConfig) -> str | None:
    if c.train.epochs == 0 and c.train.max_steps == 0:
        return "train.epochs and train.max_steps are both 0; set one of them"
    return None


def _precision(c: RunConfig) -> str | None:
    if c.train.full_bf16 and c.train.mixed_precision != "bf16":  # bf16 weights need bf16 autocast for their inputs
        return f"train.full_bf16 = true needs train.mixed_precision = 'bf16', not {c.train.mixed_precision!r}"
    return None


def _optimizer_fit(c: RunConfig) -> str | None:
    """What the schedule-free and torch-optimi optimizers cannot do (train/optim.py)."""
    o, t = c.optim, c.train
    if o.name == "adamw_schedulefree" and o.schedule != "constant":
        return (f"optim.name = 'adamw_schedulefree' replaces the LR schedule (its checkpoints are an average over the "
                f"run), so optim.schedule must be 'constant', not {o.schedule!r}; its warm-up is optim.warmup_steps")
    if o.name == "optimi_adan" and len(o.betas) != 3:
        return ("optim.name = 'optimi_adan' takes three betas (its gradient, gradient-difference and squared-gradient "
                "averages); set optim.betas = [0.98, 0.92, 0.99] (Adan's own)")
    if o.name != "optimi_adan" and len(o.betas) != 2:
        return f"optim.betas has three values, which only optim.name = 'optimi_adan' takes; give {o.name} two (e.g. [0.9, 0.999])"
    if not t.full_bf16 or t.bf16_update == "nearest":
        return None
    if o.name == "adamw_schedulefree":
        return (f"train.bf16_update = {t.bf16_update!r} is not available for optim.name = 'adamw_schedulefree' (it "
                "writes bf16 weights by plain rounding); set train.bf16_update = 'nearest', or train.full_bf16 = false")
    if o.name.startswith("optimi_"):
        if t.bf16_update in ("exact", "stochastic"):
            return (f"train.bf16_update = {t.bf16_update!r} is tunelab's, built for optim.name = 'adamw' / 'lion'; "
                    f"{o.name!r}'s bf16 remedy is its Kahan summation: set train.bf16_update = 'kahan' (or 'nearest'), "
                    "or use optim.name = 'adamw' / 'lion'")
        return None
    if o.name not in ("adamw", "lion"):
        return (f"train.bf16_update = {t.bf16_update!r} (bf16 weights that keep their small updates) exists for "
                f"optim.name = 'adamw' / 'lion' (and 'kahan' for the optimi_* ones), not {o.name!r}; use one of those, or "
                "set train.bf16_update = 'nearest' (updates below half a bf16 step are then lost; the banner estimates "
                "how many), or train.full_bf16 = false")
    return None


def _objective(c: RunConfig) -> str | None:
    ob = c.objective
    if ob.zero_terminal_snr and ob.prediction != "v":
        return "objective.zero_terminal_snr needs objective.prediction = 'v' (epsilon is undefined at zero SNR)"
    if c.loss.min_snr_gamma > 0 and ob.prediction == "flow":
        return "loss.min_snr_gamma applies to epsilon / v objectives; set it to 0 for prediction = 'flow'"
    return None


def _block_lrs(c: RunConfig) -> str | None:
    p = c.train.parts
    for name, values in (("block_lrs", p.block_lrs), ("block_lr_values", p.block_lr_values)):
        if len(values) not in (0, 23):
            return f"train.parts.{name} needs 23 values (BASE, IN00-08, MID00-02, OUT00-08, OUT) or none, got {len(values)}"
    if p.block_lr_values and c.optim.lr_unet == 0:
        return "train.parts.block_lr_values are learning rates relative to optim.lr_unet, which is 0; give lr_unet"
    return None


def _noise_options(c: RunConfig) -> str | None:
    ob, lo = c.objective, c.loss
    if ob.min_timestep >= ob.max_timestep:
        return f"objective.min_timestep ({ob.min_timestep}) must be below objective.max_timestep ({ob.max_timestep})"
    if ob.prediction == "flow" and (ob.min_timestep > 0 or ob.max_timestep < 1000):
        return "objective.min_timestep / max_timestep apply to epsilon / v; flow draws logit-normal timesteps"
    if lo.debiased_estimation and ob.prediction == "flow":
        return "loss.debiased_estimation applies to epsilon / v objectives; set it to false for prediction = 'flow'"
    return None


def _ema_users(c: RunConfig) -> str | None:
    users = [f"{name}.weights = {w!r}" for name, w in (("grid", c.grid.weights), ("probe", c.probe.weights)) if w != "live"]
    if users and not c.ema.enabled:
        return f"{' and '.join(users)} need an EMA; set [ema] enabled = true, or weights = 'live'"
    return None


def _timestep_bias(c: RunConfig) -> str | None:
    from tunelab.train.objectives import bias_span

    ob = c.objective
    if ob.timestep_bias_strategy == "none":
        return None
    if ob.prediction == "flow":
        return ("objective.timestep_bias_strategy applies to epsilon / v; flow draws logit-normal timesteps (shape them "
                "with flow_logit_mean / flow_logit_std / flow_shift), so set timestep_bias_strategy = 'none'")
    if ob.timestep_bias_multiplier == 1.0:
        return (f"objective.timestep_bias_strategy = {ob.timestep_bias_strategy!r} with timestep_bias_multiplier = 1 "
                "changes nothing; set the multiplier (2 draws the biased timesteps twice as often), or the strategy to 'none'")
    if ob.timestep_bias_strategy == "range" and ob.timestep_bias_begin >= ob.timestep_bias_end:
        return (f"objective.timestep_bias_begin ({ob.timestep_bias_begin}) must be below objective.timestep_bias_end "
                f"({ob.timestep_bias_end})")
    lo, hi = bias_span(ob.timestep_bias_strategy, 1000, ob.timestep_bias_portion, ob.timestep_bias_begin,
                       ob.timestep_bias_end)
    window = (ob.min_timestep, ob.max_timestep)
    inside = max(0, min(hi, window[1]) - max(lo, window[0]))
    if inside == 0 or inside == window[1] - window[0]:
        what = "none of" if inside == 0 else "every one of"
        return (f"objective.timestep_bias_* biases timesteps {lo}-{hi - 1}, {what} the timesteps objective.min_timestep / "
                f"max_timestep allow ({window[0]}-{window[1] - 1}), so the bias would change nothing; move the bias "
                "(timestep_bias_portion, _begin, _end) or the window")
    return None


def _augmentation(c: RunConfig) -> str | None:
    if c.data.random_crop and c.data.latents:
        return ("data.random_crop needs images decoded while training (a latent cache fixes each image's crop; kohya "
                "refuses --cache_latents with random_crop too): leave data.latents empty, or set data.random_crop = false")
    return None


def _grid_sampler(c: RunConfig) -> str | None:
    from tunelab.sample.samplers import split_sampler

    try:
        split_sampler(c.grid.sampler, c.grid.schedule_type)
    except TunelabError as err:
        return f"grid.sampler / grid.schedule_type: {err}"
    return None


def _fused_backward(c: RunConfig) -> str | None:
    if not c.train.fused_backward:
        return None
    from tunelab.train.fused import problems  # what the fused pass cannot honour, each with its fix

    return "\n".join(problems(c)) or None


_COMBINATION_CHECKS = (_te_only_without_lr, _te_on_without_lr, _unet_without_lr, _accumulation, _length,
                       _precision, _optimizer_fit, _objective, _block_lrs, _noise_options, _grid_sampler, _ema_users,
                       _timestep_bias, _augmentation, _fused_backward)


# --- loading and error reporting -------------------------------------------------------------------------------


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names valid at `loc` (the parent of an unknown key)."""
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(RunConfig, loc[:-1])
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = "unknown key" + (f"; did you mean '{'.'.join(map(str, loc[:-1] + (hint[0],)))}'?" if hint else "")
            msg += f" (allowed here: {', '.join(allowed)})"
        elif e["type"] == "value_error" and not loc:  # cross-field checks name their own fields
            lines += [f"  {m}" for m in e["msg"].removeprefix("Value error, ").split("\n")]
            continue
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] not in ("value_error", "missing"):
                msg += f" (got {e.get('input')!r})"
        lines.append(f"  {path}: {msg}")
    return f"{source}: {len(lines)} problem(s) in the run file:\n" + "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "run file") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise TunelabError(format_errors(err, source)) from None


def read_toml(path: str | Path, what: str = "run file") -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is a TunelabError naming it (and the line)."""
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"{path}: no such {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise TunelabError(f"{path}: not valid UTF-8 (byte {err.start}); save the {what} as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        message = str(err)
        if message.endswith("(at end of document)"):  # tomllib names no line there: the last one is meant
            last = text.rstrip("\n").count("\n") + 1
            message = message.replace("(at end of document)", f"(at the end of the file, line {last})")
        raise TunelabError(f"{path}: not valid TOML: {message}") from None


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a run file; raises TunelabError listing every problem."""
    cfg = parse_config(read_toml(path), str(path))
    check_installed(cfg, str(path))
    return cfg


WANDB_MISSING = "log.wandb = true needs the wandb package: pip install 'tunelab[wandb]' (or set log.wandb = false)"


def check_installed(cfg: RunConfig, source: str = "run file") -> None:
    """Optional packages the run file asks for must be installed: checked when a run file is loaded
    (train, config check, --dry-run), before any model. Not a model validator, so a run's resolved
    config.json still reads on a machine without them (grids, reports)."""
    import importlib.util

    if cfg.log.wandb and importlib.util.find_spec("wandb") is None:
        raise TunelabError(f"{source}: {WANDB_MISSING}")
    module, package = _OPTIMIZER_PACKAGES.get(cfg.optim.name, (None, None))
    if module and importlib.util.find_spec(module) is None:
        raise TunelabError(f"{source}: optim.name = {cfg.optim.name!r} needs the {package} package: pip install {package} "
                           "(or 'tunelab[optimizers]'), or choose another optim.name")


# optim.name -> (module, package) for the optional optimizers check_installed looks for
_OPTIMIZER_PACKAGES = {"adamw_schedulefree": ("schedulefree", "schedulefree"), "optimi_adamw": ("optimi", "torch-optimi"),
                       "optimi_lion": ("optimi", "torch-optimi"), "optimi_stableadamw": ("optimi", "torch-optimi"),
                       "optimi_adan": ("optimi", "torch-optimi")}


def save_resolved(cfg: RunConfig, path: str | Path) -> Path:
    """The config with every default filled in, as JSON (written atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n")
    tmp.replace(path)
    return path


def field_docs(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, description) for every setting: the run file's reference."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += field_docs(ann, f"{prefix}{name}.")
        else:
            default = field.get_default(call_default_factory=True)
            rows.append((prefix + name, json.dumps(default), field.description or ""))
    return rows
