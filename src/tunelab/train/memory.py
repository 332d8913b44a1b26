"""Will it fit? The peak GPU memory of one optimizer step, before launching
(`tunelab train RUN.toml --estimate-memory [--gpu-memory 24GB]`).

Nothing is allocated and no GPU is needed:
  1. the run file's model is built on the meta device (toy, or the SDXL topology the base's header
     names) and frozen where the run freezes it (train/parts.py: text encoders, partial UNet, block
     LRs of 0);
  2. one micro-step runs on fake tensors (train/memory_trace.py) at the largest bucket of the data:
     activations, autocast's copies of fp32 weights, checkpointing, gradients as they arrive;
  3. per GPU, by engine (`Launch`): weights, gradients, optimizer states computed from every trained
     parameter's shape (`optimizer_memory`), the EMA, DDP's gradient buckets, DeepSpeed's fp32
     master copy and buckets, what ZeRO-1/2/3 and FSDP divide by the world size;
  4. peak = what lives through the step + the larger of forward/backward (the trace) and the
     optimizer step (all gradients + the optimizer's temporaries), + an allowance for the CUDA
     context and the caching allocator.

`suggestions` re-estimates single changes (gradient checkpointing, batch 1, foreach off, the fused
backward pass, ZeRO-2/3, full_bf16, a smaller optimizer, a partial UNet) and lists the ones that fit,
least invasive first. Validation: docs/training.md "Will it fit?" and benchmarks/memory_estimate.py.

Hand-written: no library estimates a diffusion finetune's memory (accelerate's `estimate-memory`
counts weights and Adam states of hub models only; DeepSpeed's estimators need DeepSpeed and count
no activations).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from tunelab.config import RunConfig
from tunelab.errors import TunelabError
from tunelab.train.memory_optim import OptimizerKind, OptimizerMemory, optimizer_kind, optimizer_memory
from tunelab.train.memory_trace import StepShape, Target, Trace, TraceSettings, trace_step

__all__ = ["Estimate", "Launch", "OptimizerKind", "OptimizerMemory", "estimate", "optimizer_kind", "optimizer_memory",
           "report", "suggestions"]

log = logging.getLogger(__name__)

GiB = 2**30
# What a CUDA process holds outside torch's allocator (the context, its kernels, cuDNN / NCCL
# handles); nvidia-smi shows it, torch.cuda.memory_allocated does not.
CUDA_CONTEXT = int(0.6 * GiB)
# cuBLAS's and cuBLASLt's workspaces, which torch takes from its caching allocator (so
# torch.cuda.max_memory_allocated counts them): 32 MiB each on Hopper, less on older cards.
# Measured on an H200 (benchmarks/RESULTS.md): the toy's peak is its tensors + 66 MiB.
CUBLAS_WORKSPACES = 64 * 2**20
# The caching allocator's rounding and fragmentation over the peak allocated (reserved - allocated
# in a training loop whose bucket shapes vary).
ALLOCATOR_SHARE = 0.05

Engine = Literal["ddp", "zero1", "zero2", "zero3", "fsdp", "fsdp_grad_op"]
ENGINE_LABELS = {"ddp": "DDP", "zero1": "DeepSpeed ZeRO-1", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3",
                 "fsdp": "FSDP full shard", "fsdp_grad_op": "FSDP shard-grad-op"}


@dataclass(frozen=True)
class Launch:
    """How the run is launched: the engine and how many GPUs share the work. DeepSpeed's numbers are
    its defaults unless the accelerate config's DeepSpeed file sets them."""

    engine: Engine = "ddp"
    world_size: int = 1
    reduce_bucket: int = 500_000_000  # DeepSpeed reduce_bucket_size, elements
    prefetch_bucket: int = 50_000_000  # ZeRO-3 stage3_prefetch_bucket_size, elements
    persistence_threshold: int = 100_000  # ZeRO-3: parameters smaller than this stay whole on every GPU
    overlap_comm: bool = False  # DeepSpeed: two reduce buckets instead of one (ZeRO-3's default: on)
    offload_optimizer: bool = False  # DeepSpeed / FSDP: optimizer states (and master weights) in CPU memory
    offload_params: bool = False  # ZeRO-3 / FSDP: sharded weights in CPU memory
    fsdp_wrap: str = "block"  # FSDP: units gathered at once: 'block' (transformer / ResNet blocks) or 'model'
    flat: bool = True  # ZeRO and FSDP1 hand the optimizer flat 1-D partitions; FSDP2 each parameter's dim-0 shard

    @property
    def deepspeed(self) -> bool:
        return self.engine.startswith("zero")

    @property
    def label(self) -> str:
        if self.engine == "ddp" and self.world_size == 1:
            return "1 GPU"
        return f"{ENGINE_LABELS[self.engine]} on {self.world_size} GPUs"

    def shards(self, what: str) -> int:
        """By how much `what` ('states', 'gradients', 'weights') is divided per GPU."""
        divides = {"zero1": ("states",), "zero2": ("states", "gradients"), "zero3": ("states", "gradients", "weights"),
                   "fsdp": ("states", "gradients", "weights"), "fsdp_grad_op": ("states", "gradients")}
        return self.world_size if what in divides.get(self.engine, ()) else 1


def launch_from_accelerate(path: str | Path) -> Launch:
    """The engine and world size of an accelerate config file (`accelerate config` writes one; the
    DeepSpeed JSON it names is read too)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"--accelerate-config {path}: no such file (accelerate writes one with `accelerate config`)")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise TunelabError(f"--accelerate-config {path}: not valid YAML ({err})") from None
    kind = str(cfg.get("distributed_type", "NO")).upper()
    world = int(cfg.get("num_processes") or 1)
    if kind == "DEEPSPEED":
        return _deepspeed_launch(cfg.get("deepspeed_config") or {}, world, path)
    if kind == "FSDP":
        return _fsdp_launch(cfg.get("fsdp_config") or {}, world, int(cfg.get("num_machines") or 1))
    if kind in ("NO", "MULTI_GPU"):
        return Launch("ddp", world if kind == "MULTI_GPU" else 1)
    raise TunelabError(f"--accelerate-config {path}: distributed_type {kind} is not one tunelab estimates; "
                       "use NO, MULTI_GPU (DDP), DEEPSPEED or FSDP")


def _deepspeed_launch(ds: dict, world: int, path: Path) -> Launch:
    import json

    stage = ds.get("zero_stage")
    zero: dict = {}
    if ds.get("deepspeed_config_file"):
        file = Path(ds["deepspeed_config_file"])
        file = file if file.is_absolute() or file.is_file() else path.parent / file
        if not file.is_file():
            raise TunelabError(f"{path}: deepspeed_config_file {ds['deepspeed_config_file']} does not exist")
        zero = json.loads(file.read_text()).get("zero_optimization", {})
        stage = zero.get("stage", stage)
    if stage not in (1, 2, 3, "1", "2", "3"):
        raise TunelabError(f"{path}: DeepSpeed zero_stage {stage!r}; tunelab estimates stages 1, 2 and 3")
    stage = int(stage)

    def number(key: str, default: int) -> int:
        value = zero.get(key, default)
        return default if value == "auto" else int(float(value))

    offload = lambda key: str((zero.get(f"offload_{key}") or {}).get("device", ds.get(f"offload_{key}_device", "none")))
    return Launch(f"zero{stage}", world, reduce_bucket=number("reduce_bucket_size", 500_000_000),
                  prefetch_bucket=number("stage3_prefetch_bucket_size", 50_000_000),
                  persistence_threshold=number("stage3_param_persistence_threshold", 100_000),
                  overlap_comm=bool(zero.get("overlap_comm", stage == 3)),
                  offload_optimizer=offload("optimizer") not in ("none", "None"),
                  offload_params=offload("param") not in ("none", "None"))


def _fsdp_launch(fsdp: dict, world: int, machines: int = 1) -> Launch:
    strategy = str(fsdp.get("fsdp_sharding_strategy", "FULL_SHARD")).upper()
    if str(fsdp.get("fsdp_version", 1)) == "2":  # FSDP2 has no strategies: resharding after forward or not
        strategy = "FULL_SHARD" if str(fsdp.get("fsdp_reshard_after_forward", True)).lower() == "true" else "SHARD_GRAD_OP"
    strategy = {"1": "FULL_SHARD", "2": "SHARD_GRAD_OP", "3": "NO_SHARD", "4": "HYBRID_SHARD"}.get(strategy, strategy)
    if strategy == "NO_SHARD":
        return Launch("ddp", world)
    wrap = "model" if str(fsdp.get("fsdp_auto_wrap_policy", "")).upper() == "NO_WRAP" else "block"
    engine = "fsdp_grad_op" if strategy == "SHARD_GRAD_OP" else "fsdp"
    if strategy == "HYBRID_SHARD":  # sharded within each machine, replicated across them
        world = max(1, world // machines)
    offload = str(fsdp.get("fsdp_offload_params", "false")).lower() == "true"
    return Launch(engine, world, offload_params=offload, offload_optimizer=offload, fsdp_wrap=wrap,
                  flat=str(fsdp.get("fsdp_version", 1)) != "2")


# --- what trains ------------------------------------------------------------------------------------------------


@dataclass
class ModelPlan:
    """What the run trains, as the arithmetic needs it: shapes and element counts (no weights)."""

    arch: str
    trained: list[tuple[int, ...]]  # every trained parameter's shape
    groups: list[int]  # elements per optimizer parameter group (train/optim.py param_groups)
    trained_modules: list[str]  # modules with a trained parameter: their frozen parts share their dtype
    frozen_inside: int  # elements of frozen parameters and floating buffers inside trained modules
    frozen_modules: dict[str, int]  # frozen module -> elements of its parameters and floating buffers
    largest_module: int  # elements of the largest single module's own parameters (ZeRO-3 gathers module by module)
    largest_block: int  # elements of the largest transformer / ResNet block (FSDP's unit when wrapped by block)
    optimizer: OptimizerKind  # what train/optim.py builds for the run file

    @property
    def n_trained(self) -> int:
        return sum(math.prod(s) for s in self.trained)

    @property
    def n_inside(self) -> int:
        """Elements of the trained modules, frozen parts included."""
        return self.n_trained + self.frozen_inside


def meta_model(cfg: RunConfig, spec=None):
    """The run's model on the meta device with requires_grad set as training sets it; `spec` (an
    ArchSpec) overrides the architecture (benchmarks build a mid-size one)."""
    from tunelab.models.arch import build_components
    from tunelab.train.parts import select_trainable

    comps = build_components(spec or model_arch(cfg), device="meta")
    plan = select_trainable(comps, cfg.train.parts, cfg.optim, cfg.model.clip_skip)
    return comps, plan


def model_arch(cfg: RunConfig) -> str:
    """The preset the run trains: model.arch, or the base's header (a file that does not exist yet
    is refused: its architecture is unknown)."""
    from tunelab.models.checkpoint import base_arch

    if cfg.model.arch != "auto":
        return cfg.model.arch
    arch = base_arch(cfg.model.base)
    if arch is None:
        raise TunelabError(f"model.base = {cfg.model.base!r}: cannot tell its architecture without the file; give the "
                           "file, or set model.arch = 'sdxl' (or 'toy') to estimate for that preset")
    return arch


def plan_model(cfg: RunConfig, spec=None, comps=None) -> ModelPlan:
    """What `cfg` trains, counted on the meta device (`comps`: components built there already)."""
    from tunelab.train.optim import param_groups
    from tunelab.train.parts import select_trainable

    if comps is None:
        comps, plan = meta_model(cfg, spec)
    else:
        plan = select_trainable(comps, cfg.train.parts, cfg.optim, cfg.model.clip_skip)

    trained, inside, frozen, largest, block = [], 0, {}, 0, 0
    for name, module in comps.modules().items():
        floats = sum(b.numel() for b in module.buffers() if b.is_floating_point())
        params = list(module.parameters())
        if not any(p.requires_grad for p in params):
            frozen[name] = floats + sum(p.numel() for p in params)
            continue
        trained += [tuple(p.shape) for p in params if p.requires_grad]
        inside += floats + sum(p.numel() for p in params if not p.requires_grad)
        for sub in module.modules():  # what ZeRO-3 / FSDP gather at once
            own = sum(p.numel() for p in sub.parameters(recurse=False))
            largest = max(largest, own)
            if type(sub).__name__ in ("BasicTransformerBlock", "ResnetBlock2D", "CLIPEncoderLayer"):
                block = max(block, sum(p.numel() for p in sub.parameters()))
    groups = [sum(p.numel() for p in g["params"]) for g in param_groups(plan, cfg.optim)]
    names = [n for n, m in comps.modules().items() if any(p.requires_grad for p in m.parameters())]
    return ModelPlan(comps.arch, trained, groups, names, inside, frozen, largest, block,
                     optimizer_kind(cfg, plan))


# --- the estimate -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str
    bytes: int
    note: str = ""


@dataclass
class Estimate:
    """Peak memory of one optimizer step on each GPU: what lives through the whole step, plus the
    larger of the forward/backward and the optimizer step's transients, plus the allowance."""

    arch: str
    launch: Launch
    shape: StepShape
    settings: str  # precision, checkpointing, optimizer, in words
    trained: int  # trained parameters
    static: list[Row]
    forward_backward: Row
    optimizer_step: Row
    allowance: list[Row] = field(default_factory=list)

    @property
    def transient(self) -> Row:
        return max(self.forward_backward, self.optimizer_step, key=lambda r: r.bytes)

    @property
    def allocated(self) -> int:
        """The peak of the tensors alone (torch.cuda.max_memory_allocated)."""
        return sum(r.bytes for r in self.static) + self.transient.bytes

    @property
    def peak(self) -> int:
        return self.allocated + sum(r.bytes for r in self.allowance)

    def lines(self) -> list[str]:
        s = self.shape
        head = (f"memory estimate for one optimizer step on each GPU ({self.arch}, {self.launch.label}, batch {s.batch} "
                f"at {s.width}x{s.height}, {self.settings}):")
        rows = [*self.static, self.forward_backward, self.optimizer_step, *self.allowance]
        out = [head] + [f"  {r.name:<22} {_gib(r.bytes):>10}  {r.note}" for r in rows]
        phase = self.transient.name
        out.append(f"  {'peak':<22} {_gib(self.peak):>10}  during the {phase}: everything above the "
                   f"two transient rows + the {phase}'s {_gib(self.transient.bytes)}" + (" + the allowance" if self.allowance else ""))
        return out


def _gib(n: int) -> str:
    """Bytes for a reader: GiB from 1 GiB up (as nvidia-smi's MiB / 1024), MiB below."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def step_shape(cfg: RunConfig, arch: str) -> StepShape:
    """The largest micro-batch the run will see: train.batch_size images of the largest bucket
    (of the index's training rows; else data.buckets; else the preset's native square), prompts of
    model.max_chunks windows, pixels encoded in the step when there is no latent cache."""
    from tunelab.models.arch import RESOLUTION

    width = height = RESOLUTION.get(arch, 1024)
    if cfg.data.index and Path(cfg.data.index).exists():
        from tunelab.data.loader import open_index

        index = open_index(cfg.data.index)
        used = sorted(set(index.bucket_ids()[index.rows_in_split("train")].tolist()))
        if used:  # (an index without training rows is refused at launch; estimate the preset's square)
            width, height = max((tuple(int(v) for v in index.buckets[i]) for i in used), key=_area)
    elif cfg.data.given_buckets() is not None:
        from tunelab.data.buckets import make_buckets

        width, height = max((tuple(int(v) for v in b) for b in make_buckets(cfg.data.buckets)), key=_area)
    return StepShape(cfg.train.batch_size, width, height, cfg.model.max_chunks, encode_images=not cfg.data.latents)


def _area(wh: tuple[int, int]) -> tuple[int, int]:
    return wh[0] * wh[1], -abs(wh[0] - wh[1])  # the largest area; of equal ones, the squarest


def estimate(cfg: RunConfig, launch: Launch = Launch(), *, spec=None, shape: StepShape | None = None,
             target: Target = "cuda", traces: dict | None = None) -> Estimate:
    """The peak memory of one optimizer step of `cfg` launched as `launch` (module docstring).
    `traces` caches fake-step traces across calls (suggestions re-estimate many variants)."""
    check_launch(cfg, launch)
    traces = {} if traces is None else traces
    model = _plan(cfg, spec, traces)
    shape = shape or step_shape(cfg, model.arch)
    trace = _trace(cfg, spec, shape, target, traces)
    return compose(cfg, launch, model, shape, trace, target)


def _plan(cfg: RunConfig, spec, cache: dict) -> ModelPlan:
    """plan_model, cached by what changes it (the trained parts and the optimizer)."""
    t = cfg.train
    key = ("plan", id(spec), cfg.model.model_dump_json(), t.parts.model_dump_json(), cfg.optim.model_dump_json(),
           t.full_bf16, t.bf16_update)
    if key not in cache:
        meta = ("meta", id(spec), cfg.model.model_dump_json())
        if meta not in cache:  # built once: planning only sets requires_grad (traces build their own)
            from tunelab.models.arch import build_components

            cache[meta] = build_components(spec or model_arch(cfg), device="meta")
        cache[key] = plan_model(cfg, spec, cache[meta])
    return cache[key]


def check_launch(cfg: RunConfig, launch: Launch) -> None:
    if cfg.train.fused_backward and launch.world_size > 1:
        raise TunelabError(f"train.fused_backward runs on one process; a launch on {launch.world_size} GPUs is refused "
                           "at start, so there is nothing to estimate: set train.fused_backward = false, or --world-size 1")
    if cfg.train.fused_backward and launch.deepspeed:
        raise TunelabError("train.fused_backward steps the optimizer inside backward, which DeepSpeed's engine does itself; "
                           "set train.fused_backward = false for a DeepSpeed launch")


def _trace(cfg: RunConfig, spec, shape: StepShape, target: Target, cache: dict) -> Trace:
    """The fake step of `cfg`, with fp32 trained weights (the trace also tells what 16-bit weights
    would take: Trace.peak(casts=False)); cached by everything that changes it."""
    from tunelab.models.arch import load_arch
    from tunelab.train.objectives import Objective

    t = cfg.train
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.mixed_precision)
    settings = TraceSettings(torch.float32, autocast or torch.float32, autocast, t.gradient_checkpointing, False, target)
    key = (id(spec), cfg.model.model_dump_json(), t.parts.model_dump_json(), shape, settings,
           cfg.objective.prediction, cfg.loss.type)
    if key not in cache:
        comps, _ = meta_model(cfg, spec)
        scheduler = load_arch(comps.arch).scheduler
        objective = Objective.from_config(cfg.objective, scheduler, cfg.loss.noise_offset, cfg.loss)
        cache[key] = trace_step(comps, shape, settings, objective, cfg.loss, cfg.model.clip_skip)
    return cache[key]


def compose(cfg: RunConfig, launch: Launch, model: ModelPlan, shape: StepShape, trace: Trace,
            target: Target = "cuda") -> Estimate:
    """Per GPU, by engine: the rows that live through the step, the two transients, the allowance.
    Pure arithmetic on the model plan and the trace (the tests check it by hand)."""
    t, n = cfg.train, launch.world_size
    mixed = t.mixed_precision != "no"
    weight = 2 if t.full_bf16 else 4  # tunelab's trained weights (DDP and FSDP keep them)
    module = (2 if mixed else 4) if launch.deepspeed else weight  # DeepSpeed casts its module to 16 bits
    compute = 2 if launch.engine.startswith("fsdp") and mixed else module  # FSDP gathers in the autocast dtype
    static = _weight_rows(cfg, launch, model, module)
    opt_bytes = 4 if launch.deepspeed else weight  # what the optimizer's tensors are (DeepSpeed: fp32 master)
    shapes = model.trained
    if launch.deepspeed or (launch.engine.startswith("fsdp") and launch.flat):  # flat partitions: nothing to factor
        shapes = [(math.ceil(g / n),) for g in model.groups]
    elif launch.engine.startswith("fsdp"):  # FSDP2: each parameter sharded along its first dimension
        shapes = [(math.ceil(s[0] / n), *s[1:]) for s in model.trained]
    opt = optimizer_memory(model.optimizer, shapes, [math.ceil(g / launch.shards("states")) for g in model.groups],
                           opt_bytes, one_at_a_time=cfg.train.fused_backward)
    static += _state_rows(cfg, launch, model, opt)
    fb, step = _transients(cfg, launch, model, trace, opt, compute)
    allowance = []
    if target == "cuda":
        static.append(Row("cuBLAS workspaces", CUBLAS_WORKSPACES, "cuBLAS + cuBLASLt, 32 MiB each on Hopper"))
        allocated = sum(r.bytes for r in static) + max(fb.bytes, step.bytes)
        allowance = [Row("CUDA context", CUDA_CONTEXT, "context, kernels, cuDNN / NCCL handles (nvidia-smi shows them)"),
                     Row("allocator", int(ALLOCATOR_SHARE * allocated), f"{ALLOCATOR_SHARE:.0%} of the peak allocated: the "
                         "caching allocator's rounding and fragmentation")]
    return Estimate(model.arch, launch, shape, _settings_words(cfg, model, launch), model.n_trained, static, fb, step,
                    allowance)


def _settings_words(cfg: RunConfig, model: ModelPlan, launch: Launch) -> str:
    t = cfg.train
    precision = "fp32" if t.mixed_precision == "no" else f"{t.mixed_precision} autocast"
    if launch.deepspeed and t.mixed_precision != "no":
        precision += ", DeepSpeed's 16-bit weights with an fp32 master copy"  # whatever train.full_bf16 says
    elif t.full_bf16:
        precision += ", bf16 weights"
    ckpt = "gradient checkpointing" if t.gradient_checkpointing else "no gradient checkpointing"
    fused = ", fused backward" if t.fused_backward else ""
    return f"{precision}, {ckpt}{fused}, {model.optimizer.label}"


def _weight_rows(cfg: RunConfig, launch: Launch, model: ModelPlan, module: int) -> list[Row]:
    """Weights of the trained modules (frozen parts included) and of the frozen modules."""
    n, inside, frozen_bytes = launch.world_size, model.n_inside, 2 if cfg.train.mixed_precision != "no" else 4
    names = ", ".join(model.trained_modules)
    dtype = {2: "16-bit", 4: "fp32"}[module]
    if launch.engine == "zero3":  # partitioned, except parameters below the persistence threshold
        small = sum(math.prod(s) for s in model.trained if math.prod(s) < launch.persistence_threshold)
        sharded = 0 if launch.offload_params else module * (inside - small) // n
        gathered = module * min(inside, 2 * max(model.largest_block, model.largest_module) + launch.prefetch_bucket)
        rows = [Row("weights", sharded + module * small, f"{names}: {inside:,} x {module} B ({dtype}) / {n} GPUs"
                    + (" (in CPU memory)" if launch.offload_params else "") + ", small ones whole"),
                Row("gathered weights", gathered, "the block computing and the next (ZeRO-3 gathers them) + the "
                    "prefetch bucket")]
    elif launch.engine == "fsdp":
        shard = 0 if launch.offload_params else module * inside // n
        unit = inside if launch.fsdp_wrap == "model" else 2 * model.largest_block
        compute = 2 if cfg.train.mixed_precision != "no" else module
        rows = [Row("weights", shard, f"{names}: {inside:,} x {module} B / {n} GPUs"
                    + (" (in CPU memory)" if launch.offload_params else "")),
                Row("gathered weights", compute * min(inside, unit),
                    "the whole model gathered (NO_WRAP)" if launch.fsdp_wrap == "model"
                    else "two wrapped blocks at a time (the one computing + the prefetched)")]
    else:
        rows = [Row("weights", module * inside, f"{names}: {inside:,} x {module} B ({dtype}), frozen parts included")]
    frozen = sum(model.frozen_modules.values())
    if frozen:
        rows.append(Row("frozen modules", frozen_bytes * frozen,
                        f"{', '.join(model.frozen_modules)} in {'16 bits' if frozen_bytes == 2 else 'fp32'}, on the GPU"))
    return rows


def _state_rows(cfg: RunConfig, launch: Launch, model: ModelPlan, opt: OptimizerMemory) -> list[Row]:
    """Optimizer states (and DeepSpeed's fp32 master copy), kept gradients and buckets, the EMA."""
    n, p, mixed = launch.world_size, model.n_trained, cfg.train.mixed_precision != "no"
    rows = []
    where = " (in CPU memory)" if launch.offload_optimizer else ""
    if launch.deepspeed and mixed:
        rows.append(Row("fp32 master weights", 0 if launch.offload_optimizer else 4 * p // n,
                        f"DeepSpeed's fp32 copy of the trained weights / {n} GPUs{where}"))
    share = f" / {n} GPUs" if launch.shards("states") > 1 else ""
    rows.append(Row("optimizer states", 0 if launch.offload_optimizer else opt.states,
                    f"{model.optimizer.label}: {opt.note.split('; step')[0]}{share}{where}"))
    module = (2 if mixed else 4) if launch.deepspeed else (2 if cfg.train.full_bf16 else 4)
    if launch.shards("gradients") > 1:
        rows.append(Row("gradients", module * p // n, f"this GPU's share of the gradients ({module} B / {n} GPUs)"))
    if launch.engine == "ddp" and n > 1:
        rows.append(Row("DDP buckets", module * p, "a second copy of the gradients, reduced across GPUs "
                        "(torch's gradient_as_bucket_view is off)"))
    if launch.deepspeed:
        # allocated whole, however few the parameters (stage_1_and_2.py / stage3.py: torch.empty(reduce_bucket_size)
        # with contiguous_gradients, DeepSpeed's default); measured on an H200: the toy's peak + 0.93 GiB
        buckets = (2 if launch.overlap_comm else 1) * launch.reduce_bucket * (2 if mixed else 4)
        rows.append(Row("DeepSpeed buckets", buckets, f"reduce bucket {launch.reduce_bucket:,} elements"
                        + (" x 2 (overlap_comm)" if launch.overlap_comm else "")))
    if cfg.ema.enabled and cfg.ema.device == "same":
        rows.append(Row("EMA", 4 * p, "fp32 copy of the trained weights on every GPU"))
    return rows


def _transients(cfg: RunConfig, launch: Launch, model: ModelPlan, trace: Trace, opt: OptimizerMemory,
                compute: int) -> tuple[Row, Row]:
    """Forward + backward (the trace, for this engine's weights and gradients) and the optimizer step."""
    t, n, p = cfg.train, launch.world_size, model.n_trained
    casts = compute == 4 and t.mixed_precision != "no"  # fp32 weights under autocast get 16-bit copies
    keeps = launch.shards("gradients") == 1 and not t.fused_backward  # DDP / ZeRO-1 hold every gradient
    grad_bytes = compute if not launch.deepspeed else (2 if t.mixed_precision != "no" else 4)
    share = grad_bytes / 4 if keeps else 0.0  # the trace's gradients are fp32
    above, grads, phase = trace.peak(share, casts)
    acts = trace.activations(casts)
    accumulation = cfg.accumulation_for(n)
    note = f"gradients so far {_gib(grads)} + activations and temporaries {_gib(above - grads)}"
    if keeps and accumulation > 1 and share * trace.gradients + acts > above:  # later micro-batches: all gradients held
        above, phase = int(share * trace.gradients) + acts, "forward"
        note = f"all gradients {_gib(int(share * trace.gradients))} (accumulation {accumulation}) + activations {_gib(acts)}"
    if t.fused_backward:
        above += opt.temporaries  # each parameter steps inside backward
        note = f"one gradient at a time (fused backward) + activations and temporaries {_gib(above)}"
    fb = Row(phase, above, note + (" (incl. autocast's 16-bit weight copies)" if casts else ""))
    if t.fused_backward:
        return fb, Row("optimizer step", 0, "inside backward (fused)")
    held = grad_bytes * p if keeps else 0  # ZeRO-2/3 and FSDP: counted in the gradients row
    fp32 = 4 * p // n if launch.deepspeed and t.mixed_precision != "no" else 0  # the partition's gradients, upcast
    step = Row("optimizer step", held + fp32 + opt.temporaries,
               f"{'gradients ' + _gib(held) + ' + ' if held else ''}{'fp32 gradient partition ' + _gib(fp32) + ' + ' if fp32 else ''}"
               f"{opt.note.split('; step: ')[-1]}" + (f" {_gib(opt.temporaries)}" if opt.temporaries else ""))
    return fb, step


# --- the verdict and what to change ------------------------------------------------------------------------------

CARDS = (24, 48, 80, 141)  # GiB: RTX 3090 / 4090, RTX A6000 / L40S, A100 / H100 80 GB, H200


def parse_size(text: str) -> int:
    """'24GB', '24G', '24GiB', '80', '24576MiB' -> bytes. GB is read as GiB, as nvidia-smi counts
    (a '24 GB' RTX 3090 has 24,576 MiB)."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(g|gb|gib|m|mb|mib|t|tb|tib)?\s*", text.lower())
    if not m:
        raise TunelabError(f"--gpu-memory {text!r}: give the card's memory as a size, e.g. 24GB, 80GB or 24576MiB")
    unit = (m.group(2) or "g")[0]
    return int(float(m.group(1)) * {"m": 2**20, "g": 2**30, "t": 2**40}[unit])


def _card(n: int) -> str:
    gib = n / GiB
    return f"{gib:g} GB" if gib == int(gib) else _gb(n)


def _gb(n: int) -> str:
    return f"{n / GiB:.1f} GB" if n >= GiB else f"{n / 2**20:.0f} MB"


def verdict(est: Estimate, card: int) -> str:
    if est.peak <= card:
        return f"fits on {_card(card)} with {_gb(card - est.peak)} to spare"
    return f"does not fit on {_card(card)}: needs {_gb(est.peak)} ({_gb(est.peak - card)} over)"


def cards_line(est: Estimate) -> str:
    fits = [c for c in CARDS if est.peak <= c * GiB]
    if not fits:
        return f"needs {est.peak / GiB:.1f} GB: more than any of {', '.join(f'{c} GB' for c in CARDS)}"
    return (f"fits on {', '.join(f'{c} GB' for c in fits)}" +
            (f"; not on {', '.join(f'{c} GB' for c in CARDS if c not in fits)}" if len(fits) < len(CARDS) else ""))


@dataclass(frozen=True)
class Change:
    """One thing to change in the run file (`sections`, merged into it) or in the launch."""

    what: str  # as the user writes it
    why: str  # what it costs
    sections: dict = field(default_factory=dict)
    launch: Launch | None = None

    def apply(self, cfg: RunConfig, launch: Launch) -> tuple[RunConfig, Launch] | None:
        """The changed run file and launch; None when the change makes an invalid run file."""
        from tunelab.config import parse_config

        data = cfg.model_dump(mode="json", exclude_unset=True)  # what the run file wrote: defaults stay defaults
        for dotted, value in self.sections.items():
            *path, key = dotted.split(".")
            node = data
            for part in path:
                node = node.setdefault(part, {})
            node[key] = value
        try:
            return parse_config(data), self.launch or launch
        except TunelabError:
            return None


def candidates(cfg: RunConfig, launch: Launch, model: ModelPlan) -> list[Change]:
    """Single changes that save memory, least invasive first (same results before faster ones)."""
    t, o, out = cfg.train, cfg.optim, []
    if cfg.ema.enabled and cfg.ema.device == "same":
        out.append(Change('ema.device = "cpu"', "the EMA moves to CPU memory (a copy per update)", {"ema.device": "cpu"}))
    if not t.gradient_checkpointing:
        out.append(Change("train.gradient_checkpointing = true", "same results, ~20 % slower steps",
                          {"train.gradient_checkpointing": True}))
    if model.optimizer.kind == "adamw" and model.optimizer.foreach:
        out.append(Change("optim.args = {foreach = false}", "same results; one parameter at a time in the step",
                          {"optim.args": {**o.args, "foreach": False}}))
    if t.batch_size > 1:
        accumulation = cfg.accumulation_for(launch.world_size) * t.batch_size
        sections = {"train.batch_size": 1} | ({} if t.target_effective_batch else {"train.grad_accumulation": accumulation})
        out.append(Change(f"train.batch_size = 1 (accumulating {accumulation})", "same effective batch, slower", sections))
    if not t.fused_backward and launch.world_size == 1 and not launch.deepspeed:
        out.append(Change("train.fused_backward = true", "same results on one GPU; no gradients held",
                          {"train.fused_backward": True}))
    out += _sharding_changes(cfg, launch)
    if not t.full_bf16:
        keeps = o.name in ("adamw", "lion")
        sections = {"train.full_bf16": True, "train.mixed_precision": "bf16"} | ({} if keeps else {"train.bf16_update": "nearest"})
        out.append(Change("train.full_bf16 = true" + ("" if keeps else ', train.bf16_update = "nearest"'),
                          "bf16 weights" + (" (the exact update keeps every step, +2 B per weight)" if keeps
                                            else ": updates below half a bf16 step are lost"), sections))
    for name, why in (("adamw8bit", "8-bit moments (bitsandbytes, CUDA)"), ("adafactor", "factored second moments")):
        if o.name != name:
            sections = {"optim.name": name} | ({"train.bf16_update": "nearest"} if t.full_bf16 else {})
            out.append(Change(f'optim.name = "{name}"', why + (", bf16 update 'nearest'" if t.full_bf16 else ""), sections))
    if t.parts.text_encoder != "only" and t.parts.unet == "full":
        out += [Change(f'train.parts.unet = "{p}"', f"trains {p[4:]} % of the UNet", {"train.parts.unet": p})
                for p in ("unet71", "unet63")]
    if t.parts.text_encoder == "on":
        out.append(Change('train.parts.text_encoder = "off"', "the text encoders stay frozen",
                          {"train.parts.text_encoder": "off"}))
    return out


def _sharding_changes(cfg: RunConfig, launch: Launch) -> list[Change]:
    """ZeRO-2, ZeRO-3 and FSDP2 full shard; each keeps fp32 master weights itself, so a full_bf16
    run file turns it off with them. `suggestions` drops those tunelab would refuse (ZeRO-3 with
    accumulation: train/engines.py)."""
    bf16 = cfg.train.full_bf16
    out = []
    engines = (("zero2", "DeepSpeed ZeRO-2", "distributed_type DEEPSPEED, zero_stage 2 (pip install deepspeed)"),
               ("zero3", "DeepSpeed ZeRO-3", "distributed_type DEEPSPEED, zero_stage 3 (pip install deepspeed)"),
               ("fsdp", "FSDP2 full shard", "distributed_type FSDP, fsdp_version 2 (examples/accelerate/fsdp.yaml)"))
    for engine, label, config in engines:
        if launch.engine in ("zero3", "fsdp") or launch.engine == engine:
            continue
        counts = [launch.world_size] if launch.world_size > 1 else [2, 4, 8]
        for n in counts:
            same = " the same" if launch.world_size > 1 else ""
            out.append(Change(f"{label} on{same} {n} GPUs" + (", train.full_bf16 = false" if bf16 else ""),
                              f"accelerate config: {config}", {"train.full_bf16": False} if bf16 else {},
                              launch=replace(Launch(engine, n), overlap_comm=engine == "zero3")))
    return out


def _refused(cfg: RunConfig, launch: Launch) -> bool:
    """Whether `tunelab train` would refuse this run file under this launch's engine (train/engines.py)."""
    from tunelab.train.engines import Engine, FsdpSettings, check_engine

    if launch.deepspeed:
        engine = Engine("deepspeed", int(launch.engine[-1]))
    elif launch.engine.startswith("fsdp"):
        engine = Engine("fsdp", fsdp=FsdpSettings(reshard_after_forward=launch.engine == "fsdp"))
    else:
        return False
    try:
        check_engine(engine, cfg, cuda=True, world=launch.world_size)
    except TunelabError:
        return True
    return False


def suggestions(cfg: RunConfig, launch: Launch, card: int, *, spec=None, traces: dict | None = None,
                limit: int = 4, combine: bool = True) -> list[tuple[Change, Estimate]]:
    """Changes after which the step fits on `card`, least invasive first (at most `limit`); when no
    single change fits, the one that saves most combined with a second (`combine`)."""
    traces = {} if traces is None else traces
    model = _plan(cfg, spec, traces)
    shape = step_shape(cfg, model.arch)  # the data's buckets; a change may only change the batch
    fits, tried, engines = [], [], set()  # engines: already listed (on fewer GPUs)
    for change in candidates(cfg, launch, model):
        changed = change.apply(cfg, launch)
        if changed is None or (change.launch and change.launch.engine in engines) or _refused(*changed):
            continue  # an invalid run file, a larger launch of an engine already listed, or one tunelab refuses
        try:
            est = estimate(*changed, spec=spec, traces=traces, shape=replace(shape, batch=changed[0].train.batch_size))
        except TunelabError:
            continue
        (fits if est.peak <= card else tried).append((change, est))
        if est.peak <= card and change.launch:
            engines.add(change.launch.engine)
        if len(fits) >= limit:
            break
    if fits or not tried or not combine:
        return fits
    change, _ = min(tried, key=lambda ce: ce[1].peak)
    base_cfg, base_launch = change.apply(cfg, launch)
    for second, est in suggestions(base_cfg, base_launch, card, spec=spec, traces=traces, limit=2, combine=False):
        if second.what == change.what:
            continue
        fits.append((Change(f"{change.what} + {second.what}", f"{change.why}; {second.why}"), est))
    return fits


# --- the command ---------------------------------------------------------------------------------------------------


def report(cfg: RunConfig, launch: Launch, card: int | None = None, *, spec=None, traces: dict | None = None) -> list[str]:
    """`tunelab train RUN.toml --estimate-memory`'s output: the estimate, the verdict against
    `card` (or the common cards), and what to change when it does not fit."""
    traces = {} if traces is None else traces
    est = estimate(cfg, launch, spec=spec, traces=traces)
    lines = est.lines()
    if card is None:
        hint = "" if est.peak <= min(CARDS) * GiB else " (--gpu-memory 24GB lists the changes that would make it fit)"
        return lines + [f"verdict: {cards_line(est)}{hint}"]
    lines.append(f"verdict: {verdict(est, card)}")
    if est.peak > card:
        found = suggestions(cfg, launch, card, spec=spec, traces=traces)
        lines.append("to make it fit (estimated, least invasive first):" if found else
                     "no change tunelab knows makes it fit: more GPUs with ZeRO-3, or a card with more memory")
        lines += [f"  {c.what:<48} {_gb(e.peak):>8}  ({c.why})" for c, e in found]
    return lines


def launch_for(cfg: RunConfig, accelerate_config: str | Path | None = None, world_size: int | None = None) -> Launch:
    """The launch to estimate: the accelerate config's, else DDP on --world-size (else
    train.expect_world_size, else 1) GPUs."""
    if accelerate_config is not None:
        launch = launch_from_accelerate(accelerate_config)
        if world_size and world_size != launch.world_size:
            raise TunelabError(f"--world-size {world_size} contradicts {accelerate_config}'s num_processes "
                               f"{launch.world_size}; give one of them")
        return launch
    return Launch("ddp", world_size or cfg.train.expect_world_size or 1)
