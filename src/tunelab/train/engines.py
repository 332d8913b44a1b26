"""Which distributed engine a launch asks for, and whether tunelab can honour it for this run.

`accelerate launch --config_file X` tells the processes what to run on through environment
variables (ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_*, ACCELERATE_USE_FSDP, FSDP_*); tunelab
reads them *before* accelerate starts, so a launch config is never quietly replaced by another
engine. What each engine means in tunelab:

    single     one process
    ddp        several processes, each a full copy; gradients all-reduced (accelerate's DDP)
    deepspeed  ZeRO-1/2/3 through accelerate: the trained modules are handed to it as one module
               (accelerate takes one model under DeepSpeed), the engine is told tunelab's
               accumulation and micro-batch, and steps once per tunelab step
    fsdp       FSDP2: tunelab shards the trained modules itself with torch's `fully_shard`
               (per transformer / ResNet / CLIP layer, then the whole module), on NCCL or gloo;
               accelerate keeps the process group, the device and autocast. Checkpoints are
               gathered into one SGM file; training states are sharded (torch.distributed.checkpoint).

Why tunelab shards for FSDP itself: accelerate routes FSDP only onto GPUs, so its path could
never be tested on the CPU; `fully_shard` runs the same on gloo, which is what the tests use.

`check_engine` refuses, with the change to make, every combination an engine cannot honour;
`deepspeed_settings` fills the engine's batch, accumulation and clipping from the run file and
refuses a launch config that says otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping

from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from tunelab.config import RunConfig

# The units FSDP gathers at once: diffusers' and transformers' blocks of SDXL's topology.
FSDP_UNITS = ("BasicTransformerBlock", "ResnetBlock2D", "Transformer2DModel", "CLIPEncoderLayer")
# Optimizers whose step is torch's own tensor math, which runs on FSDP2's sharded parameters.
FSDP_OPTIMIZERS = ("adamw", "lion")


@dataclass(frozen=True)
class FsdpSettings:
    """The accelerate FSDP config's settings tunelab applies (fsdp_* keys of the YAML)."""

    reshard_after_forward: bool = True  # FULL_SHARD (True) or SHARD_GRAD_OP (False)
    offload_params: bool = False  # sharded weights, gradients and states in CPU memory
    units: tuple[str, ...] = FSDP_UNITS  # fsdp_transformer_layer_cls_to_wrap, else tunelab's
    version: int = 2


@dataclass(frozen=True)
class Engine:
    kind: str = "single"  # single | ddp | deepspeed | fsdp
    zero_stage: int = 0
    fsdp: FsdpSettings | None = None
    deepspeed_file: str | None = None  # ACCELERATE_DEEPSPEED_CONFIG_FILE, when the YAML names one
    env: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def world(self) -> int:
        """Processes launched (the launcher's WORLD_SIZE)."""
        return int(self.env.get("WORLD_SIZE", "1") or 1)

    @property
    def sharded(self) -> bool:
        """Weights split across processes: a forward (grid, probes) needs every process."""
        return self.kind == "fsdp" or (self.kind == "deepspeed" and self.zero_stage == 3)

    def describe(self, world: int) -> str:
        if self.kind == "deepspeed":
            return (f"DeepSpeed ZeRO-{self.zero_stage} on {world} process(es) (through accelerate; the engine steps "
                    "once per tunelab step)")
        if self.kind == "fsdp":
            f = self.fsdp or FsdpSettings()
            how = "full shard" if f.reshard_after_forward else "shard-grad-op"
            off = ", parameters offloaded to the CPU" if f.offload_params else ""
            return (f"FSDP2 {how} on {world} process(es) (torch fully_shard per {', '.join(f.units)}{off}; "
                    "checkpoints gathered, states sharded)")
        return "DDP" + f" on {world} processes" if self.kind == "ddp" else "one process"


def _flag(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    return env.get(name, str(default)).strip().lower() in ("1", "true", "yes")


def launch_engine(env: Mapping[str, str] | None = None) -> Engine:
    """The engine the launch asks for, from accelerate's environment variables."""
    env = dict(os.environ if env is None else env)
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
        if file in ("none", "None"):
            file = None
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if file and Path(file).is_file():
            stage = str(_read_json(file).get("zero_optimization", {}).get("stage", stage or 2))
        return Engine("deepspeed", int(stage) if stage and stage.isdigit() else 2, deepspeed_file=file, env=env)
    if _flag(env, "ACCELERATE_USE_FSDP"):
        units = tuple(u.strip() for u in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if u.strip())
        strategy = env.get("FSDP_SHARDING_STRATEGY", "").upper()
        reshard = env.get("FSDP_RESHARD_AFTER_FORWARD")
        reshard_after = (reshard.strip().lower() in ("true", "1", "full_shard") if reshard is not None
                         else strategy not in ("SHARD_GRAD_OP", "2"))
        version = env.get("FSDP_VERSION", "1")
        return Engine("fsdp", fsdp=FsdpSettings(reshard_after, _flag(env, "FSDP_OFFLOAD_PARAMS"), units or FSDP_UNITS,
                                                int(version) if version.isdigit() else 1), env=env)
    world = int(env.get("WORLD_SIZE", "1") or 1)
    return Engine("ddp" if world > 1 else "single", env=env)


def _read_json(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise TunelabError(f"the DeepSpeed config file {path} cannot be read ({err}); fix the path in the accelerate "
                           "config (deepspeed_config_file)") from None


def check_engine(engine: Engine, cfg: "RunConfig", cuda: bool, world: int | None = None) -> None:
    """Refuse what `engine` cannot honour for this run on `world` processes (default: the launch's),
    naming the change; nothing has started yet."""
    problems = _deepspeed_problems(engine, cfg, cuda, world or engine.world) if engine.kind == "deepspeed" else \
        _fsdp_problems(engine, cfg) if engine.kind == "fsdp" else []
    if problems:
        name = f"DeepSpeed ZeRO-{engine.zero_stage}" if engine.kind == "deepspeed" else "FSDP"
        raise TunelabError(f"the launch config asks for {name}, which cannot run this run file as it is: "
                           + "; ".join(problems))


def _deepspeed_problems(engine: Engine, cfg: "RunConfig", cuda: bool, world: int) -> list[str]:
    t, o = cfg.train, cfg.optim
    out = []
    if not cuda and engine.world > 1:
        out.append(f"accelerate runs DeepSpeed on several processes only on GPUs (on the CPU each of the "
                   f"{engine.world} processes would train alone, unaware of the others); launch on CUDA GPUs, use one "
                   "process, or use a DDP config on the CPU (accelerate launch --multi_gpu --num_processes N)")
    if t.mixed_precision == "no":
        out.append("with train.mixed_precision = 'no' DeepSpeed does not check gradients for NaN/inf, so tunelab's "
                   "NaN guard could not skip a bad step; set train.mixed_precision = 'bf16' (DeepSpeed keeps fp32 "
                   "master weights)")
    if t.full_bf16:
        out.append("DeepSpeed keeps its own fp32 master weights under mixed precision, so train.full_bf16 has no "
                   "meaning there; set train.full_bf16 = false")
    if o.name in ("adamw_schedulefree",) or o.name.startswith("optimi_"):
        out.append(f"optim.name = {o.name!r} needs its own parameters (schedule-free's eval weights, optimi's "
                   "Kahan buffers), which DeepSpeed replaces by its flat partitions; use adamw, adamw8bit, "
                   "adafactor, lion, prodigy or came")
    if t.max_grad_norm > 0 and t.max_grad_norm_scope == "per_parameter":
        out.append("DeepSpeed clips the whole gradient (gradient_clipping); set train.max_grad_norm_scope = 'global'")
    if engine.zero_stage == 3 and cfg.ema.enabled:
        out.append("under ZeRO-3 no process holds whole weights to average; set ema.enabled = false, or use ZeRO-2")
    if engine.zero_stage == 3 and t.compile:
        out.append("ZeRO-3's parameter hooks and torch.compile do not mix here; set train.compile = false")
    return out


def _fsdp_problems(engine: Engine, cfg: "RunConfig") -> list[str]:
    t, o = cfg.train, cfg.optim
    f = engine.fsdp or FsdpSettings()
    out = []
    if f.version != 2:
        out.append("tunelab shards with FSDP2 (torch's fully_shard); set fsdp_version: 2 in the accelerate config")
    if t.full_bf16:
        out.append("FSDP keeps the sharded weights in fp32 and computes under bf16 autocast, so train.full_bf16 buys "
                   "nothing there; set train.full_bf16 = false")
    if t.mixed_precision == "fp16":
        out.append("fp16 needs a loss scaler that FSDP2's sharded gradients do not get here; use "
                   "train.mixed_precision = 'bf16'")
    if o.name not in FSDP_OPTIMIZERS and not (o.name == "class" and o.class_path.startswith("torch.optim.")):
        out.append(f"optim.name = {o.name!r} does not step FSDP's sharded parameters; use "
                   f"{' or '.join(map(repr, FSDP_OPTIMIZERS))} (or class with a torch.optim optimizer)")
    if cfg.ema.enabled:
        out.append("the EMA is not kept for sharded weights yet; set ema.enabled = false, or use DDP / ZeRO-2")
    if t.max_grad_norm > 0 and t.max_grad_norm_scope == "per_parameter":
        out.append("each process holds a slice of every parameter, so per-parameter clipping cannot see a whole "
                   "gradient; set train.max_grad_norm_scope = 'global'")
    if t.compile:
        out.append("set train.compile = false (compiling sharded modules is not wired)")
    return out


def deepspeed_settings(ds: dict, cfg: "RunConfig", world: int, accumulation: int) -> dict:
    """`ds` (accelerate's DeepSpeed config dict) with tunelab's batch, accumulation, clipping and
    NaN check filled in; a value the launch config gave that disagrees is refused, never replaced.
    'auto' (or no value) is filled."""
    t = cfg.train
    want = {"train_micro_batch_size_per_gpu": t.batch_size, "gradient_accumulation_steps": accumulation,
            "train_batch_size": t.batch_size * accumulation * world, "gradient_clipping": float(t.max_grad_norm)}
    where = {"train_micro_batch_size_per_gpu": "train.batch_size", "train_batch_size": "the effective batch",
             "gradient_accumulation_steps": "the run's accumulation (train.grad_accumulation or "
                                            "train.target_effective_batch)",
             "gradient_clipping": "train.max_grad_norm"}
    out = json.loads(json.dumps(ds))  # a copy
    for key, value in want.items():
        given = out.get(key, "auto")
        if given in ("auto", None) or (key == "gradient_clipping" and given in ("none", "None")):
            out[key] = value
        elif float(given) != float(value):
            raise TunelabError(
                f"the DeepSpeed config sets {key} = {given}, but {where[key]} gives {value:g}: tunelab and the "
                f"engine must agree on it; remove {key} from the accelerate / DeepSpeed config (tunelab fills it), "
                f"or set it to {value:g}")
    precision = "bf16" if t.mixed_precision == "bf16" else "fp16" if t.mixed_precision == "fp16" else None
    if precision:
        section = out.setdefault(precision, {})
        section["enabled"] = True
        if precision == "bf16":
            if section.get("check_grad_overflow") is False:
                raise TunelabError("the DeepSpeed config sets bf16.check_grad_overflow = false: the engine would then "
                                   "apply a NaN/inf gradient that tunelab's NaN guard must skip; remove the setting")
            section["check_grad_overflow"] = True
    zero = out.setdefault("zero_optimization", {})
    if zero.get("stage", 0) == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # one SGM file from the gathered weights
        # DeepSpeed's own default (accelerate's 'auto' needs a model config the trained modules lack):
        # parameters under 100k elements stay whole on every GPU; CLIP's position tables (77 x 768,
        # 77 x 1280) among them, which transformers reads outside their forward.
        for key, value in (("stage3_param_persistence_threshold", 100_000),):
            if zero.get(key, "auto") == "auto":
                zero[key] = value
    out.pop("scheduler", None)  # tunelab steps its own LR schedule
    if "optimizer" in out:
        raise TunelabError("the DeepSpeed config file names an optimizer; tunelab builds it from [optim]: remove "
                           "the 'optimizer' section from the DeepSpeed config")
    return out


@contextlib.contextmanager
def whole_modules(accelerator) -> Iterator[None]:
    """Build models whole. Under DeepSpeed accelerate registers its config with transformers,
    whose models are then created already partitioned under ZeRO-3 (deepspeed.zero.Init): the text
    encoders would arrive partitioned in 16 bits and diffusers' UNet whole in fp32, a mix the
    engine's set-up cannot flatten. Built whole, everything is cast and partitioned together by
    `prepare`."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None) if accelerator is not None else None
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


# Modules whose forward reads a child's weight before calling the child: CLIP's embeddings read
# the position table's length. Under ZeRO-3 that table is gathered for the module's forward.
ZERO3_READS_CHILD = {"CLIPTextEmbeddings": "position_embedding"}


def zero3_hooks(module: "torch.nn.Module") -> None:
    import deepspeed

    for m in module.modules():
        child = ZERO3_READS_CHILD.get(type(m).__name__)
        if child is None:
            continue
        params = list(getattr(m, child).parameters())
        held: list = []

        def gather(mod, args, params=params, held=held):
            held.append(deepspeed.zero.GatheredParameters(params))
            held[-1].__enter__()

        def release(mod, args, out, held=held):
            held.pop().__exit__(None, None, None)

        m.register_forward_pre_hook(gather)
        m.register_forward_hook(release)


def deepspeed_full_state(modules: Mapping[str, "torch.nn.Module"], main: bool,
                         frozen: Mapping[str, Mapping[str, "torch.Tensor"]]) -> dict[str, dict[str, "torch.Tensor"]]:
    """{module name: whole state dict} on the main process ({} elsewhere): trained parameters from
    DeepSpeed's fp32 master weights, assembled one at a time (the modules hold 16-bit copies, under
    ZeRO-3 partitions of them), frozen ones as they were before DeepSpeed cast them (`frozen`),
    buffers from the modules (never partitioned). Collective."""
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, dict] = {}
    for name, module in modules.items():
        params = dict(module.named_parameters())
        state = {n: t.detach().cpu().clone() for n, t in module.state_dict().items() if n not in params} if main else {}
        for n, p in params.items():
            if p.requires_grad:
                full = safe_get_full_fp32_param(p)  # collective
                if main and full is not None:
                    state[n] = full.detach().cpu().clone()
        out[name] = state | dict(frozen.get(name, {})) if main else {}
    return out
