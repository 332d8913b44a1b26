"""`tunelab train`: the full-finetune loop, on accelerate.

The order things are wired in (and why):
  1. read and validate the run file (before anything heavy loads);
  2. start accelerate, derive the gradient accumulation from the *real* world size;
  3. open the run directory: a complete saved state there means "resume"; check it matches the
     run file and the dataset index (fingerprint, effective batch, index digest);
  4. check the base's prediction record against the run's [objective] (file header only), then
     load the model (base checkpoint, --init-from, or the toy preset) and tokenizers, and stamp
     the run's prediction record on it (what grids and checkpoints then say);
  5. freeze what does not train (train/parts.py) — before wrapping, so DDP never builds gradient
     buckets for frozen parameters and the optimizer never sees them;
  6. build the optimizer and LR schedule from the trainable parameter groups;
  7. wrap the trainable modules for the launch's engine (train/engines.py, read at step 2): DDP
     through accelerate, DeepSpeed as one module through accelerate, FSDP2 sharded by tunelab
     before the optimizer is built (train/sharding.py); with
     train.fused_backward, hook every trainable parameter so it steps inside backward
     (train/fused.py: one process, checked at step 2);
  8. register the LR schedule for checkpointing; load the saved state when resuming;
  9. loop: one optimizer step = `accumulation` micro-batches per process (train/step.py does
     each micro-batch's math); log; save; fire the loop events (train/callbacks.py). Saving and
     the events run inside `optim.eval_weights`: under a schedule-free optimizer they see, and
     every file and state holds, its evaluation weights x; the steps are taken on its y.

Determinism: noise and timesteps come from a generator seeded by (seed, epoch, global batch
position), captions from (seed, epoch, row), the sample order from the sampler's (seed, epoch): a
step's inputs do not depend on how many processes share the work or on a restart, which is what
makes a killed-and-resumed run end bitwise identical to an uninterrupted one on the CPU.
An epoch's batches that do not fill a whole optimizer step are skipped (the sampler reshuffles
every epoch), so every step has the same effective batch.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from tunelab import faults
from tunelab.config import RunConfig, load_config, save_resolved
from tunelab.errors import TunelabError
from tunelab.models.prediction import PredictionRecord, base_record, conversion_note
from tunelab.run import RunDir, TrainerInfo, epoch_name, step_name, write_text_atomic
from tunelab.train.callbacks import Callbacks, Event, LoopContext, Progress, default_callbacks
from tunelab.train.engines import Engine, check_engine, launch_engine, whole_modules
from tunelab.train.lowprec import master_weights
from tunelab.train.optim import eval_weights
from tunelab.train.state import check_resume, choose_state, load_state, save_state
from tunelab.train.step import StepLoss, StepModels, TextSettings, batch_seed, training_loss

if TYPE_CHECKING:
    from tunelab.data.loader import BucketBatchSampler, IndexTable
    from tunelab.models.arch import Components
    from tunelab.train.objectives import Objective
    from tunelab.train.fused import FusedBackward
    from tunelab.train.parts import TrainablePlan

log = logging.getLogger(__name__)


@dataclass
class TrainData:
    """The training split, its sampler and loader, and the step counts they give."""

    index: "IndexTable"
    sampler: "BucketBatchSampler"
    loader: torch.utils.data.DataLoader
    steps_per_epoch: int
    total_steps: int
    digest: str  # the index's identity (data/index.py index_digest), checked on resume


@dataclass
class Training:
    """What `prepare` builds once the model is frozen where it should be: optimizer, schedule,
    the wrapped modules and the objective."""

    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    objective: "Objective"
    models: StepModels  # the modules each micro-batch calls (DDP / compiled wrappers where training)
    trainable: list[torch.nn.Module]  # wrapped modules that train (no_sync targets)
    params: list[torch.nn.Parameter]  # every trainable parameter, for the gradient norm
    fused: "FusedBackward | None" = None  # train.fused_backward: the optimizer steps inside backward (train/fused.py)
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)  # the trained modules themselves, by name


@dataclass
class Setup:
    """Everything the loop needs, built once by `setup`."""

    cfg: RunConfig
    accelerator: Any  # accelerate.Accelerator; None for --dry-run
    run: RunDir
    world_size: int
    accumulation: int
    comps: "Components"
    tokenizers: tuple[Any, Any]
    plan: "TrainablePlan"
    prediction: PredictionRecord  # what the run trains (stamped into every checkpoint)
    base_prediction: PredictionRecord  # what the base predicted
    progress: Progress
    resume_from: Path | None = None  # the state resumed from, if any
    data: TrainData | None = None  # None only for a dry run before the index exists
    training: Training | None = None  # None for a dry run
    callbacks: Callbacks = field(default_factory=Callbacks)
    lock: Any = None  # run.RunLock held by the main process while training
    engine: Engine = field(default_factory=Engine)  # what the launch asked for (train/engines.py)

    @property
    def effective_batch(self) -> int:
        return self.world_size * self.cfg.train.batch_size * self.accumulation

    @property
    def total_steps(self) -> int:
        return self.data.total_steps if self.data else 0

    def autocast(self):
        """The forward's autocast. Under DeepSpeed accelerate turns its own off (the engine casts the
        trained modules to 16 bits), so torch's is used with the run's precision: the same numbers
        as DDP's autocast, on 16-bit weights."""
        mp = self.cfg.train.mixed_precision
        if self.engine.kind == "deepspeed" and mp in ("bf16", "fp16"):
            dtype = torch.bfloat16 if mp == "bf16" else torch.float16
            return torch.autocast(self.accelerator.device.type, dtype=dtype)
        return self.accelerator.autocast()


@dataclass
class TrainResult:
    steps: int
    samples_seen: int
    last_checkpoint: Path | None
    skipped_nonfinite: int


def train(run: RunConfig | str | Path, allow_config_change: bool = False, init_from: str | Path | None = None,
          dry_run: bool = False, callbacks: Callbacks | None = None,
          resume_from: str | Path | None = None) -> TrainResult | None:
    """Train (or resume) the run a run file describes; `dry_run` prints the banner and stops.
    `resume_from` picks a state folder of the run instead of the newest usable one."""
    cfg = run if isinstance(run, RunConfig) else load_config(run)  # 1
    s = setup(cfg, allow_config_change, init_from, dry_run, resume_from)  # 2-8
    if callbacks is not None:
        s.callbacks = callbacks
    if s.accelerator is None or s.accelerator.is_main_process:  # one banner per run, not per process
        lines = banner(s)
        for line in lines:
            log.info("%s", line)
        if not dry_run:  # kept for the report: the numbers this (re)start derived
            write_text_atomic(s.run.banner, "\n".join(lines) + "\n")
    if dry_run:
        return None
    try:
        return loop(s)  # 9
    except Exception as err:
        if not disk_full(err):
            raise
        raise TunelabError(_disk_full(s, err)) from None


def disk_full(err: BaseException | None) -> bool:
    """Whether an exception (or one it came from) is a full disk or quota: OSError's errno, or
    the message of writers that wrap it (safetensors, pyarrow, tensorboard)."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _disk_full(s: Setup, err: BaseException) -> str:
    """What a full disk cost and how to go on: every file is written beside its final name and
    renamed when complete, so the last complete checkpoint and state are intact."""
    import shutil

    where = getattr(err, "filename", None) or s.run.path
    states = s.run.complete_states()
    resume = f"it resumes from {states[-1].name}" if states else "no state was saved yet, so it starts again"
    try:
        free = f"{shutil.disk_usage(s.run.path).free / 2**20:,.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return (f"no space left on the device while writing {where} ({free}); nothing complete was lost. "
            f"Free some space (or set save.keep_last / save.keep_states lower) and run `tunelab train` again: {resume}")


# --- setup --------------------------------------------------------------------------------------------


def _accelerator(cfg: RunConfig, engine: Engine):
    import os

    from accelerate import Accelerator
    from accelerate.utils import set_seed

    mp = cfg.train.mixed_precision
    if mp != "no" and not torch.cuda.is_available() and mp == "fp16":
        raise TunelabError("train.mixed_precision = 'fp16' needs a CUDA GPU; use 'bf16' or 'no' on the CPU")
    if engine.kind == "fsdp":  # tunelab shards itself (train/sharding.py); accelerate runs plain processes
        os.environ["ACCELERATE_USE_FSDP"] = "false"
    # cpu=True without CUDA: several processes then form a gloo group (DDP on the CPU). DeepSpeed
    # needs cpu=False, which on the CPU accelerate honours for one process (engines.check_engine).
    cpu = not torch.cuda.is_available() and engine.kind != "deepspeed"
    acc = Accelerator(mixed_precision=mp, step_scheduler_with_optimizer=False, cpu=cpu)
    set_seed(cfg.run.seed + acc.process_index)  # global RNGs; the math below uses explicit generators
    return acc


def setup(cfg: RunConfig, allow_config_change: bool = False, init_from: str | Path | None = None,
          dry_run: bool = False, resume_from: str | Path | None = None) -> Setup:
    """Steps 2-8 of the module docstring: everything `loop` needs (on a dry run: no weights,
    no accelerator, no optimizer). The main process holds the run directory's lock from here
    until `loop` ends, so a second `tunelab train` on the same directory is refused."""
    engine = launch_engine()
    check_engine(engine, cfg, torch.cuda.is_available())  # before any process group or weight
    acc = _accelerator(cfg, engine) if not dry_run else None
    run = RunDir(Path(cfg.run.output_dir))
    lock = run.lock() if acc is not None and acc.is_main_process else None
    try:
        s = _setup(cfg, acc, run, allow_config_change, init_from, dry_run, resume_from, engine)
    except BaseException:
        if lock:
            lock.release()
        raise
    s.lock = lock
    return s


def _setup(cfg: RunConfig, acc, run: RunDir, allow_config_change: bool, init_from: str | Path | None,
           dry_run: bool, resume_from: str | Path | None, engine: Engine = Engine()) -> Setup:
    from tunelab.train.fused import check_launch
    from tunelab.train.parts import select_trainable

    world = acc.num_processes if acc else (cfg.train.expect_world_size or 1)
    _check_world(cfg, world)
    accumulation = cfg.accumulation_for(world)
    check_launch(cfg, world, accumulation, acc.distributed_type.value if acc else "NO")  # train.fused_backward
    state = choose_state(run, resume_from)  # 3: resume? checked against the run file and the data first
    resume = run.read_trainer_info(state) if state is not None else None
    data = _data(cfg, acc, world, accumulation)
    if resume is not None:
        _check_effective_batch(cfg, resume, world, allow_config_change)
        check_resume(resume, cfg.fingerprint(), allow_config_change, data.digest if data else None,
                     len(data.sampler.rows) if data else None)
    source = str(init_from) if init_from else cfg.model.base
    prediction, base_prediction = check_prediction(cfg, source)  # 4: from the header, before any weight
    with whole_modules(acc):
        comps, toks = load_model(cfg, init_from, meta=dry_run)
    prediction.stamp(comps.extras, comps.metadata)  # live grids and checkpoints say what the run trains
    plan = select_trainable(comps, cfg.train.parts, cfg.optim, cfg.model.clip_skip)  # 5
    progress = _progress_from(resume, world * cfg.train.batch_size * accumulation)
    s = Setup(cfg, acc, run, world, accumulation, comps, toks, plan, prediction, base_prediction, progress,
              resume_from=state, data=data, callbacks=default_callbacks(cfg), engine=engine)
    if dry_run:
        return s
    s.training = _prepare(s)  # 6-8
    ema = _register_ema(s, state)
    if state is not None:
        load_state(acc, run, state, s.training.modules if engine.kind == "fsdp" else None, s.training.optimizer)
        if ema is False:  # a state saved without an EMA: it starts now, and is saved from here on
            acc.register_for_checkpointing(_ema_callback(s))
        log.info("resuming %s from step %d (epoch %d)", run.path, resume.step, resume.epoch)
        if resume.fingerprint != cfg.fingerprint():
            _adopt_new_schedule(s)
    return s


def _ema_callback(s: Setup):
    from tunelab.train.ema import EmaCallback

    return next((cb for cb in s.callbacks.items if isinstance(cb, EmaCallback)), None)


def _register_ema(s: Setup, state: Path | None) -> bool | None:
    """The EMA joins the training state (after the LR schedule: custom_checkpoint_1). None: no EMA;
    False: resuming a state that has none yet (registered after loading it)."""
    ema = _ema_callback(s)
    if ema is None:
        return None
    if state is not None and not (Path(state) / "custom_checkpoint_1.pkl").is_file():
        log.warning("the state %s has no EMA (ema was off): the EMA starts at step %s", state, s.progress.step)
        return False
    s.accelerator.register_for_checkpointing(ema)
    return True


def _check_world(cfg: RunConfig, world: int) -> None:
    if cfg.train.expect_world_size and world != cfg.train.expect_world_size:
        raise TunelabError(
            f"train.expect_world_size is {cfg.train.expect_world_size} but {world} process(es) were launched; "
            "launch the expected number (accelerate launch --num_processes N) or change the setting"
        )


def _progress_from(resume: TrainerInfo | None, effective_batch: int) -> Progress:
    if resume is None:
        return Progress(effective_batch=effective_batch)
    return Progress(resume.step, resume.epoch, resume.position, resume.skipped_nonfinite, effective_batch)


def check_prediction(cfg: RunConfig, source: str) -> tuple[PredictionRecord, PredictionRecord]:
    """(the run's record, the base's record); refuses a run whose [objective] contradicts its
    base unless `objective.convert_base` says the conversion is meant. Reads headers only. A
    pickle base is refused here, before anything loads: `tunelab train` never unpickles (convert
    it first), so every base that loads has a header or a scheduler config to read.
    The toy preset built in code is random and predicts nothing yet: any objective fits it."""
    from tunelab.models.checkpoint import refuse_pickle

    refuse_pickle(source, "model.base" if source == cfg.model.base else "--init-from")
    mine = PredictionRecord.from_objective(cfg.objective)
    base = mine if source == "toy" else (base_record(source) or mine)  # None: no such file (yet)
    if base.unsupported() and not cfg.objective.convert_base:
        raise TunelabError(f"the base {source} predicts {base.unsupported()}; to train it as {mine.describe()} "
                           "anyway (a conversion, like epsilon -> v), set objective.convert_base = true")
    if conversion_note(mine, base) and not cfg.objective.convert_base:
        ob = cfg.objective
        match = f"objective.prediction = {base.type!r}" + (", objective.zero_terminal_snr = true" if base.ztsnr else "")
        raise TunelabError(
            f"the base {source} predicts {base.describe()}, but the run file trains {mine.describe()} "
            f"(objective.prediction = {ob.prediction!r}, zero_terminal_snr = {str(ob.zero_terminal_snr).lower()}); "
            f"set {match} to continue the base as it is, or set objective.convert_base = true to convert it on purpose"
        )
    return mine, base


def _adopt_new_schedule(s: Setup) -> None:
    """--allow-config-change: the saved optimizer and schedule carry the old learning rates and
    schedule; continue with the run file's (weights and optimizer moments are kept)."""
    from tunelab.train.optim import param_groups, schedule_multiplier

    t = s.training
    fresh = {g["name"]: g["lr"] for g in param_groups(s.plan, s.cfg.optim)}
    o = s.cfg.optim
    fn = schedule_multiplier(o, s.total_steps)
    sched = t.lr_scheduler
    sched.lr_lambdas = [fn] * len(sched.lr_lambdas)
    for i, group in enumerate(t.optimizer.param_groups):
        sched.base_lrs[i] = group["initial_lr"] = fresh[group["name"]]
        group["lr"] = fresh[group["name"]] * fn(sched.last_epoch)
        group["weight_decay"] = o.weight_decay
    log.warning("settings changed since the saved state; continuing with the run file's learning rates and schedule")


def _check_effective_batch(cfg: RunConfig, resume: TrainerInfo, world: int, allow_change: bool) -> None:
    accum = cfg.accumulation_for(world)
    eff = world * cfg.train.batch_size * accum
    if resume.effective_batch != eff and not allow_change:
        raise TunelabError(
            f"this run was trained with an effective batch of {resume.effective_batch} and would resume with {eff} "
            f"({world} process(es) x batch {cfg.train.batch_size} x accumulation {accum}); launch the same number "
            "of processes, use train.target_effective_batch, or pass --allow-config-change"
        )


def load_model(cfg: RunConfig, init_from: str | Path | None = None, meta: bool = False):
    """(components, tokenizers) of the run's base (or `init_from`); `meta` builds shapes only
    (and loads only local tokenizers: the banner counts truncated prompts with them)."""
    from tunelab.models.arch import build_components
    from tunelab.models.checkpoint import base_arch, load_checkpoint
    from tunelab.models.text import load_tokenizers

    source = str(init_from) if init_from else cfg.model.base
    arch = None if cfg.model.arch == "auto" else cfg.model.arch
    tokenizers = check_tokenizers(cfg, source)  # from the header: a mismatch is refused before any weight loads
    if source == "toy":
        comps = build_components("toy", device="meta" if meta else "cpu", seed=cfg.run.seed)
    elif meta:  # --dry-run: shapes only, read from the file's header
        comps = build_components(arch or base_arch(source) or "sdxl", device="meta")
    else:
        comps = load_checkpoint(source, arch=arch, dtype=torch.float32)
    local = tokenizers == "toy" or (tokenizers not in ("auto", "hub") and Path(tokenizers).is_dir())
    toks = (load_tokenizers(tokenizers, allow_download=cfg.model.allow_download)
            if not meta or local else (None, None))
    return comps, toks


def check_tokenizers(cfg: RunConfig, source: str) -> str:
    """The run's tokenizer source, `model.tokenizers` with 'auto' resolved to the base's own,
    checked against the base's architecture (its header, or model.arch) before any weight loads:
    toy tokenizers with an sdxl base, or SDXL's with a toy one, are refused with the fix. A base
    that does not exist yet gets the setting back unchecked (loading it then fails and says so)."""
    from tunelab.models.checkpoint import base_arch
    from tunelab.models.text import resolve_tokenizers

    if source != "toy" and not Path(source).exists():
        return cfg.model.tokenizers
    arch = base_arch(source) if cfg.model.arch == "auto" or source == "toy" else cfg.model.arch
    return resolve_tokenizers(cfg.model.tokenizers, arch, source)


def _data(cfg: RunConfig, acc, world: int, accumulation: int) -> TrainData | None:
    from tunelab.data.index import check_bucket_config, index_digest
    from tunelab.data.loader import BucketBatchSampler, TrainDataset, collate, open_index

    if not cfg.data.index or not Path(cfg.data.index).exists():
        if acc is None:
            return None  # dry run before the index exists: the banner says so
        raise TunelabError(f"data.index = {cfg.data.index!r} does not exist; build it with `tunelab data index`")
    index = open_index(cfg.data.index)
    check_bucket_config(index.footer, cfg.data.given_buckets(), cfg.data.index)  # the index's buckets win
    rows = index.rows_in_split("train")
    latents = None
    if cfg.data.latents:  # tunelab's shards or a kohya .npz folder, checked against the index's buckets
        from tunelab.data.latents import open_latents

        latents = open_latents(cfg.data.latents, index, flip=cfg.data.flip_aug)
        rows = rows_with_latents(index, rows, latents)
    sampler = BucketBatchSampler(index.bucket_ids()[rows], cfg.train.batch_size, seed=cfg.run.seed,
                                 rank=acc.process_index if acc else 0, world_size=world, rows=rows,
                                 repeats=index.repeats()[rows])  # kohya folder repeats: samples per epoch
    steps_per_epoch = len(sampler) // accumulation
    if steps_per_epoch == 0:
        raise TunelabError(
            f"the dataset gives {len(sampler)} batch(es) per process per epoch, fewer than one optimizer step "
            f"({accumulation} micro-batches); lower train.batch_size / accumulation or add data"
        )
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    dataset = TrainDataset(index, cfg.data.captions, seed=cfg.run.seed, latents=latents,
                           crop_conditioning=cfg.data.crop_conditioning, flip_aug=cfg.data.flip_aug,
                           random_crop=cfg.data.random_crop)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=cfg.train.dataloader_workers)
    return TrainData(index, sampler, loader, steps_per_epoch, total, index_digest(cfg.data.index))


def rows_with_latents(index, rows, latents):
    """The training rows that have cached latents. Rows the cache rejected (its rejects logs:
    truncated, corrupt files found only when decoding) are left out with one warning, so a
    training run never meets them mid-epoch; rows neither cached nor rejected mean an unfinished
    cache, refused before the first step. (Checked for tunelab's shards; a kohya folder is
    checked by sampling in `open_latents`.)"""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from tunelab.data.images import read_rejects
    from tunelab.data.latents import LatentStore

    if not isinstance(latents, LatentStore):
        return rows
    keys = pq.read_table(index.path, columns=["key"], memory_map=True)["key"].take(pa.array(rows))
    have = np.asarray(pc.is_in(keys, value_set=pa.array(latents.keys(), pa.string())).to_numpy(zero_copy_only=False))
    if have.all():
        return rows
    logs = sorted(latents.dir.glob("rejects-r*.jsonl"))
    rejected = {r["key"] for p in logs for r in read_rejects(p)}
    lacking = keys.filter(pa.array(~have)).to_pylist()
    uncached = [k for k in lacking if k not in rejected]
    if uncached:
        raise TunelabError(
            f"{len(uncached):,} training image(s) of {index.path} have no latents in {latents.dir} (e.g. {uncached[0]!r}): "
            f"finish the cache with `tunelab data cache {index.path} --out {latents.dir}` (it resumes), or leave "
            "data.latents empty to encode images while training")
    log.warning("%s image(s) the latent cache rejected are left out of training (reasons in %s)",
                f"{len(lacking):,}", ", ".join(p.name for p in logs))
    return rows[have]


def _prepare(s: Setup) -> Training:
    """6-8: optimizer and schedule from trainable groups; wrap trainable modules; checkpoint hooks."""
    from tunelab.models.arch import load_arch
    from tunelab.train.objectives import Objective
    from tunelab.train.optim import build_optimizer, build_scheduler

    cfg, acc, comps = s.cfg, s.accelerator, s.comps
    weight_dtype = torch.bfloat16 if cfg.train.full_bf16 else torch.float32
    for module in comps.modules().values():
        trains = any(p.requires_grad for p in module.parameters())
        # Frozen modules may live in the autocast dtype to save memory; trained ones in weight_dtype.
        dtype = weight_dtype if trains or acc.mixed_precision == "no" else _autocast_dtype(acc)
        if next(module.parameters()).dtype != dtype:  # (diffusers warns on every dtype cast)
            module.to(dtype=dtype)
        module.to(acc.device)
        module.train(trains)
        if trains and cfg.train.gradient_checkpointing:
            _enable_checkpointing(module)
    names = [n for n in ("unet", "text_encoder_1", "text_encoder_2")
             if any(p.requires_grad for p in getattr(comps, n).parameters())]
    modules = {n: getattr(comps, n) for n in names}
    if s.engine.kind == "fsdp":  # before the optimizer: sharding replaces every parameter
        from tunelab.train import sharding

        before = sharding.parameter_names(modules)
        sharding.shard(modules, s.engine.fsdp, torch.bfloat16 if cfg.train.mixed_precision == "bf16" else None)
        sharding.rebind(s.plan, modules, before)
    optimizer = build_optimizer(s.plan, cfg.optim, cfg.train.bf16_update if cfg.train.full_bf16 else "nearest",
                                cfg.run.seed)
    lr_scheduler = build_scheduler(optimizer, cfg.optim, s.total_steps)
    trainable, optimizer, wrapped = _wrap(s, modules, optimizer)
    acc.register_for_checkpointing(lr_scheduler)
    if cfg.train.compile and "unet" in wrapped:
        wrapped["unet"] = torch.compile(wrapped["unet"])
    objective = Objective.from_config(cfg.objective, load_arch(comps.arch).scheduler, cfg.loss.noise_offset, cfg.loss)
    params = [p for m in trainable for p in m.parameters() if p.requires_grad]
    fused = None
    if cfg.train.fused_backward:  # each parameter steps from its gradient hook; max_grad_norm is per parameter then
        from tunelab.train.fused import FusedBackward

        fused = FusedBackward(optimizer, params, cfg.train.max_grad_norm)
    return Training(optimizer, lr_scheduler, objective, StepModels.of(comps, s.tokenizers, wrapped), trainable, params,
                    fused, modules)


class TrainedModules(torch.nn.Module):
    """The trained modules as one (accelerate hands DeepSpeed one model); the step calls each
    module itself, so this has no forward of its own. The frozen parameters inside them are kept
    as they were (CPU, their dtype): DeepSpeed casts the whole module to 16 bits, and a checkpoint
    must hold the base's frozen weights unchanged."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        super().__init__()
        self.parts = torch.nn.ModuleDict(modules)
        self.frozen = {name: {n: p.detach().cpu().clone() for n, p in m.named_parameters() if not p.requires_grad}
                       for name, m in modules.items()}


def _wrap(s: Setup, modules: dict[str, torch.nn.Module], optimizer):
    """(modules to no_sync / sync, the optimizer to step, {name: module the step calls}) per engine."""
    acc = s.accelerator
    if s.engine.kind == "fsdp":  # sharded already; the optimizer's sharded state is saved by train/sharding.py
        return list(modules.values()), optimizer, {}
    if s.engine.kind == "deepspeed":
        from tunelab.train.engines import deepspeed_settings

        plugin = acc.state.deepspeed_plugin
        ds = plugin.deepspeed_config  # in place: accelerate's HfDeepSpeedConfig reads the same dict
        filled = deepspeed_settings(ds, s.cfg, s.world_size, s.accumulation)
        ds.clear()
        ds.update(filled)
        acc.gradient_accumulation_steps = s.accumulation
        wrapper = TrainedModules(modules)
        if s.engine.zero_stage == 3:
            from tunelab.train.engines import zero3_hooks

            zero3_hooks(wrapper)
        engine, optimizer = acc.prepare(wrapper, optimizer)
        return [engine], optimizer, {}
    *trainable, optimizer = acc.prepare(*modules.values(), optimizer)
    return trainable, optimizer, dict(zip(modules, trainable))


def _autocast_dtype(acc) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision, torch.float32)


def _enable_checkpointing(module: torch.nn.Module) -> None:
    if hasattr(module, "enable_gradient_checkpointing"):
        module.enable_gradient_checkpointing()  # diffusers
    elif hasattr(module, "gradient_checkpointing_enable"):
        module.gradient_checkpointing_enable()  # transformers


# --- the banner ---------------------------------------------------------------------------------------------


def bf16_line(s: Setup) -> str:
    """How bf16 weights take their updates; for 'nearest', the share of UNet weights whose update
    at lr_unet is below half a bf16 step (lost at every step)."""
    t, o = s.cfg.train, s.cfg.optim
    if t.bf16_update == "exact":
        return ("bf16 weights: updates exact (the fp32 weight's other 16 bits kept beside each bf16 one, +2 bytes per "
                "weight; fp32 optimizer math and states; checkpoints hold the fp32 weights)")
    if t.bf16_update == "stochastic":
        return "bf16 weights: updates by stochastic rounding (fp32 optimizer math and states; unbiased)"
    if t.bf16_update == "kahan" and o.name.startswith("optimi_"):
        return "bf16 weights: updates with torch-optimi's Kahan summation (bf16 optimizer states; +2 bytes per weight)"
    if t.bf16_update == "kahan":
        return "bf16 weights: updates with Kahan compensation (fp32 optimizer math and states; +2 bytes per weight)"
    from tunelab.train.lowprec import fraction_vanishing

    params = s.plan.param_groups["unet"] or [p for ps in s.plan.param_groups.values() for p in ps]
    if not params or params[0].device.type == "meta":
        return "bf16 weights: updates rounded to nearest (train.bf16_update = 'nearest')"
    lost = fraction_vanishing(params, o.lr_unet)
    warn = (" — most updates vanish; set train.bf16_update = 'exact' (the default) or 'stochastic'"
            if lost > 0.5 else "")
    return (f"bf16 weights: updates rounded to nearest; at lr_unet {o.lr_unet:g}, {100 * lost:.1f} % of the trained UNet "
            f"weights have |w| so large that an update of ~lr is below half a bf16 step and is lost{warn}")


_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "lion": 4, "adafactor": 4}  # per trained parameter, roughly (Adafactor: factored)
# Optimizers whose states are tensors the size of the weights, in the weights' dtype (bf16 under
# full_bf16): how many. Schedule-free keeps z and the second moment (the weights themselves hold
# y; x is computed by eval()); optimi's Adan the first moment, the gradient-difference average, the
# second moment and the previous gradient. optimi's Kahan buffer is counted apart (+2 B).
_STATE_TENSORS = {"adamw_schedulefree": 2, "optimi_adamw": 2, "optimi_stableadamw": 2, "optimi_lion": 1,
                  "optimi_adan": 4}


def _state_bytes(cfg: RunConfig) -> int:
    t, name = cfg.train, cfg.optim.name
    w = 2 if t.full_bf16 else 4
    if name in _STATE_TENSORS:
        return _STATE_TENSORS[name] * w
    if name == "adamw" and t.full_bf16 and t.bf16_update == "nearest":
        return 2 * w  # torch's AdamW keeps its moments in the weights' dtype (the remedies' twin: fp32)
    return _STATE_BYTES.get(name, 8)  # tunelab's low-precision optimizers keep fp32 states too


def memory_line(cfg: RunConfig, n_trained: int, largest: int = 0) -> str:
    """Bytes per trained parameter on the device (weights + gradients + optimizer states + EMA), and
    their total: what fits is known before launching (activations come on top). With
    train.fused_backward the gradients count ~0: one parameter's (`largest` elements at most) at a time."""
    t, o = cfg.train, cfg.optim
    w = 2 if t.full_bf16 else 4
    g = 0 if t.fused_backward else w
    states = _state_bytes(cfg)
    kahan = 2 if t.full_bf16 and t.bf16_update == "kahan" else 0
    low = 2 if t.full_bf16 and t.bf16_update == "exact" else 0
    ema = 4 if cfg.ema.enabled and cfg.ema.device == "same" else 0
    per = w + low + g + states + kahan + ema
    one = f", the largest {largest:,} x {w} B = {largest * w / 2**20:,.0f} MiB" if largest else ""
    grads = f"gradients ~0 (fused backward: one parameter's at a time{one})" if t.fused_backward else f"gradients {w}"
    parts = [f"weights {w}"] + ([f"low bits {low}"] if low else []) + [grads, f"{o.name} states {states}"] + ([f"Kahan {kahan}"] if kahan else []) + \
        ([f"EMA {ema}"] if ema else [])
    cpu = "; EMA 4 B on the CPU" if cfg.ema.enabled and cfg.ema.device == "cpu" else ""
    return (f"memory per trained parameter: {' + '.join(parts)} = {per} B on the device x {n_trained:,} = "
            f"{per * n_trained / 2**30:.2f} GiB before activations{cpu}")


def banner(s: Setup) -> list[str]:
    """The derived numbers, printed before training (and by --dry-run)."""
    from tunelab.train.parts import banner_rows

    cfg, t = s.cfg, s.cfg.train
    resuming = f"  (resuming at step {s.progress.step})" if s.resume_from else ""
    lines = [f"run {cfg.run.name!r} -> {s.run.path}{resuming}",
             f"model {cfg.model.base} ({s.comps.arch}), text encoders {t.parts.text_encoder}, UNet {t.parts.unet}",
             f"world size {s.world_size} x batch {t.batch_size} x accumulation {s.accumulation} = "
             f"effective batch {s.effective_batch}",
             f"engine: {s.engine.describe(s.world_size)}"]
    if s.data is not None:
        lines += [f"dataset {len(s.data.sampler.rows):,} images, {s.data.sampler.num_samples:,} samples per epoch "
                  f"with repeats (train split), {_bucket_line(s.data)}",
                  f"steps per epoch {s.data.steps_per_epoch:,}, total steps {s.total_steps:,} "
                  f"({s.total_steps * s.effective_batch:,} samples)",
                  _truncation_line(s)]
    else:
        lines.append(f"dataset: data.index {cfg.data.index!r} is not built yet (tunelab data index)")
    lines.append("trainable parameters:")
    lines += [f"  {row}" for row in banner_rows(s.plan)]
    o = cfg.optim
    lines.append(f"optimizer {o.name}, LR unet {o.lr_unet:g} / te1 {o.lr_text_encoder_1:g} / te2 {o.lr_text_encoder_2:g}, "
                 f"schedule {o.schedule}; loss {cfg.loss.type}; precision {t.mixed_precision}"
                 f"{' (bf16 weights)' if t.full_bf16 else ''}")
    if t.full_bf16:
        lines.append(bf16_line(s))
    largest = max((p.numel() for ps in s.plan.param_groups.values() for p in ps), default=0)
    lines.append(memory_line(cfg, s.plan.n_trained, largest))
    converting = conversion_note(s.prediction, s.base_prediction)
    lines.append(f"objective {s.prediction.describe()}{converting}; checkpoints are marked {s.prediction.describe()}")
    if cfg.probe.enabled:
        pr = cfg.probe
        every = f"every {pr.every_n_steps} steps" if pr.every_n_steps else "at ~1 % of the compute (interval logged at the start)"
        lines.append(f"probes: learn ({pr.learn or 'none'}, {pr.learn_samples}) + preserve, {pr.timesteps} timesteps each, "
                     f"{every}{', scorer ' + pr.scorer if pr.scorer else ''} -> {s.run.probes}")
    return lines


def _truncation_line(s: Setup) -> str:
    """How many train-split prompts model.max_chunks cuts, counted once before training (at most
    2,000 of them, sampled: data/preview.py); the loop then logs `prompts_truncated` per step."""
    from tunelab.data.preview import count_split_truncation

    if s.tokenizers[0] is None:
        return "prompts: truncation not counted (tokenizers not loaded); `tunelab data preview --config RUN.toml` shows it"
    return count_split_truncation(s.data.index, s.data.sampler.rows, s.cfg.data.captions, s.cfg.run.seed,
                                  s.tokenizers, s.cfg.model.max_chunks).line()


def _bucket_line(data: TrainData) -> str:
    import numpy as np

    ids = data.index.bucket_ids()[data.sampler.rows]
    buckets = data.index.buckets
    counts = np.bincount(ids, minlength=len(buckets))
    used = [(int(c), tuple(buckets[i])) for i, c in enumerate(counts) if c]
    return f"{len(used)} buckets: " + ", ".join(f"{w}x{h} {c}" for c, (w, h) in sorted(used, reverse=True)[:6])


# --- the loop --------------------------------------------------------------------------------------------


def batches(s: Setup, start_epoch: int, start_position: int) -> Iterator[tuple[int, int, dict | None]]:
    """(epoch, global batch position, batch) for this process, continuing across epochs."""
    world, rank = s.accelerator.num_processes, s.accelerator.process_index
    sampler, loader = s.data.sampler, s.data.loader
    epoch, position = start_epoch, start_position
    while True:
        sampler.set_epoch(epoch)
        sampler.position = position  # a resumed epoch continues at its next unused batch
        usable = len(sampler) // s.accumulation * s.accumulation  # whole optimizer steps only
        consumed = position // world
        for batch in loader:
            if consumed >= usable:
                break
            yield epoch, consumed * world + rank, batch
            consumed += 1
        epoch, position = epoch + 1, 0


def loop(s: Setup) -> TrainResult:
    """Step 9: train until total_steps, saving and firing the loop events; then free the run
    directory's lock (also when training fails)."""
    try:
        return _loop(s)
    finally:
        if s.lock is not None:
            s.lock.release()


def _loop(s: Setup) -> TrainResult:
    from tunelab.train.metrics import MetricsLogger, WandbSettings

    acc, cfg, run, p = s.accelerator, s.cfg, s.run, s.progress
    if acc.is_main_process:
        run.make()
        save_resolved(cfg, run.config)
    metrics = MetricsLogger(run.events, run.metrics, acc.is_main_process, resume_step=p.step,
                            wandb=WandbSettings.from_config(cfg, run.path))  # [log] wandb: rank 0 only too
    ctx = LoopContext(cfg, run, s.comps, s.tokenizers, acc, metrics, p, s.total_steps, optimizer=s.training.optimizer,
                      sharded=s.engine.sharded, autocast=s.autocast)
    data = batches(s, p.epoch, p.position)
    bar = _progress_bar(acc, s.total_steps, p.step)
    start_step, streak, last_ckpt, smooth, t0 = p.step, 0, None, None, time.perf_counter()
    warned_truncation = False  # once per run: the per-step count is the prompts_truncated metric
    with eval_weights(s.training.optimizer):  # a resumed schedule-free state holds x: train() after START
        s.callbacks.fire(Event.START, ctx)
    while p.step < s.total_steps:
        result = optimizer_step(s, data)
        p.epoch, p.position = result.next_epoch, result.next_position
        if not result.finite:
            p.skipped_nonfinite, streak = p.skipped_nonfinite + 1, streak + 1
            _nonfinite_guard(s, streak)
            continue
        p.step, streak = p.step + 1, 0
        rate = p.effective_batch * (p.step - start_step) / (time.perf_counter() - t0)
        if p.step % cfg.log.every_n_steps == 0:
            metrics.log(p.step, _scalars(s, result, rate))
        if result.truncated and not warned_truncation:
            warned_truncation = _warn_truncation(s, result)
        smooth = result.loss if smooth is None else 0.98 * smooth + 0.02 * result.loss  # the bar's loss: an EMA
        bar.update(1)
        bar.set_postfix(loss=f"{smooth:.4f}", img_s=f"{rate:.2f}", epoch=p.epoch)
        last_ckpt = _after_step(s, ctx) or last_ckpt
    bar.close()
    last_ckpt = _finish(s, ctx) or last_ckpt
    return TrainResult(p.step, p.samples_seen, last_ckpt, p.skipped_nonfinite)


def _scalars(s: Setup, result: "StepResult", rate: float) -> dict[str, float]:
    p = s.progress
    scalars = {"loss": result.loss, "grad_norm": result.grad_norm, "img_per_s": rate,
               "effective_batch": p.effective_batch, "samples_seen": p.samples_seen,
               "nonfinite_skipped": p.skipped_nonfinite, "prompts_truncated": result.truncated}
    if torch.cuda.is_available():  # this process's peak so far (benchmarks/gpu_distributed.py reads it)
        scalars["gpu/max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    groups = s.training.optimizer.param_groups
    # schedule-free: the lr its last step used (its own warm-up included)
    return scalars | {f"lr/{g.get('name', i)}": g.get("scheduled_lr", g["lr"]) for i, g in enumerate(groups)}


def _warn_truncation(s: Setup, result: "StepResult") -> bool:
    m = s.cfg.model
    log.warning("step %d: %d of %d prompts were longer than model.max_chunks = %d (%d tokens) and were truncated; "
                "the count per step is logged as prompts_truncated (this warning is not repeated)",
                s.progress.step, result.truncated, s.effective_batch, m.max_chunks, m.max_chunks * 75)
    return True


def _progress_bar(acc, total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", disable=not acc.is_main_process,
                dynamic_ncols=True)


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean over the step's micro-batches and processes
    finite: bool  # False: some loss was NaN/inf and the step was skipped
    grad_norm: float
    next_epoch: int  # where the next step's data starts (position 0: this step finished an epoch)
    next_position: int
    truncated: int = 0  # prompts of the step (all micro-batches and processes) cut by max_chunks


def optimizer_step(s: Setup, data: Iterator[tuple[int, int, dict | None]]) -> StepResult:
    """`accumulation` micro-batches from `data` (see `batches`), then one optimizer step,
    skipped if any loss was not finite."""
    acc, t, total, bad, truncated = s.accelerator, s.training, 0.0, 0, 0
    skipped_before = _engine_skipped(s)
    for micro in range(s.accumulation):
        epoch, position, batch = next(data)
        last = micro == s.accumulation - 1
        _micro_batch_begins(s)
        with _no_sync(s, enabled=not last), s.autocast():
            loss, cut = _micro_loss(s, batch, epoch, position)
            if faults.hit("loss.nonfinite"):  # the reliability suite's forced NaN (faults.py)
                loss = loss * float("nan")
        truncated += cut
        # A NaN/inf loss still goes through backward (every process must take part in DDP's
        # all-reduce); its gradients are thrown away below with the whole step.
        bad += int(not torch.isfinite(loss))
        _backward(s, loss, skip=bad > 0)
        total += loss.detach().float().item()
    flags = acc.reduce(torch.tensor([total, float(bad), float(truncated)], device=acc.device), reduction="sum")
    finite = flags[1].item() == 0
    if s.engine.kind == "deepspeed":  # the engine stepped inside the last backward, or skipped a non-finite step
        finite = _deepspeed_stepped(s, finite, skipped_before)
    grad_norm = _clip(s) if finite else float("nan")
    if finite:
        if t.fused is None:  # fused: every parameter has stepped inside backward already
            t.optimizer.step()
        t.lr_scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    mean_loss = flags[0].item() / (s.accumulation * acc.num_processes)
    return StepResult(mean_loss, finite, grad_norm, *_next_start(s, epoch, position), truncated=int(flags[2].item()))


def _backward(s: Setup, loss: torch.Tensor, skip: bool) -> None:
    """One micro-batch's backward. With train.fused_backward the optimizer steps inside it, so a
    step whose loss is already known to be non-finite skips backward altogether: no parameter
    moves, as the unfused step is thrown away whole (fused runs on one process: nobody waits)."""
    fused = s.training.fused
    if s.engine.kind == "deepspeed":
        s.accelerator.backward(loss)  # the engine divides by its gradient_accumulation_steps (= ours)
    elif fused is None:
        s.accelerator.backward(loss / s.accumulation)
    elif not skip:
        with fused.stepping():
            s.accelerator.backward(loss / s.accumulation)


def _micro_loss(s: Setup, batch: dict | None, epoch: int, position: int) -> StepLoss:
    t, cfg = s.training, s.cfg
    if batch is None:  # every image of the batch was unreadable (logged to the rejects file)
        return StepLoss(sum(p.sum() for p in t.params) * 0.0, 0)  # still a graph: DDP needs every process's backward
    gen = torch.Generator(device="cpu").manual_seed(batch_seed(cfg.run.seed, epoch, position))
    text = TextSettings(cfg.model.max_chunks, cfg.model.clip_skip, trains=cfg.train.parts.text_encoder != "off")
    return training_loss(t.models, batch, t.objective, cfg.loss, text, gen, s.accelerator.device)


def _next_start(s: Setup, epoch: int, position: int) -> tuple[int, int]:
    world = s.accelerator.num_processes
    consumed = position // world + 1  # batches this process has used in `epoch`
    if consumed >= len(s.data.sampler) // s.accumulation * s.accumulation:
        return epoch + 1, 0
    return epoch, consumed * world


@contextlib.contextmanager
def _no_sync(s: Setup, enabled: bool):
    """Gradients stay local on every micro-batch but a step's last: DDP's no_sync, FSDP's
    gradient sync switch, DeepSpeed's accumulation boundary (accelerate's accumulate context)."""
    acc, modules = s.accelerator, s.training.trainable
    if s.engine.kind == "fsdp":
        from tunelab.train import sharding

        sharding.gradient_sync(modules, not enabled)
        yield
        return
    if s.engine.kind == "deepspeed":  # accelerate counts micro-batches; the engine steps when it says sync
        with acc.accumulate(*modules):
            if acc.sync_gradients == enabled:
                raise RuntimeError("accelerate's accumulation count lost step with tunelab's")
            yield
        return
    with contextlib.ExitStack() as stack:
        if enabled:
            for m in modules:
                stack.enter_context(acc.no_sync(m))
        yield


def _micro_batch_begins(s: Setup) -> None:
    """What DeepSpeed's engine.forward does first, since tunelab calls the wrapped modules itself:
    the ZeRO optimizer counts the micro-batch. ZeRO-3 adds a step's gradients from its second
    micro-batch on and copies them on the first; without the count every micro-batch overwrote the
    one before (measured: the first step's gradient norm 1.15 instead of 1.84 at accumulation 2)."""
    if s.engine.kind == "deepspeed":
        optimizer = s.training.trainable[0].optimizer
        if hasattr(optimizer, "clear_backward_seen_flag"):
            optimizer.clear_backward_seen_flag()


def _engine_skipped(s: Setup) -> int:
    """DeepSpeed's count of steps its overflow check skipped (0 for the other engines)."""
    if s.engine.kind != "deepspeed":
        return 0
    return int(s.training.trainable[0].skipped_steps)


def _deepspeed_stepped(s: Setup, finite: bool, skipped_before: int) -> bool:
    """Whether DeepSpeed applied this step. A non-finite loss gives non-finite gradients, which its
    overflow check (bf16's check_grad_overflow, fp16's loss scaler) skips; were it applied, the
    weights are lost, and the run stops before saving them."""
    skipped = _engine_skipped(s) > skipped_before
    if not finite and not skipped:
        raise TunelabError(
            f"at step {s.progress.step + 1} the loss was NaN/inf and DeepSpeed applied the step anyway, so the weights "
            f"are no longer usable; nothing was saved from it. The last good state is {s.run.latest_state() or 'none'}; "
            "check that the DeepSpeed config does not turn off its overflow check, and resume from that state")
    if finite and skipped:
        log.warning("DeepSpeed skipped step %d (fp16 loss scale overflow); the step is counted as skipped",
                    s.progress.step + 1)
    return finite and not skipped


def _clip(s: Setup) -> float:
    """Clip to train.max_grad_norm (0 = off) and return the total gradient norm before clipping
    (logged). Fused: the hooks clipped and measured each gradient as it came."""
    from tunelab.train.fused import clip_one, total_norm

    params, t = s.training.params, s.cfg.train
    if s.training.fused is not None:
        return s.training.fused.grad_norm()
    if s.engine.kind == "deepspeed":  # clipped by the engine inside its step (gradient_clipping = max_grad_norm)
        norm = s.training.trainable[0].get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")
    if s.engine.kind == "fsdp":
        from tunelab.train import sharding

        return sharding.clip(params, t.max_grad_norm)
    if t.max_grad_norm > 0 and t.max_grad_norm_scope == "per_parameter":
        s.accelerator.unscale_gradients()  # fp16's loss scale first, once (accelerate's clip_grad_norm_ does the same)
        return total_norm([clip_one(p, t.max_grad_norm) for p in params if p.grad is not None])
    if t.max_grad_norm > 0:
        return float(s.accelerator.clip_grad_norm_(params, t.max_grad_norm))
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _nonfinite_guard(s: Setup, streak: int) -> None:
    limit = s.cfg.train.max_nonfinite_steps
    log.warning("loss was not finite; step skipped (%d in a row, %d in total)", streak, s.progress.skipped_nonfinite)
    if streak >= limit:
        last = s.run.latest_state()
        raise TunelabError(
            f"the loss was NaN/inf for {streak} optimizer steps in a row (train.max_nonfinite_steps = {limit}); "
            f"stopped without saving. The last good state is {last or 'none (no state saved yet)'}. "
            "Lower the learning rates (optim.lr_*), check the data, or enable clipping (train.max_grad_norm)"
        )


# --- saving ----------------------------------------------------------------------------------------------


def _after_step(s: Setup, ctx: LoopContext) -> Path | None:
    """Save if due, then the STEP event, inside `eval_weights` when either uses the weights: a
    schedule-free run's files, state and callbacks see its evaluation weights x (train/optim.py)."""
    epoch_ended = s.progress.position == 0
    used = _checkpoint_name(s, epoch_ended) is not None or s.callbacks.due(Event.STEP, ctx)
    with eval_weights(s.training.optimizer, enabled=used):
        path = _maybe_save(s, ctx, epoch_ended)
        s.callbacks.fire(Event.STEP, ctx)
    return path


def _checkpoint_name(s: Setup, epoch_ended: bool) -> str | None:
    """The checkpoint this step saves, every N steps and/or every N epochs (`epoch` = where the next
    step starts, so after the last step of epoch 3 it is 4 and the file is `epoch-0004`); None if none."""
    cfg, p = s.cfg.save, s.progress
    by_step = cfg.every_n_steps > 0 and p.step % cfg.every_n_steps == 0
    by_epoch = epoch_ended and cfg.every_n_epochs > 0 and p.epoch % cfg.every_n_epochs == 0
    if not (by_step or by_epoch) or p.step == s.total_steps:
        return None  # the final step is saved by _finish
    return epoch_name(p.epoch) if by_epoch else step_name(p.step)


def _maybe_save(s: Setup, ctx: LoopContext, epoch_ended: bool) -> Path | None:
    """Checkpoint + training state when `_checkpoint_name` names one."""
    name = _checkpoint_name(s, epoch_ended)
    if name is None:
        return None
    path = _write_checkpoint(s, name, ctx)
    _write_state(s)
    return path


def _finish(s: Setup, ctx: LoopContext) -> Path | None:
    with eval_weights(s.training.optimizer):  # the final file and state: schedule-free's x
        path = _write_checkpoint(s, "last", ctx)
        _write_state(s)
        s.callbacks.fire(Event.END, ctx)
    ctx.metrics.close()
    if s.accelerator.is_main_process:
        log.info("done: %d steps, %d samples; checkpoint %s", s.progress.step, s.progress.samples_seen, path)
    return path


def _training_info(s: Setup) -> dict[str, Any]:
    o, p = s.cfg.optim, s.progress
    # kohya's ss_* names where it has one (model browsers read them), tunelab's where it has none
    t = s.cfg.train
    return {"steps": p.step, "epoch": p.epoch, "effective_batch": p.effective_batch, "learning_rate": o.lr_unet,
            "text_encoder_lr": o.lr_text_encoder_1, "text_encoder_lr1": o.lr_text_encoder_1,
            "text_encoder_lr2": o.lr_text_encoder_2, "optimizer": o.name, "lr_scheduler": o.schedule,
            "gradient_accumulation_steps": s.accumulation, "mixed_precision": t.mixed_precision,
            "sd_model_name": Path(s.cfg.model.base).name, "run": s.cfg.run.name}


def _write_checkpoint(s: Setup, name: str, ctx: LoopContext) -> Path | None:
    from tunelab.models.checkpoint import Lineage, save_checkpoint

    acc = s.accelerator
    acc.wait_for_everyone()
    path = None
    whole = _gathered_weights(s)  # every process takes part; None: each module holds its whole weights
    if acc.is_main_process:
        with master_weights(s.training.optimizer):  # bf16_update = "exact": the whole fp32 weights
            path = save_checkpoint(s.comps, s.run.checkpoint_path(name), dtype=s.cfg.save.dtype,
                                   title=f"{s.cfg.run.name} {name}", training=_training_info(s), prediction=s.prediction,
                                   lineage=Lineage.of(s.comps, s.cfg.run.name, s.progress.step, s.cfg.model.base),
                                   state_dicts=whole)
        s.run.prune_checkpoints(s.cfg.save.keep_last)
    acc.wait_for_everyone()
    ctx.checkpoint = path
    ctx.metrics.flush()  # metrics.parquet is current for the CHECKPOINT callbacks (the report reads it)
    s.callbacks.fire(Event.CHECKPOINT, ctx)
    return path


def _write_state(s: Setup) -> None:
    p = s.progress
    info = TrainerInfo(p.step, p.epoch, p.position, p.samples_seen, p.effective_batch, p.skipped_nonfinite,
                       s.cfg.fingerprint(), s.accelerator.num_processes, s.data.digest, len(s.data.sampler.rows))
    shards = None
    if s.engine.kind == "fsdp":
        from tunelab.train import sharding

        def shards(folder: Path) -> None:
            sharding.save(folder, s.training.modules, s.training.optimizer)
    save_state(s.accelerator, s.run, info, keep=s.cfg.save.keep_states, extra=shards)


def _gathered_weights(s: Setup) -> dict[str, dict[str, torch.Tensor]] | None:
    """The trained modules' whole weights for the checkpoint, where no module holds them: FSDP's
    shards gathered; DeepSpeed's fp32 master weights (its modules hold bf16 copies; under ZeRO-3,
    partitions). Collective. None for DDP and one process."""
    if s.engine.kind == "fsdp":
        from tunelab.train import sharding

        return sharding.full_state(s.training.modules)
    if s.engine.kind == "deepspeed":
        from tunelab.train.engines import deepspeed_full_state

        wrapper = s.training.trainable[0].module  # the TrainedModules inside DeepSpeed's engine
        return deepspeed_full_state(s.training.modules, s.accelerator.is_main_process, wrapper.frozen)
    return None
