"""kohya's `sdxl_train.py` flags -> tunelab's run file, flag by flag.

Every flag gets a row: **mapped** (the setting it became), **not applicable** (tunelab does it
another way, and how), **not yet supported** (the feature has not landed: the run file would train
without it), or **unknown**. Where tunelab's default differs from kohya's, the converted run file
states kohya's value, so the run means what the script meant (the defaults below are sd-scripts'
`library/train_util.py` argument defaults and `sdxl_train.py`'s use of them):

  max_train_steps 1600 when no epochs are given; learning_rate 2e-6 (and the text encoders
  follow it unless `--learning_rate_te1/te2`); max_grad_norm 1.0; mixed_precision "no";
  max_token_length 75 (one chunk); save_every_n_epochs none; saved dtype = the training dtype
  (fp32, or bf16 under full_bf16) unless `--save_precision`; gradient checkpointing off;
  max_train_epochs overrides max_train_steps; `--learning_rate 0` freezes the UNet;
  `--block_lr` holds 23 learning rates (0 freezes a block): `train.parts.block_lr_values`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunelab.errors import TunelabError
from tunelab.kohya.shell import Flag

MAPPED, NOT_APPLICABLE, NOT_YET, UNKNOWN = "mapped", "not applicable", "not yet supported", "unknown"
_DEEPSPEED = ("tunelab takes DeepSpeed from the accelerate config: launch with distributed_type DEEPSPEED and "
              "this setting in its deepspeed_config (examples/accelerate/deepspeed-zero2.yaml; docs/training.md, "
              "'DeepSpeed')")

KOHYA_DEFAULTS = {"max_train_steps": 1600, "learning_rate": 2e-6, "max_grad_norm": 1.0, "mixed_precision": "no"}

_OPTIMIZERS = {"adamw": "adamw", "adamw8bit": "adamw8bit", "lion": "lion", "adafactor": "adafactor", "prodigy": "prodigy",
               "came": "came", "adamwschedulefree": "adamw_schedulefree"}
_LATER_OPTIMIZERS = {"pagedadamw8bit", "pagedadamw", "pagedadamw32bit", "lion8bit", "pagedlion8bit", "sgdnesterov",
                     "sgdnesterov8bit", "dadaptation", "dadaptadam", "dadaptadagrad", "dadaptadan",
                     "dadaptadanip", "dadaptlion", "dadaptsgd", "radamschedulefree", "sgdschedulefree"}
# torch-optimi's constructor defaults (optimi/adamw.py, lion.py, stableadamw.py, adan.py), what kohya
# hands an `optimi.*` class when --optimizer_args leave them out
_OPTIMI_DEFAULTS = {"optimi_adamw": {"betas": [0.9, 0.99], "weight_decay": 1e-2, "eps": 1e-6},
                    "optimi_lion": {"betas": [0.9, 0.99], "weight_decay": 0.0},
                    "optimi_stableadamw": {"betas": [0.9, 0.99], "weight_decay": 1e-2, "eps": 1e-6},
                    "optimi_adan": {"betas": [0.98, 0.92, 0.99], "weight_decay": 2e-2, "eps": 1e-6}}
_SCHEDULES = {"constant": "constant", "constant_with_warmup": "constant_with_warmup", "cosine": "cosine",
              "linear": "linear", "cosine_with_restarts": "cosine_with_restarts", "polynomial": "polynomial",
              "warmup_stable_decay": "warmup_stable_decay", "cosine_with_min_lr": "cosine"}
_SAMPLERS = {"euler": "Euler", "euler_a": "Euler a", "k_euler": "Euler", "k_euler_a": "Euler a", "ddim": "DDIM",
             "dpmsolver++": "DPM++ 2M", "k_dpm_2m": "DPM++ 2M", "dpmsingle": "DPM++ 2M", "unipc": "UniPC"}
_SAVE_DTYPES = {"float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
_TOKENS_TO_CHUNKS = {75: 1, 150: 2, 225: 3}


@dataclass
class Row:
    flag: str
    value: str
    status: str
    what: str  # the setting it became, or why not


@dataclass
class Conversion:
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # {"optim": {...}, "data.captions": {...}}
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    world_size: int | None = None
    data_sources: list[str] = field(default_factory=list)  # `tunelab data index` sources
    dataset_config: str | None = None  # a kohya dataset TOML named by --dataset_config
    given: dict[str, Flag] = field(default_factory=dict)

    def set(self, key: str, value: Any) -> str:
        section, _, name = key.rpartition(".")
        self.settings.setdefault(section, {})[name] = value
        return key

    def get(self, key: str, default: Any = None) -> Any:
        section, _, name = key.rpartition(".")
        return self.settings.get(section, {}).get(name, default)

    def value(self, flag: str) -> str | None:
        f = self.given.get(flag)
        return None if f is None else (f.values[0] if f.values else "")

    def number(self, flag: str, default: float | None = None) -> float | None:
        v = self.value(flag)
        return default if v is None else _float(v, flag)


def _float(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise TunelabError(f"--{flag}={text!r}: not a number") from None


def _int(text: str, flag: str) -> int:
    v = _float(text, flag)
    if v != int(v):
        raise TunelabError(f"--{flag}={text!r}: not a whole number")
    return int(v)


def _one(f: Flag) -> str:
    if not f.values:
        raise TunelabError(f"--{f.name} needs a value (line {f.line})" if f.line else f"--{f.name} needs a value")
    return f.values[0]


Handler = Callable[[Conversion, Flag], tuple[str, str]]


def _documented(handler: Handler, status: str, doc: str) -> Handler:
    handler.status, handler.doc = status, doc  # type: ignore[attr-defined]  # for the flag reference
    return handler


def to(key: str, kind: Callable[[str, str], Any] = lambda v, f: v) -> Handler:
    def apply(c: Conversion, f: Flag) -> tuple[str, str]:
        return MAPPED, c.set(key, kind(_one(f), f.name))
    return _documented(apply, MAPPED, f"`{key}`")


def switch(key: str, value: Any = True) -> Handler:
    return _documented(lambda c, f: (MAPPED, c.set(key, value)), MAPPED, f"`{key} = {json.dumps(value)}`")


def na(reason: str) -> Handler:
    return _documented(lambda c, f: (NOT_APPLICABLE, reason), NOT_APPLICABLE, reason)


def later(reason: str) -> Handler:
    return _documented(lambda c, f: (NOT_YET, reason), NOT_YET, reason)


def choose(key: str, table: dict[str, str], what: str, kept: str, doc: str) -> Handler:
    """A flag whose value is one of kohya's names, looked up in `table` (any case)."""
    def apply(c: Conversion, f: Flag) -> tuple[str, str]:
        name = _one(f).lower()
        if name in table:
            return MAPPED, c.set(key, table[name])
        return NOT_YET, f"{what} {name!r} (tunelab has {', '.join(dict.fromkeys(table.values()))}); {kept}"
    return _documented(apply, MAPPED, doc)


def mapped(doc: str) -> Callable[[Handler], Handler]:
    """A hand-written handler's line in the flag reference."""
    return lambda handler: _documented(handler, MAPPED, doc)


def _number(v: str, f: str) -> float:
    return _float(v, f)


def _whole(v: str, f: str) -> int:
    return _int(v, f)


# --- handlers that need more than one value ---------------------------------------------------------


@mapped('`optim.lr_unet` (0 freezes the UNet, as in kohya); the text encoders follow it unless `--learning_rate_te1/te2`')
def _lr(c: Conversion, f: Flag) -> tuple[str, str]:
    return MAPPED, c.set("optim.lr_unet", _float(_one(f), f.name))


@mapped("`train.parts.block_lr_values`: kohya's 23 learning rates as they are (tunelab derives the multipliers; 0 freezes a block)")
def _block_lr(c: Conversion, f: Flag) -> tuple[str, str]:
    values = [v for text in f.values for v in text.split(",") if v.strip()]
    lrs = [_float(v, f.name) for v in values]
    if len(lrs) != 23:
        raise TunelabError(f"--block_lr has {len(lrs)} values; kohya's sdxl_train.py takes 23 (BASE, IN00-08, MID00-02, "
                           "OUT00-08, OUT)")
    base = c.number("learning_rate", KOHYA_DEFAULTS["learning_rate"])
    if not base:
        return NOT_APPLICABLE, "--learning_rate 0 freezes the UNet, so its block learning rates do nothing"
    c.set("train.parts.block_lr_values", lrs)
    return MAPPED, "train.parts.block_lr_values (kohya's learning rates, as they are)"


@mapped('`optim.name`: AdamW, AdamW8bit, Lion, AdaFactor, Prodigy, CAME, AdamWScheduleFree (`adamw_schedulefree`: schedule constant, its `warmup_steps` optimizer argument -> `optim.warmup_steps`), `optimi.AdamW` / `Lion` / `StableAdamW` / `Adan` (`optimi_*`, with optimi\'s defaults; Kahan summation under `--full_bf16`, as optimi does by itself); a full class path -> `optim.name = "class"`, `optim.class_path` (others: not yet supported)')
def _optimizer(c: Conversion, f: Flag) -> tuple[str, str]:
    written = _one(f)
    name = written.rsplit(".", 1)[-1].lower()  # full class paths: bitsandbytes.optim.AdamW8bit, came_pytorch.CAME
    if written.lower().startswith("optimi.") and f"optimi_{name}" in _OPTIMI_DEFAULTS:  # before optimi.AdamW -> adamw
        return MAPPED, c.set("optim.name", f"optimi_{name}")
    if name in _OPTIMIZERS:
        return MAPPED, c.set("optim.name", _OPTIMIZERS[name])
    if name in _LATER_OPTIMIZERS:
        return NOT_YET, f"optimizer {written} (tunelab has {', '.join(_OPTIMIZERS.values())}); the run file keeps adamw"
    if "." in written:  # kohya's escape hatch: any class by import path
        c.set("optim.name", "class")
        return MAPPED, c.set("optim.class_path", written)
    return UNKNOWN, f"optimizer {written} is not one tunelab knows; the run file keeps adamw"


@mapped('`weight_decay`, `betas`, `eps` -> `optim.*`; every other item -> `optim.args` (passed to the optimizer, as kohya does)')
def _optimizer_args(c: Conversion, f: Flag) -> tuple[str, str]:
    done, left = [], []
    for item in f.values:
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq:
            raise TunelabError(f"--optimizer_args item {item!r} is not key=value")
        if key == "weight_decay":
            done.append(c.set("optim.weight_decay", _float(value, "optimizer_args weight_decay")))
        elif key == "betas":
            b = [_float(v, "optimizer_args betas") for v in value.replace("(", "").replace(")", "").split(",") if v]
            if len(b) not in (2, 3):  # three: optimi's Adan
                raise TunelabError(f"--optimizer_args betas={value!r}: give two numbers, e.g. betas=0.9,0.999 (Adan: three)")
            done.append(c.set("optim.betas", b))
        elif key == "eps":
            done.append(c.set("optim.eps", _float(value, "optimizer_args eps")))
        else:
            left.append(key)
            args = dict(c.get("optim.args") or {})
            args[key] = _arg_value(value)
            c.set("optim.args", args)
    if left:
        done.append(f"optim.args ({', '.join(left)}: passed to the optimizer as kohya does)")
    return MAPPED, ", ".join(done)


def _arg_value(text: str) -> Any:
    """kohya evaluates each optimizer argument as a Python literal; the same for numbers and booleans."""
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    for kind in (int, float):
        try:
            return kind(t)
        except ValueError:
            pass
    return t.strip("'\"")


@mapped('`train.fused_backward = true` with `train.max_grad_norm_scope = "per_parameter"` (kohya clips each '
        'parameter\'s gradient on its own in its fused pass)')
def _fused_backward(c: Conversion, f: Flag) -> tuple[str, str]:
    c.set("train.fused_backward", True)
    c.set("train.max_grad_norm_scope", "per_parameter")  # sdxl_train.py: clip_grad_norm_(tensor, max_grad_norm) in the hook
    return MAPPED, ("train.fused_backward = true, train.max_grad_norm_scope = 'per_parameter' (kohya clips each "
                    "parameter's gradient on its own there)")


@mapped("`optim.warmup_steps` (a value below 1 is kohya's share of the total steps)")
def _warmup(c: Conversion, f: Flag) -> tuple[str, str]:
    v = _float(_one(f), f.name)
    if v < 1 and v != 0:  # kohya: a float below 1 is a share of the total steps
        total = c.get("train.max_steps") or 0
        if not total:
            return NOT_YET, f"a warm-up of {v:g} x the total steps needs a known step count (use whole steps)"
        c.set("optim.warmup_steps", int(v * total))
        return MAPPED, f"optim.warmup_steps ({v:g} x {total} steps)"
    return MAPPED, c.set("optim.warmup_steps", int(v))


@mapped('`train.parts.text_encoder = "on"` (`"only"` with `--learning_rate 0`; absent: `"off"`)')
def _text_encoder(c: Conversion, f: Flag) -> tuple[str, str]:
    return MAPPED, "train.parts.text_encoder (with --learning_rate: on, or only when it is 0)"


@mapped("`model.max_chunks`: 75 -> 1, 150 -> 2, 225 -> 3 (absent: 1, kohya's 75 tokens)")
def _tokens(c: Conversion, f: Flag) -> tuple[str, str]:
    n = _int(_one(f), f.name)
    if n not in _TOKENS_TO_CHUNKS:
        raise TunelabError(f"--max_token_length={n}: kohya takes 75, 150 or 225")
    return MAPPED, c.set("model.max_chunks", _TOKENS_TO_CHUNKS[n])


@mapped('`data.buckets.resolution` (W,H: the side of a square of the same area)')
def _resolution(c: Conversion, f: Flag) -> tuple[str, str]:
    parts = [_int(v, f.name) for v in _one(f).replace("x", ",").split(",") if v.strip()]
    if len(parts) == 2 and parts[0] != parts[1]:
        side = int((parts[0] * parts[1]) ** 0.5)
        c.set("data.buckets.resolution", side)
        return MAPPED, f"data.buckets.resolution = {side} (buckets keep the area of {parts[0]}x{parts[1]})"
    return MAPPED, c.set("data.buckets.resolution", parts[0])


@mapped('`loss.type`: l2, huber, smooth_l1 (l1: not yet supported)')
def _loss_type(c: Conversion, f: Flag) -> tuple[str, str]:
    name = _one(f).lower()
    if name in ("l2", "huber", "smooth_l1"):
        return MAPPED, c.set("loss.type", name)
    return NOT_YET, f"loss {name!r} (tunelab has l2, huber, smooth_l1); the run file keeps l2"


@mapped('`save.dtype`: float -> fp32, fp16, bf16 (absent: the training dtype, as kohya)')
def _save_precision(c: Conversion, f: Flag) -> tuple[str, str]:
    name = _one(f).lower()
    if name not in _SAVE_DTYPES:
        raise TunelabError(f"--save_precision={name!r}: kohya takes float, fp16 or bf16")
    return MAPPED, c.set("save.dtype", _SAVE_DTYPES[name])


@mapped('`save.keep_last` = steps / `--save_every_n_steps`')
def _save_last_n_steps(c: Conversion, f: Flag) -> tuple[str, str]:
    every = c.number("save_every_n_steps")
    if not every:
        return NOT_APPLICABLE, "without --save_every_n_steps there are no step checkpoints to prune"
    keep = max(1, int(_float(_one(f), f.name) // every))
    c.set("save.keep_last", keep)
    return MAPPED, f"save.keep_last = {keep} (the last {_one(f)} steps of checkpoints every {every:g})"


@mapped('`log.wandb = true` for wandb / all (tensorboard is always written)')
def _log_with(c: Conversion, f: Flag) -> tuple[str, str]:
    name = _one(f).lower()
    if name in ("wandb", "all"):
        c.set("log.wandb", True)
        return MAPPED, "log.wandb = true (tensorboard events are always written, to RUN/events)"
    return MAPPED, "tensorboard: always written, to RUN/events"


@mapped('`grid.prompts` from the file (and its `--n`, `--d`, `--l`, `--s`)')
def _sample_prompts(c: Conversion, f: Flag) -> tuple[str, str]:
    path = Path(_one(f))
    if not path.is_file():
        return NOT_YET, f"{path} not found here: copy its prompts into [grid] prompts"
    prompts, seeds, negative = [], [], ""
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        text, *options = line.split(" --")
        prompts.append(text.strip())
        for opt in options:
            key, _, value = opt.partition(" ")
            if key == "n":
                negative = value.strip()
            elif key == "d" and value.strip().lstrip("-").isdigit():
                seeds.append(int(value))
            elif key == "l":
                c.set("grid.cfg", _float(value, "sample_prompts --l"))
            elif key == "s":
                c.set("grid.steps", _int(value, "sample_prompts --s"))
    c.set("grid.prompts", prompts)
    if negative:
        c.set("grid.negative", negative)
    if seeds:
        c.set("grid.seeds", sorted(set(seeds)))
    return MAPPED, f"grid.prompts ({len(prompts)} prompts from {path.name}; --n, --d, --l, --s read; --w/--h: the bucket)"


@mapped("the index's source: `folder:DIR` (kohya's N_concept folders count N times), or the images of `--in_json`")
def _data_dir(c: Conversion, f: Flag) -> tuple[str, str]:
    return MAPPED, "the index's source (folder, or the images of --in_json)"


@mapped("the index's source: `kohya:META.json,images=DIR`; captions `concat`, caption first (kohya: caption, then tags)")
def _in_json(c: Conversion, f: Flag) -> tuple[str, str]:
    return MAPPED, "the index's source: kohya metadata JSON"


@mapped("the index's sources (one per subset, `repeats=num_repeats`) and caption and bucket settings")
def _dataset_config(c: Conversion, f: Flag) -> tuple[str, str]:
    c.dataset_config = _one(f)
    return MAPPED, "the index's sources and caption settings (kohya dataset TOML)"


@mapped("`data.captions.mode`: .txt -> tags, .caption -> caption (absent: kohya's .caption)")
def _caption_extension(c: Conversion, f: Flag) -> tuple[str, str]:
    from tunelab.kohya.dataset import caption_mode

    for key, value in caption_mode(_one(f), metadata="in_json" in c.given).items():
        c.set(key, value)
    return MAPPED, f"data.captions.mode = {c.get('data.captions.mode')!r}"


@mapped("`data.latents` = the image folder: kohya's .npz files read as they are")
def _cache_to_disk(c: Conversion, f: Flag) -> tuple[str, str]:
    return MAPPED, "data.latents: kohya's .npz files beside the images, read as they are"


TE = "tunelab's text encoders follow train.parts.text_encoder"

TABLE: dict[str, Handler] = {
    # model, run
    "pretrained_model_name_or_path": to("model.base"),
    "output_dir": to("run.output_dir"),
    "output_name": to("run.name"),
    "seed": to("run.seed", _whole),
    "vae": later("a separate VAE file (tunelab uses the base's VAE; bake it in with `tunelab merge` once merging lands)"),
    "no_half_vae": na("tunelab encodes latents with the VAE in fp32"),
    "tokenizer_cache_dir": na("tokenizers come from model.tokenizers (a local folder; docs/text-conditioning.md)"),
    "clip_skip": na("SDXL always conditions on the penultimate layers (sdxl_train.py ignores clip_skip too)"),
    "max_token_length": _tokens,
    # learning rates and what trains
    "learning_rate": _lr,
    "learning_rate_te1": to("optim.lr_text_encoder_1", _number),
    "learning_rate_te2": to("optim.lr_text_encoder_2", _number),
    "train_text_encoder": _text_encoder,
    "block_lr": _block_lr,
    # optimizer and schedule
    "optimizer_type": _optimizer,
    "use_8bit_adam": switch("optim.name", "adamw8bit"),
    "use_lion_optimizer": switch("optim.name", "lion"),
    "optimizer_args": _optimizer_args,
    "lr_scheduler": choose("optim.schedule", _SCHEDULES, "schedule", "the run file keeps constant",
                           "`optim.schedule`: constant, constant_with_warmup, cosine, linear, cosine_with_restarts, polynomial, warmup_stable_decay (others: not yet supported)"),
    "lr_warmup_steps": _warmup,
    "lr_scheduler_num_cycles": to("optim.num_cycles", _whole),
    "lr_scheduler_power": to("optim.power", _number),
    "lr_scheduler_args": later("scheduler arguments"),
    "lr_scheduler_type": later("custom scheduler classes"),
    "lr_decay_steps": to("optim.decay_steps", _whole),
    "lr_scheduler_min_lr_ratio": to("optim.min_lr_ratio", _number),
    "max_grad_norm": to("train.max_grad_norm", _number),
    "fused_backward_pass": _fused_backward,
    "fused_optimizer_groups": later("fused optimizer groups"),
    # steps, batches, precision
    "max_train_steps": to("train.max_steps", _whole),
    "max_train_epochs": to("train.epochs", _whole),
    "train_batch_size": to("train.batch_size", _whole),
    "gradient_accumulation_steps": to("train.grad_accumulation", _whole),
    "mixed_precision": to("train.mixed_precision"),
    "full_bf16": switch("train.full_bf16"),
    "full_fp16": later("fp16 weights (use --full_bf16: bf16 weights with stochastic rounding)"),
    "gradient_checkpointing": switch("train.gradient_checkpointing"),
    "max_data_loader_n_workers": to("train.dataloader_workers", _whole),
    "persistent_data_loader_workers": na("tunelab's loader keeps its workers for the whole run"),
    "xformers": na("tunelab uses PyTorch's scaled-dot-product attention (memory-efficient kernels included)"),
    "sdpa": na("tunelab always uses PyTorch's scaled-dot-product attention"),
    "mem_eff_attn": na("tunelab uses PyTorch's scaled-dot-product attention"),
    "diffusers_xformers": na("tunelab uses PyTorch's scaled-dot-product attention"),
    "lowram": na("tunelab loads weights straight into empty modules (one copy)"),
    "highvram": na("no effect in tunelab"),
    "lowvram": na("no effect in tunelab"),
    "deepspeed": na(_DEEPSPEED),
    "zero_stage": na(_DEEPSPEED),
    "offload_optimizer_device": na(_DEEPSPEED),
    "offload_optimizer_nvme_path": na(_DEEPSPEED),
    "offload_param_device": na(_DEEPSPEED),
    "offload_param_nvme_path": na(_DEEPSPEED),
    "zero3_init_flag": later("DeepSpeed ZeRO-3"),
    "zero3_save_16bit_model": later("DeepSpeed ZeRO-3"),
    "fp16_master_weights_and_gradients": later("DeepSpeed fp16 master weights"),
    "ddp_timeout": na("tunelab uses accelerate's defaults"),
    "ddp_gradient_as_bucket_view": na("tunelab uses accelerate's defaults"),
    "ddp_static_graph": na("tunelab uses accelerate's defaults"),
    # objective and loss
    "v_parameterization": switch("objective.prediction", "v"),
    "zero_terminal_snr": switch("objective.zero_terminal_snr"),
    "loss_type": _loss_type,
    "huber_schedule": to("loss.huber_schedule"),
    "huber_c": to("loss.huber_c", _number),
    "min_snr_gamma": to("loss.min_snr_gamma", _number),
    "noise_offset": to("loss.noise_offset", _number),
    "noise_offset_random_strength": switch("loss.noise_offset_random_strength"),
    "adaptive_noise_scale": later("adaptive noise scale"),
    "multires_noise_iterations": to("loss.multires_noise_iterations", _whole),
    "multires_noise_discount": to("loss.multires_noise_discount", _number),
    "ip_noise_gamma": to("loss.ip_noise_gamma", _number),
    "ip_noise_gamma_random_strength": switch("loss.ip_noise_gamma_random_strength"),
    "min_timestep": to("objective.min_timestep", _whole),
    "max_timestep": to("objective.max_timestep", _whole),
    "debiased_estimation_loss": switch("loss.debiased_estimation"),
    "scale_v_pred_loss_like_noise_pred": later("v-prediction loss scaling"),
    "v_pred_like_loss": later("v-prediction-like loss"),
    "masked_loss": later("masked loss"),
    "weighted_captions": later("A1111 weighting in training captions (grids support it)"),
    # captions and buckets
    "shuffle_caption": switch("data.captions.shuffle_tags"),
    "keep_tokens": to("data.captions.keep_tags", _whole),
    "caption_dropout_rate": to("data.captions.caption_dropout", _number),
    "caption_tag_dropout_rate": to("data.captions.tag_dropout", _number),
    "caption_dropout_every_n_epochs": later("caption dropout every N epochs"),
    "keep_tokens_separator": later("a keep-tokens separator"),
    "secondary_separator": later("a secondary tag separator"),
    "enable_wildcard": na("{a|b} wildcards are on by default (data.captions.wildcards)"),
    "caption_prefix": later("caption prefix / suffix"),
    "caption_suffix": later("caption prefix / suffix"),
    "caption_extension": _caption_extension,
    "caption_extention": _caption_extension,  # kohya's old misspelling, still accepted there
    "token_warmup_min": later("token warm-up"),
    "token_warmup_step": later("token warm-up"),
    "resolution": _resolution,
    "enable_bucket": na("tunelab always buckets (kohya's bucket rules: data.buckets)"),
    "min_bucket_reso": to("data.buckets.min_side", _whole),
    "max_bucket_reso": to("data.buckets.max_side", _whole),
    "bucket_reso_steps": to("data.buckets.step", _whole),
    "bucket_no_upscale": switch("data.buckets.no_upscale"),
    "flip_aug": switch("data.flip_aug"),
    "color_aug": later("colour augmentation"),
    "random_crop": switch("data.random_crop"),
    "face_crop_aug_range": later("face crops"),
    "alpha_mask": later("alpha masks"),
    # data
    "train_data_dir": _data_dir,
    "in_json": _in_json,
    "dataset_config": _dataset_config,
    "reg_data_dir": later("regularisation images (index them as a second source with their own repeats)"),
    "dataset_repeats": later("dataset repeats for metadata datasets (use the dataset TOML's num_repeats)"),
    "cache_latents": na("latents are read from data.latents (`tunelab data cache` or kohya's .npz), else encoded on the fly"),
    "cache_latents_to_disk": _cache_to_disk,
    "vae_batch_size": na("`tunelab data cache --batch-size`"),
    "skip_cache_check": na("tunelab checks the latent cache against the index before the first step"),
    "cache_text_encoder_outputs": na("tunelab encodes prompts every step (captions change with shuffles and dropout)"),
    "cache_text_encoder_outputs_to_disk": na("tunelab encodes prompts every step"),
    "dataset_class": na("tunelab's data comes from its index"),
    "debug_dataset": na("`tunelab data preview` shows what the model sees"),
    # saving, resuming, logging
    "save_every_n_steps": to("save.every_n_steps", _whole),
    "save_every_n_epochs": to("save.every_n_epochs", _whole),
    "save_precision": _save_precision,
    "save_model_as": na("tunelab writes single-file SGM .safetensors (`tunelab model convert` for diffusers folders)"),
    "use_safetensors": na("tunelab always writes .safetensors"),
    "save_last_n_epochs": to("save.keep_last", _whole),
    "save_last_n_steps": _save_last_n_steps,
    "save_last_n_epochs_state": na("save.keep_states keeps the newest training states"),
    "save_last_n_steps_state": na("save.keep_states keeps the newest training states"),
    "save_state": na("tunelab always saves a training state with each checkpoint (exact resume)"),
    "save_state_on_train_end": na("tunelab always saves the final state"),
    "save_n_epoch_ratio": later("checkpoints at a fraction of epochs"),
    "resume": na("run `tunelab train` again on the run directory: it resumes from its newest complete state"),
    "logging_dir": na("tensorboard events go to RUN/events (and metrics.parquet); `tunelab loss` reads kohya's logs too"),
    "log_prefix": na("the run's name (run.name) labels its logs"),
    "log_with": _log_with,
    "log_tracker_name": na("the run's name (run.name) names the W&B run"),
    "log_tracker_config": na("W&B settings live in [log]"),
    "wandb_run_name": na("the W&B run takes run.name"),
    "wandb_api_key": na("log in once with `wandb login`"),
    "log_config": na("the resolved run file is always kept (RUN/config.json)"),
    "sample_prompts": _sample_prompts,
    "sample_every_n_steps": to("grid.every_n_steps", _whole),
    "sample_every_n_epochs": later("grids every N epochs (use grid.every_n_steps)"),
    "sample_at_first": na("the probes measure the base at step 0 ([probe] enabled)"),
    "sample_sampler": choose("grid.sampler", _SAMPLERS, "sampler", "grids use Euler",
                             "`grid.sampler` (euler -> Euler, euler_a -> Euler a, ddim -> DDIM, dpmsolver++ -> DPM++ 2M, ...)"),
    "training_comment": na("tunelab's checkpoints carry the run name and the training numbers in their metadata"),
    "output_config": na("`tunelab config show RUN.toml` prints the resolved run file"),
    "config_file": na("read: its settings are merged under the command line's"),
    "console_log_level": na("tunelab logs at INFO"),
    "console_log_file": na("redirect the output"),
    "console_log_simple": na("tunelab logs plain lines"),
}

ACCELERATE = {
    "num_processes": "processes: train.expect_world_size (the effective batch counts them)",
    "num_machines": "machines: the world size is num_processes in all",
    "multi_gpu": "DDP: what accelerate launch gives tunelab too",
    "mixed_precision": "kohya passes its own --mixed_precision to accelerate, which takes precedence",
    "config_file": "read for num_processes when the file is here",
    "gpu_ids": "pass it to `accelerate launch` for tunelab the same way",
    "main_process_port": "pass it to `accelerate launch` for tunelab the same way",
    "main_process_ip": "pass it to `accelerate launch` for tunelab the same way",
    "machine_rank": "pass it to `accelerate launch` for tunelab the same way",
    "num_cpu_threads_per_process": "pass it to `accelerate launch` for tunelab the same way",
    "dynamo_backend": "train.compile = true compiles the UNet",
}


def flag_reference() -> list[tuple[str, str, str]]:
    """(flag, status, what it becomes or why not) for every flag tunelab knows: docs/coming-from-kohya.md."""
    return [(name, getattr(h, "status", MAPPED), getattr(h, "doc", "")) for name, h in TABLE.items()]
