"""`tunelab config from-kohya`: a kohya launch -> a tunelab run file, its dataset sources, and a
table of every flag that did not map (docs/coming-from-kohya.md)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.kohya.flags import ACCELERATE, KOHYA_DEFAULTS, MAPPED, NOT_APPLICABLE, NOT_YET, TABLE, UNKNOWN, Conversion, Row, _int
from tunelab.kohya.shell import Flag, Launch, parse_script, parse_words

# Flags whose handlers read other flags run after these.
_FIRST = ("learning_rate", "max_train_steps", "max_train_epochs", "save_every_n_steps", "train_text_encoder")


@dataclass
class Converted:
    launch: Launch
    conversion: Conversion
    text: str  # the run file (TOML)

    @property
    def settings(self) -> dict[str, dict[str, Any]]:
        return self.conversion.settings


def read_launch(args: list[str]) -> Launch:
    """One script file, or the words of a command line (with or without `accelerate launch`)."""
    if len(args) == 1 and Path(args[0]).is_file():
        path = Path(args[0])
        return parse_script(path.read_text(encoding="utf-8", errors="replace"), str(path))
    if not args:
        raise TunelabError("give a kohya launch script (train.sh, train.bat, train.ps1) or its command line after --")
    return parse_words(args)


def _config_file_flags(path: Path) -> list[Flag]:
    """kohya's own --config_file TOML (argument names as keys, tables only group them)."""
    from tunelab.config import read_toml

    data = read_toml(path, "kohya --config_file")
    flat: dict[str, Any] = {}

    def walk(d: dict[str, Any]) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v)
            else:
                flat[k] = v

    walk(data)
    flags = []
    for name, v in flat.items():
        if v is False or v is None:
            continue
        if v is True:
            values: list[str] = []
        elif isinstance(v, list):
            values = [str(x) for x in v] if name != "block_lr" else [",".join(str(x) for x in v)]
        else:
            values = [str(v)]
        flags.append(Flag(name, values, 0))
    return flags


def convert(launch: Launch, index: str = "index.parquet") -> Converted:
    c = Conversion(notes=list(launch.notes))
    flags = list(launch.flags)
    cf = next((f for f in flags if f.name == "config_file"), None)
    if cf is not None and cf.values:
        path = Path(cf.values[0])
        if path.is_file():
            flags = _config_file_flags(path) + flags  # the command line wins
            c.notes.append(f"read kohya's --config_file {path} ({len(flags) - len(launch.flags)} settings; the command "
                           "line's flags take precedence)")
        else:
            c.notes.append(f"--config_file {path} is not here: its settings are not in the run file")
    for f in flags:
        if f.name in c.given and f.line and c.given[f.name].line:
            c.notes.append(f"--{f.name} given twice (lines {c.given[f.name].line} and {f.line}): the last one counts")
        c.given[f.name] = f
    if not launch.script.replace("\\", "/").rsplit("/", 1)[-1].startswith("sdxl_train"):
        raise TunelabError(f"{launch.source}: {launch.script} is not kohya's full SDXL finetune (sdxl_train.py); "
                           "tunelab trains full finetunes, not LoRA networks")
    order = [n for n in _FIRST if n in c.given] + [n for n in c.given if n not in _FIRST]
    for name in order:
        f = c.given[name]
        handler = TABLE.get(name)
        if handler is None:
            c.rows.append(Row(name, " ".join(f.values), UNKNOWN, "not a flag of kohya's sdxl_train.py that tunelab knows"))
            continue
        status, what = handler(c, f)
        c.rows.append(Row(name, " ".join(f.values), status, what))
    _kohya_defaults(c)
    _launcher(c, launch.launcher)
    _data(c, index)
    _random_crop_without_cache(c)
    _schedule_free(c)
    _optimi(c)
    text = to_toml(c.settings, _header(launch, c))
    return Converted(launch, c, text)


def _kohya_defaults(c: Conversion) -> None:
    """What kohya does when a flag is absent, written out where tunelab's default differs."""
    given = c.given
    if "max_train_epochs" in given:
        c.set("train.max_steps", 0)  # kohya: epochs override steps
    elif "max_train_steps" not in given:
        c.set("train.max_steps", KOHYA_DEFAULTS["max_train_steps"])
        c.notes.append("no --max_train_steps or --max_train_epochs: kohya's default of 1600 steps")
    lr = c.get("optim.lr_unet")
    if lr is None:
        lr = KOHYA_DEFAULTS["learning_rate"]
        c.set("optim.lr_unet", lr)
        c.notes.append("no --learning_rate: kohya's default 2e-6")
    if "train_text_encoder" in given:
        for i in (1, 2):
            if c.get(f"optim.lr_text_encoder_{i}") is None:
                c.set(f"optim.lr_text_encoder_{i}", lr)  # kohya: the TEs follow --learning_rate
        c.set("train.parts.text_encoder", "only" if lr == 0 else "on")
    else:
        c.set("train.parts.text_encoder", "off")
        if lr == 0:
            raise TunelabError("--learning_rate 0 without --train_text_encoder trains nothing (kohya's sdxl_train.py "
                               "freezes the UNet at learning rate 0)")
        for i in (1, 2):
            if c.get(f"optim.lr_text_encoder_{i}") is not None:
                c.notes.append(f"--learning_rate_te{i} without --train_text_encoder: kohya trains no text encoder")
    for flag, key, value in (("max_grad_norm", "train.max_grad_norm", KOHYA_DEFAULTS["max_grad_norm"]),
                             ("mixed_precision", "train.mixed_precision", KOHYA_DEFAULTS["mixed_precision"]),
                             ("max_token_length", "model.max_chunks", 1),
                             ("save_every_n_epochs", "save.every_n_epochs", 0),
                             ("gradient_checkpointing", "train.gradient_checkpointing", False)):
        if flag not in given:
            c.set(key, value)
    if "max_token_length" not in given:
        c.notes.append("no --max_token_length: kohya's 75 tokens (model.max_chunks = 1); tunelab counts the prompts "
                       "it truncates in the banner; raise model.max_chunks to 3 for 225 tokens")
    if "save_precision" not in given:
        c.set("save.dtype", "bf16" if c.get("train.full_bf16") else "fp32")
    if "seed" not in given:
        c.set("run.seed", 0)
        c.notes.append("no --seed: kohya draws a random seed; the run file fixes it at 0 (runs repeat exactly)")
    if c.get("train.full_bf16") and c.get("train.bf16_update") is None:
        if c.get("optim.name") in ("adamw", "lion", None):
            c.notes.append("--full_bf16: kohya rounds each bf16 update to nearest (at lr 1.5e-6 most updates vanish); "
                           "tunelab keeps every update (train.bf16_update = 'exact', +2 bytes per weight; 'stochastic' "
                           "needs none); set 'nearest' to "
                           "reproduce kohya (docs/training.md)")
        else:
            c.set("train.bf16_update", "nearest")
            c.notes.append(f"--full_bf16 with {c.get('optim.name')}: bf16 updates are rounded to nearest, as in kohya "
                           "(train.bf16_update = 'nearest': at lr 1.5e-6 most updates vanish); tunelab's remedies are "
                           "for optim.name = 'adamw' / 'lion' (exact, stochastic) and the optimi_* optimizers (kahan)")
    _objective(c)
    if c.get("run.output_dir") is None:
        c.set("run.output_dir", f"runs/{c.get('run.name') or 'kohya'}")
    if c.get("run.name") is None:
        c.set("run.name", Path(str(c.get("run.output_dir"))).name or "kohya")


def _objective(c: Conversion) -> None:
    """kohya's --v_parameterization on an epsilon base converts it: say so in the run file."""
    from tunelab.models.prediction import PredictionRecord, conversion_note
    from tunelab.config import ObjectiveSection

    if c.get("objective.prediction") is None and not c.get("objective.zero_terminal_snr"):
        return
    base = Path(str(c.get("model.base", "")))
    if not base.is_file():
        return
    from tunelab.models.prediction import base_record

    try:
        record = base_record(str(base))
    except TunelabError:
        return
    mine = PredictionRecord.from_objective(ObjectiveSection(prediction=c.get("objective.prediction", "epsilon"),
                                                            zero_terminal_snr=bool(c.get("objective.zero_terminal_snr"))))
    if record is not None and conversion_note(mine, record):
        c.set("objective.convert_base", True)
        c.notes.append(f"the base predicts {record.describe()}; kohya's flags train {mine.describe()}: "
                       "objective.convert_base = true says the conversion is meant")


def _launcher(c: Conversion, launcher: list[Flag]) -> None:
    world = None
    opts = {f.name: f for f in launcher}
    cfg = opts.get("config_file")
    if cfg is not None and cfg.values and Path(cfg.values[0]).is_file():
        import yaml

        try:
            doc = yaml.safe_load(Path(cfg.values[0]).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            raise TunelabError(f"accelerate --config_file {cfg.values[0]}: not readable YAML ({err})") from None
        if isinstance(doc, dict) and doc.get("num_processes"):
            world = int(doc["num_processes"])
        kind = str(doc.get("distributed_type", "")).upper() if isinstance(doc, dict) else ""
        if kind in ("DEEPSPEED", "FSDP"):
            stage = (doc.get("deepspeed_config") or {}).get("zero_stage") if kind == "DEEPSPEED" else None
            version = (doc.get("fsdp_config") or {}).get("fsdp_version", 1) if kind == "FSDP" else None
            later = version is not None and int(version) != 2
            c.rows.append(Row("accelerate config", str(doc["distributed_type"]), NOT_YET if later else NOT_APPLICABLE,
                              "tunelab shards with FSDP2: set fsdp_version: 2" if later else
                              "launch tunelab with the same accelerate config (docs/training.md, 'Several GPUs and "
                              "machines')"))
    for name, f in opts.items():
        value = " ".join(f.values)
        if name == "num_processes":
            world = _int(f.values[0], "num_processes") if f.values else world
        reason = ACCELERATE.get(name)
        status = MAPPED if name == "num_processes" else NOT_APPLICABLE if reason else UNKNOWN
        c.rows.append(Row(f"accelerate --{name}", value, status, reason or "not an accelerate launch option tunelab reads"))
    if world:
        c.world_size = world
        c.set("train.expect_world_size", world)


def _data(c: Conversion, index: str) -> None:
    c.set("data.index", index)
    image_dir = c.value("train_data_dir")
    meta = c.value("in_json")
    if c.dataset_config:
        from tunelab.kohya.dataset import read_dataset_config

        ds = read_dataset_config(Path(c.dataset_config))
        c.data_sources = ds.sources
        c.notes += ds.notes
        for key, value in ds.settings.items():
            c.set(key, value)
        if ds.latents and "cache_latents_to_disk" in c.given:
            c.set("data.latents", ds.latents)
        if image_dir or meta:
            c.notes.append("--dataset_config is given: kohya ignores --train_data_dir and --in_json, and so does the run file")
        return
    from tunelab.kohya.dataset import caption_mode

    if meta:
        c.data_sources = [f"kohya:{meta}" + (f",images={image_dir}" if image_dir else "")]
    elif image_dir:
        c.data_sources = [f"folder:{image_dir}"]
    if (meta or image_dir) and "caption_extension" not in c.given and "caption_extention" not in c.given:
        for key, value in caption_mode(".caption", metadata=bool(meta)).items():  # kohya's default extension
            c.set(key, value)
    if not (meta or image_dir):
        c.notes.append("no --train_data_dir, --in_json or --dataset_config: name the data with `tunelab data index`")
    if "cache_latents_to_disk" in c.given and (image_dir or meta):
        c.set("data.latents", image_dir or str(Path(meta).parent))


def _random_crop_without_cache(c: Conversion) -> None:
    """kohya refuses a latent cache with random_crop (sdxl_train.py: `assert
    train_dataset_group.is_latent_cacheable()`, library/train_util.py `BaseDataset.is_latent_cacheable`);
    the run file encodes the images while training instead, and says so."""
    if c.get("data.random_crop") and c.get("data.latents"):
        del c.settings["data"]["latents"]
        c.notes.append("random_crop with --cache_latents_to_disk: kohya refuses the two together (a cache fixes each "
                       "crop), so the run file leaves data.latents empty and encodes the images while training")


def _schedule_free(c: Conversion) -> None:
    """kohya gives a schedule-free optimizer a dummy LR scheduler (library/train_util.py
    `get_scheduler_fix` -> `get_dummy_scheduler`): --lr_scheduler and --lr_warmup_steps do nothing;
    its warm-up is the optimizer's own `warmup_steps` argument, tunelab's optim.warmup_steps. Its
    bf16 weights (--full_bf16) take plain rounding, as in kohya: tunelab has no remedy for it."""
    if c.get("optim.name") != "adamw_schedulefree":
        return
    if c.get("optim.schedule", "constant") != "constant" or c.get("optim.warmup_steps"):
        c.notes.append("AdamWScheduleFree: kohya ignores --lr_scheduler and --lr_warmup_steps with it (a dummy "
                       "scheduler); the run file keeps optim.schedule = 'constant'")
    c.set("optim.schedule", "constant")
    args = dict(c.get("optim.args") or {})
    c.set("optim.warmup_steps", int(args.pop("warmup_steps", 0)))  # --optimizer_args warmup_steps=N
    if args:
        c.set("optim.args", args)
    else:
        c.settings["optim"].pop("args", None)
    if c.get("train.full_bf16"):
        c.set("train.bf16_update", "nearest")
        c.notes.append("--full_bf16 with AdamWScheduleFree: bf16 updates are rounded to nearest, as in kohya "
                       "(train.bf16_update = 'nearest'; tunelab's remedies are for adamw / lion)")


def _optimi(c: Conversion) -> None:
    """kohya constructs an `optimi.*` class with its own defaults for what --optimizer_args leave
    out (eps 1e-6, betas (0.9, 0.99), Adan's three), written out here; on bf16 weights optimi turns
    on Kahan summation by itself (kahan_sum=None), tunelab's train.bf16_update = 'kahan'."""
    from tunelab.kohya.flags import _OPTIMI_DEFAULTS

    defaults = _OPTIMI_DEFAULTS.get(str(c.get("optim.name")))
    if defaults is None:
        return
    for key, value in defaults.items():
        if c.get(f"optim.{key}") is None:
            c.set(f"optim.{key}", value)
    if c.get("train.full_bf16"):
        c.set("train.bf16_update", "kahan")
        c.notes.append("--full_bf16 with an optimi optimizer: optimi compensates bf16 updates with Kahan summation "
                       "by itself (train.bf16_update = 'kahan', +2 bytes per weight)")


def index_command(c: Conversion) -> list[str]:
    """The `tunelab data index` words that build data.index from the kohya dataset."""
    if not c.data_sources:
        return []
    words = ["tunelab", "data", "index", "--out", str(c.get("data.index"))]
    for s in c.data_sources:
        words += ["-s", s]
    b = c.settings.get("data.buckets", {})
    for key, opt in (("resolution", "--resolution"), ("min_side", "--min-side"), ("max_side", "--max-side"),
                     ("step", "--step")):
        if key in b:
            words += [opt, str(b[key])]
    if b.get("no_upscale"):
        words.append("--bucket-no-upscale")
    return words + ["--no-exif-transpose"]  # kohya reads images as stored (sd-scripts' load_image, imagesize)


def derived(c: Conversion) -> list[str]:
    world = c.world_size or 1
    batch = int(c.get("train.batch_size", 1))
    accum = int(c.get("train.grad_accumulation", 1))
    eff = world * batch * accum
    lines = [f"effective batch {eff} = {world} process(es){'' if c.world_size else ' (no --num_processes: 1)'} x "
             f"batch {batch} x accumulation {accum}"]
    steps = c.get("train.max_steps")
    if steps:
        lines.append(f"{steps:,} optimizer steps = {steps * eff:,} samples")
    elif c.get("train.epochs"):
        lines.append(f"{c.get('train.epochs')} epoch(s) (steps per epoch = samples per epoch / {eff})")
    o = c.settings.get("optim", {})
    lines.append(f"learning rates: unet {o.get('lr_unet', 0):g}, te1 {o.get('lr_text_encoder_1', 0):g}, "
                 f"te2 {o.get('lr_text_encoder_2', 0):g}; text encoders {c.get('train.parts.text_encoder')}")
    return lines


def table(c: Conversion) -> list[str]:
    """The flags that did not become a setting, with the reason."""
    rows = [r for r in c.rows if r.status != MAPPED]
    if not rows:
        return ["every flag mapped"]
    width = max(len(r.flag) for r in rows) + 2
    out = [f"{'flag':<{width}} {'status':<18} reason", f"{'-' * width} {'-' * 18} {'-' * 30}"]
    for r in sorted(rows, key=lambda r: (r.status, r.flag)):
        value = f" ({r.value})" if r.value and len(r.value) < 40 else ""
        out.append(f"{'--' + r.flag if not r.flag.startswith('accelerate') else r.flag:<{width}} {r.status:<18} "
                   f"{r.what}{value}")
    return out


# --- TOML ------------------------------------------------------------------------------------------------


_SECTION_ORDER = ("run", "model", "data", "data.captions", "data.buckets", "train", "train.parts", "optim",
                  "objective", "loss", "save", "log", "grid", "probe", "report")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table: optim.args
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(str(v), ensure_ascii=False)  # a TOML basic string


def to_toml(settings: dict[str, dict[str, Any]], header: list[str] | None = None) -> str:
    lines = [f"# {h}" if h else "#" for h in header or []]
    for section in sorted(settings, key=lambda s: (_SECTION_ORDER.index(s) if s in _SECTION_ORDER else 99, s)):
        values = settings[section]
        if not values:
            continue
        lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def _header(launch: Launch, c: Conversion) -> list[str]:
    out = [f"converted by `tunelab config from-kohya` from {launch.source} ({launch.script}) on "
           f"{time.strftime('%Y-%m-%d')}", "docs/coming-from-kohya.md explains each mapping"]
    left = [r for r in c.rows if r.status not in (MAPPED, NOT_APPLICABLE)]
    if left:
        out += ["", "kohya flags this run file does not carry (it trains without them):"]
        out += [f"  --{r.flag}{' ' + r.value if r.value else ''}: {r.status}, {r.what}" for r in left]
    return out


