"""`tunelab train`: the full-finetune loop, on accelerate.

The order things are wired in (and why):
  1. read and validate the run file (before anything heavy loads);
  2. start accelerate, derive the gradient accumulation from the *real* world size;
  3. open the run directory: a complete saved state there means "resume";
  4. load the model (base checkpoint, --init-from, or the toy preset) and tokenizers;
  5. freeze what does not train (train/parts.py) — before wrapping, so DDP never builds gradient
     buckets for frozen parameters and the optimizer never sees them;
  6. build the optimizer and LR schedule from the trainable parameter groups;
  7. wrap the trainable modules with accelerate (DDP / DeepSpeed / FSDP by launch config);
  8. register the LR schedule for checkpointing; load the saved state when resuming;
  9. loop: one optimizer step = `accumulation` micro-batches per process; log; save.

Determinism: noise and timesteps come from a generator seeded by (seed, epoch, global batch
position), captions from (seed, epoch, row), the sample order from the sampler's (seed, epoch): a
step's inputs do not depend on how many processes share the work or on a restart, which is what
makes a killed-and-resumed run end bitwise identical to an uninterrupted one on the CPU.
An epoch's batches that do not fill a whole optimizer step are skipped (the sampler reshuffles
every epoch), so every step has the same effective batch.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from tunelab.config import RunConfig, load_config, save_resolved
from tunelab.errors import TunelabError
from tunelab.train.state import RunDir, check_resume, load_state, prune_checkpoints, save_state

log = logging.getLogger(__name__)


@dataclass
class Setup:
    """Everything the loop needs, built once."""

    cfg: RunConfig
    accelerator: Any
    run: RunDir
    accumulation: int
    comps: Any
    tokenizers: tuple
    plan: Any
    index: Any = None
    sampler: Any = None
    loader: Any = None
    objective: Any = None
    optimizer: Any = None
    lr_scheduler: Any = None
    trainable: list = field(default_factory=list)  # wrapped modules that train
    wrapped: dict = field(default_factory=dict)  # component name -> its wrapped (DDP/compiled) module
    params: list = field(default_factory=list)  # every trainable parameter, for the gradient norm
    steps_per_epoch: int = 0
    total_steps: int = 0
    resume: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    steps: int
    samples_seen: int
    last_checkpoint: Path | None
    skipped_nonfinite: int


def train(run_file: str | Path, allow_config_change: bool = False, init_from: str | Path | None = None,
          dry_run: bool = False) -> TrainResult | None:
    cfg = load_config(run_file)  # 1
    s = _setup(cfg, allow_config_change, init_from, dry_run)  # 2-8
    for line in banner(s):
        log.info("%s", line)
    if dry_run:
        return None
    return _loop(s)  # 9


# --- setup --------------------------------------------------------------------------------------------


def _accelerator(cfg: RunConfig):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    mp = cfg.train.mixed_precision
    if mp != "no" and not torch.cuda.is_available() and mp == "fp16":
        raise TunelabError("train.mixed_precision = 'fp16' needs a CUDA GPU; use 'bf16' or 'no' on the CPU")
    # cpu=True without CUDA: several processes then form a gloo group (DDP on the CPU).
    acc = Accelerator(mixed_precision=mp, step_scheduler_with_optimizer=False, cpu=not torch.cuda.is_available())
    set_seed(cfg.run.seed + acc.process_index)  # global RNGs; the math below uses explicit generators
    return acc


def _setup(cfg: RunConfig, allow_change: bool, init_from, dry_run: bool) -> Setup:
    acc = _accelerator(cfg) if not dry_run else None
    world = acc.num_processes if acc else (cfg.train.expect_world_size or 1)
    if cfg.train.expect_world_size and world != cfg.train.expect_world_size:
        raise TunelabError(
            f"train.expect_world_size is {cfg.train.expect_world_size} but {world} process(es) were launched; "
            "launch the expected number (accelerate launch --num_processes N) or change the setting"
        )
    run = RunDir(Path(cfg.run.output_dir))
    state = run.latest_state()
    resume: dict = {}
    if state is not None:
        from tunelab.train.state import read_trainer_info

        resume = read_trainer_info(state) | {"path": str(state)}
        _check_effective_batch(cfg, resume, world, allow_change)
        check_resume(resume, cfg.fingerprint(), allow_change)
    comps, toks = _load_model(cfg, init_from, meta=dry_run)
    from tunelab.train.parts import select_trainable

    plan = select_trainable(comps, cfg.train.parts, cfg.optim, cfg.model.clip_skip)  # 5: requires_grad set; frozen params out of every group
    s = Setup(cfg, acc, run, cfg.accumulation_for(world), comps, toks, plan, resume=resume)
    _data(s, world)
    if dry_run:
        return s
    _prepare(s)
    if state is not None:
        load_state(acc, state)
        log.info("resuming %s from step %d (epoch %d)", run.path, resume["step"], resume["epoch"])
        if resume["fingerprint"] != cfg.fingerprint():
            _adopt_new_schedule(s)
    return s


def _adopt_new_schedule(s: Setup) -> None:
    """--allow-config-change: the saved optimizer and schedule carry the old learning rates and
    schedule; continue with the run file's (weights and optimizer moments are kept)."""
    from tunelab.train.optim import ScheduleMultiplier, param_groups

    fresh = {g["name"]: g["lr"] for g in param_groups(s.plan, s.cfg.optim)}
    o = s.cfg.optim
    fn = ScheduleMultiplier(o.schedule, o.warmup_steps, s.total_steps)
    sched = s.lr_scheduler
    sched.lr_lambdas = [fn] * len(sched.lr_lambdas)
    for i, group in enumerate(s.optimizer.param_groups):
        sched.base_lrs[i] = group["initial_lr"] = fresh[group["name"]]
        group["lr"] = fresh[group["name"]] * fn(sched.last_epoch)
        group["weight_decay"] = o.weight_decay
    log.warning("settings changed since the saved state; continuing with the run file's learning rates and schedule")


def _check_effective_batch(cfg: RunConfig, resume: dict, world: int, allow_change: bool) -> None:
    accum = cfg.accumulation_for(world)
    eff = world * cfg.train.batch_size * accum
    if resume.get("effective_batch", eff) != eff and not allow_change:
        raise TunelabError(
            f"this run was trained with an effective batch of {resume['effective_batch']} and would resume with {eff} "
            f"({world} process(es) x batch {cfg.train.batch_size} x accumulation {accum}); launch the same number "
            "of processes, use train.target_effective_batch, or pass --allow-config-change"
        )


def _load_model(cfg: RunConfig, init_from, meta: bool):
    from tunelab.models.arch import build_components
    from tunelab.models.checkpoint import detect_arch, load_checkpoint
    from tunelab.models.safetensors_io import read_header
    from tunelab.models.text import load_tokenizers

    source = str(init_from) if init_from else cfg.model.base
    arch = None if cfg.model.arch == "auto" else cfg.model.arch
    if source == "toy":
        comps = build_components("toy", device="meta" if meta else "cpu", seed=cfg.run.seed)
    elif meta:  # --dry-run: shapes only, read from the file's header
        header = read_header(source) if Path(source).is_file() else None
        arch = arch or (detect_arch({k: v.shape for k, v in header.tensors.items()}, header.metadata, source)
                        if header else "sdxl")
        comps = build_components(arch, device="meta")
    else:
        comps = load_checkpoint(source, arch=arch, dtype=torch.float32)
    toks = (load_tokenizers(cfg.model.tokenizers, allow_download=cfg.model.allow_download)
            if not meta or cfg.model.tokenizers == "toy" else (None, None))
    return comps, toks


def _data(s: Setup, world: int) -> None:
    from tunelab.data.loader import BucketBatchSampler, TrainDataset, collate, open_index

    cfg = s.cfg
    if not cfg.data.index or not Path(cfg.data.index).exists():
        if s.accelerator is None:
            return  # dry run before the index exists: the banner says so
        raise TunelabError(f"data.index = {cfg.data.index!r} does not exist; build it with `tunelab data index`")
    s.index = open_index(cfg.data.index)
    rows = s.index.rows_in_split("train")
    rank = s.accelerator.process_index if s.accelerator else 0
    s.sampler = BucketBatchSampler(s.index.bucket_ids()[rows], cfg.train.batch_size, seed=cfg.run.seed,
                                   rank=rank, world_size=world, rows=rows)
    s.steps_per_epoch = len(s.sampler) // s.accumulation
    if s.steps_per_epoch == 0:
        raise TunelabError(
            f"the dataset gives {len(s.sampler)} batch(es) per process per epoch, fewer than one optimizer step "
            f"({s.accumulation} micro-batches); lower train.batch_size / accumulation or add data"
        )
    s.total_steps = cfg.train.max_steps or cfg.train.epochs * s.steps_per_epoch
    latents = None
    if cfg.data.latents:
        from tunelab.data.latents import LatentStore

        latents = LatentStore(cfg.data.latents)
    dataset = TrainDataset(s.index, cfg.data.captions, seed=cfg.run.seed, latents=latents)
    s.loader = torch.utils.data.DataLoader(dataset, batch_sampler=s.sampler, collate_fn=collate,
                                           num_workers=cfg.train.dataloader_workers)


def _prepare(s: Setup) -> None:
    """6-8: optimizer and schedule from trainable groups; wrap trainable modules; checkpoint hooks."""
    from tunelab.models.arch import load_arch
    from tunelab.train.objectives import Objective
    from tunelab.train.optim import build_optimizer, build_scheduler

    cfg, acc, comps = s.cfg, s.accelerator, s.comps
    weight_dtype = torch.bfloat16 if cfg.train.full_bf16 else torch.float32
    for name, module in comps.modules().items():
        trains = any(p.requires_grad for p in module.parameters())
        # Frozen modules may live in the autocast dtype to save memory; trained ones in weight_dtype.
        dtype = weight_dtype if trains or acc.mixed_precision == "no" else _autocast_dtype(acc)
        if next(module.parameters()).dtype != dtype:  # (diffusers warns on every dtype cast)
            module.to(dtype=dtype)
        module.to(acc.device)
        module.train(trains)
        if trains and cfg.train.gradient_checkpointing:
            _enable_checkpointing(module)
    s.optimizer = build_optimizer(s.plan, cfg.optim)
    s.lr_scheduler = build_scheduler(s.optimizer, cfg.optim, s.total_steps)
    names = [n for n in ("unet", "text_encoder_1", "text_encoder_2") if any(p.requires_grad for p in getattr(comps, n).parameters())]
    wrapped = acc.prepare(*[getattr(comps, n) for n in names], s.optimizer)
    s.trainable, s.optimizer = list(wrapped[:-1]), wrapped[-1]
    s.params = [p for m in s.trainable for p in m.parameters() if p.requires_grad]
    s.wrapped = dict(zip(names, s.trainable))
    acc.register_for_checkpointing(s.lr_scheduler)
    if cfg.train.compile and "unet" in s.wrapped:
        s.wrapped["unet"] = torch.compile(s.wrapped["unet"])
    s.objective = Objective.from_config(cfg.objective, load_arch(comps.arch).scheduler, cfg.loss.noise_offset)


def _autocast_dtype(acc) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision, torch.float32)


def _enable_checkpointing(module: torch.nn.Module) -> None:
    if hasattr(module, "enable_gradient_checkpointing"):
        module.enable_gradient_checkpointing()  # diffusers
    elif hasattr(module, "gradient_checkpointing_enable"):
        module.gradient_checkpointing_enable()  # transformers


# --- the banner ---------------------------------------------------------------------------------------------


def banner(s: Setup) -> list[str]:
    """The derived numbers, printed before training (and by --dry-run)."""
    from tunelab.train.parts import banner_rows

    cfg, t = s.cfg, s.cfg.train
    world = s.accelerator.num_processes if s.accelerator else (t.expect_world_size or 1)
    eff = world * t.batch_size * s.accumulation
    lines = [f"run {cfg.run.name!r} -> {s.run.path}" + (f"  (resuming at step {s.resume['step']})" if s.resume else ""),
             f"model {cfg.model.base} ({s.comps.arch}), text encoders {t.parts.text_encoder}, UNet {t.parts.unet}",
             f"world size {world} x batch {t.batch_size} x accumulation {s.accumulation} = effective batch {eff}"]
    if s.sampler is not None:
        n, hist = len(s.sampler.rows), _bucket_line(s)
        lines += [f"dataset {n:,} images (train split), {hist}",
                  f"steps per epoch {s.steps_per_epoch:,}, total steps {s.total_steps:,} "
                  f"({s.total_steps * eff:,} samples)"]
    else:
        lines.append(f"dataset: data.index {cfg.data.index!r} is not built yet (tunelab data index)")
    lines.append("trainable parameters:")
    lines += [f"  {row}" for row in banner_rows(s.plan)]
    lines.append(f"optimizer {cfg.optim.name}, LR unet {cfg.optim.lr_unet:g} / te1 {cfg.optim.lr_text_encoder_1:g} / "
                 f"te2 {cfg.optim.lr_text_encoder_2:g}, schedule {cfg.optim.schedule}; objective {cfg.objective.prediction}, "
                 f"loss {cfg.loss.type}; precision {t.mixed_precision}{' (bf16 weights)' if t.full_bf16 else ''}")
    return lines


def _bucket_line(s: Setup) -> str:
    import numpy as np

    ids = s.index.bucket_ids()[s.sampler.rows]
    buckets = s.index.buckets
    counts = np.bincount(ids, minlength=len(buckets))
    used = [(int(c), tuple(buckets[i])) for i, c in enumerate(counts) if c]
    return f"{len(used)} buckets: " + ", ".join(f"{w}x{h} {c}" for c, (w, h) in sorted(used, reverse=True)[:6])


# --- the loop --------------------------------------------------------------------------------------------


def _batches(s: Setup, start_epoch: int, start_position: int) -> Iterator[tuple[int, int, dict | None]]:
    """(epoch, global batch position, batch) for this process, continuing across epochs."""
    world, rank = s.accelerator.num_processes, s.accelerator.process_index
    epoch, position = start_epoch, start_position
    while True:
        s.sampler.set_epoch(epoch)
        s.sampler.position = position  # a resumed epoch continues at its next unused batch
        per_epoch = len(s.sampler)
        usable = per_epoch // s.accumulation * s.accumulation  # whole optimizer steps only
        consumed = position // world
        for batch in s.loader:
            if consumed >= usable:
                break
            yield epoch, consumed * world + rank, batch
            consumed += 1
        epoch, position = epoch + 1, 0


def _loop(s: Setup) -> TrainResult:
    from tunelab.train.metrics import MetricsLogger

    acc, cfg, run = s.accelerator, s.cfg, s.run
    step, epoch = s.resume.get("step", 0), s.resume.get("epoch", 0)
    if acc.is_main_process:
        run.make()
        save_resolved(cfg, run.config)
    metrics = MetricsLogger(run.events, run.metrics, acc.is_main_process, resume_step=step)
    eff = acc.num_processes * cfg.train.batch_size * s.accumulation
    batches = _batches(s, epoch, s.resume.get("position", 0))
    bar = _progress(acc, s.total_steps, step)
    position, smooth = s.resume.get("position", 0), None
    skipped, streak, last_ckpt, t0 = s.resume.get("skipped_nonfinite", 0), 0, None, time.perf_counter()
    while step < s.total_steps:
        loss, finite, grad_norm, (epoch, position) = _optimizer_step(s, batches)
        if not finite:
            skipped, streak = skipped + 1, streak + 1
            _nonfinite_guard(s, streak, skipped)
            continue
        step, streak = step + 1, 0
        rate = eff * (step - s.resume.get("step", 0)) / (time.perf_counter() - t0)
        scalars = {"loss": loss, "grad_norm": grad_norm, "img_per_s": rate, "effective_batch": eff,
                   "samples_seen": step * eff, "nonfinite_skipped": skipped}
        scalars |= {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(s.optimizer.param_groups)}
        if step % cfg.log.every_n_steps == 0:
            metrics.log(step, scalars)
        smooth = loss if smooth is None else 0.98 * smooth + 0.02 * loss  # the bar's loss: an EMA
        bar.update(1)
        bar.set_postfix(loss=f"{smooth:.4f}", img_s=f"{rate:.2f}", epoch=epoch)
        saved = _maybe_save(s, step, epoch, position, skipped, metrics, eff, epoch_ended=position == 0)
        last_ckpt = saved or last_ckpt
        if cfg.grid.every_n_steps and step % cfg.grid.every_n_steps == 0 and step < s.total_steps:
            _render_grid(s, step, metrics)
    bar.close()
    last_ckpt = _finish(s, step, epoch, position, skipped, metrics, eff) or last_ckpt
    return TrainResult(step, step * eff, last_ckpt, skipped)


def _progress(acc, total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", disable=not acc.is_main_process,
                dynamic_ncols=True)


def _optimizer_step(s: Setup, batches) -> tuple[float, bool, float, tuple[int, int]]:
    """`accumulation` micro-batches, one optimizer step (skipped if any loss was not finite).

    Returns the mean loss, whether it was finite, the gradient norm, and where the next step's data
    starts: (epoch, global batch position), position 0 meaning this step finished an epoch."""
    acc, total, bad = s.accelerator, 0.0, 0
    for micro in range(s.accumulation):
        epoch, position, batch = next(batches)
        last = micro == s.accumulation - 1
        with _no_sync(acc, s.trainable, enabled=not last), acc.autocast():
            loss = _micro_loss(s, batch, epoch, position)
        # A NaN/inf loss still goes through backward (every process must take part in DDP's
        # all-reduce); its gradients are thrown away below with the whole step.
        bad += int(not torch.isfinite(loss))
        acc.backward(loss / s.accumulation)
        total += loss.detach().float().item()
    flags = acc.reduce(torch.tensor([total, float(bad)], device=acc.device), reduction="sum")
    finite = flags[1].item() == 0
    grad_norm = _clip(s) if finite else float("nan")
    if finite:
        s.optimizer.step()
        s.lr_scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    mean_loss = flags[0].item() / (s.accumulation * acc.num_processes)
    return mean_loss, finite, grad_norm, _next_start(s, epoch, position)


def _next_start(s: Setup, epoch: int, position: int) -> tuple[int, int]:
    world = s.accelerator.num_processes
    consumed = position // world + 1  # batches this process has used in `epoch`
    if consumed >= len(s.sampler) // s.accumulation * s.accumulation:
        return epoch + 1, 0
    return epoch, consumed * world


@contextlib.contextmanager
def _no_sync(acc, modules, enabled: bool):
    with contextlib.ExitStack() as stack:
        if enabled:
            for m in modules:
                stack.enter_context(acc.no_sync(m))
        yield


def _zero_loss(s: Setup) -> torch.Tensor:
    return sum(p.sum() for p in s.params) * 0.0


def _clip(s: Setup) -> float:
    """Clip to train.max_grad_norm (0 = off) and return the total gradient norm (logged)."""
    if s.cfg.train.max_grad_norm > 0:
        return float(s.accelerator.clip_grad_norm_(s.params, s.cfg.train.max_grad_norm))
    grads = [p.grad for p in s.params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _micro_loss(s: Setup, batch: dict | None, epoch: int, position: int) -> torch.Tensor:
    from tunelab.models.text import encode_prompts, time_ids
    from tunelab.train.losses import compute_loss

    if batch is None:  # every image of the batch was unreadable (logged to the rejects file)
        return _zero_loss(s)
    dev, comps, cfg = s.accelerator.device, s.comps, s.cfg
    gen = torch.Generator(device="cpu").manual_seed(_batch_seed(cfg.run.seed, epoch, position))
    latents = _latents(s, batch).to(dev)  # (B, 4, H/8, W/8), scaled
    te_trains = cfg.train.parts.text_encoder != "off"
    with torch.set_grad_enabled(te_trains):
        te1 = s.wrapped.get("text_encoder_1", comps.text_encoder_1)
        te2 = s.wrapped.get("text_encoder_2", comps.text_encoder_2)
        cond = encode_prompts(s.tokenizers, (te1, te2), batch["prompt"], cfg.model.max_chunks, cfg.model.clip_skip)
    noisy, timesteps, target, snr = s.objective.sample(latents, gen)
    ids = time_ids(batch["original_size_hw"].tolist(), batch["crop_top_left"].tolist(),
                   batch["target_size_hw"].tolist()).to(dev)  # (B, 6)
    unet = s.wrapped.get("unet", comps.unet)
    pred = unet(noisy, timesteps, encoder_hidden_states=cond.context,
                added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": ids}).sample
    return compute_loss(pred.float(), target.float(), cfg.loss, cfg.objective.prediction, timesteps, snr).mean()


def _batch_seed(seed: int, epoch: int, position: int) -> int:
    # Splitmix-style mixing: nearby (epoch, position) pairs get unrelated streams.
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + position * 0x94D049BB133111EB) % 2**64
    x ^= x >> 31
    return x % 2**63


def _latents(s: Setup, batch: dict) -> torch.Tensor:
    vae = s.comps.vae
    scale = vae.config.scaling_factor
    if "latents" in batch:  # cached: unscaled distribution means
        return batch["latents"].float() * scale
    with torch.no_grad():
        pixels = batch["pixels"].to(s.accelerator.device, dtype=next(vae.parameters()).dtype)
        return vae.encode(pixels).latent_dist.mean.float() * scale


def _nonfinite_guard(s: Setup, streak: int, skipped: int) -> None:
    limit = s.cfg.train.max_nonfinite_steps
    log.warning("loss was not finite; step skipped (%d in a row, %d in total)", streak, skipped)
    if streak >= limit:
        last = s.run.latest_state()
        raise TunelabError(
            f"the loss was NaN/inf for {streak} optimizer steps in a row (train.max_nonfinite_steps = {limit}); "
            f"stopped without saving. The last good state is {last or 'none (no state saved yet)'}. "
            "Lower the learning rates (optim.lr_*), check the data, or enable clipping (train.max_grad_norm)"
        )


# --- saving ----------------------------------------------------------------------------------------------


def _render_grid(s: Setup, step: int, metrics) -> None:
    """[grid]: prompts across, seeds down, from the live weights (rank 0; the others wait)."""
    g, acc = s.cfg.grid, s.accelerator
    if not g.prompts:
        return
    if acc.is_main_process:
        from tunelab.sample.grid import Axis, GridSpec, render_grid_from_components
        from tunelab.sample.pipeline import SampleSettings

        base = SampleSettings(negative=g.negative, steps=g.steps, cfg=g.cfg, sampler=g.sampler,
                              clip_skip=s.cfg.model.clip_skip, pag_scale=g.pag_scale, seg_scale=g.seg_scale,
                              max_chunks=s.cfg.model.max_chunks, seed=g.seeds[0])
        spec = GridSpec(base=base, prompts=list(g.prompts), x=Axis("prompt", list(g.prompts)),
                        y=Axis("seed", list(g.seeds)) if len(g.seeds) > 1 else None)
        result = render_grid_from_components(s.comps, s.tokenizers, spec, s.run.samples, step)
        metrics.log_image("grid", result.grid, step)
        log.info("grid at step %d: %s", step, result.grid)
    acc.wait_for_everyone()


def _training_info(s: Setup, step: int, epoch: int, eff: int) -> dict[str, Any]:
    o = s.cfg.optim
    return {"steps": step, "epoch": epoch, "effective_batch": eff, "learning_rate": o.lr_unet,
            "text_encoder_lr1": o.lr_text_encoder_1, "text_encoder_lr2": o.lr_text_encoder_2,
            "optimizer": o.name, "run": s.cfg.run.name}


def _maybe_save(s: Setup, step: int, epoch: int, position: int, skipped: int, metrics, eff: int,
                epoch_ended: bool) -> Path | None:
    """Checkpoint + training state every N steps and/or every N epochs (`epoch` = where the next
    step starts, so after the last step of epoch 3 it is 4 and the file is `epoch-0004`)."""
    cfg = s.cfg.save
    by_step = cfg.every_n_steps > 0 and step % cfg.every_n_steps == 0
    by_epoch = epoch_ended and cfg.every_n_epochs > 0 and epoch % cfg.every_n_epochs == 0
    if not (by_step or by_epoch) or step == s.total_steps:
        return None  # the final step is saved by _finish
    path = _write_checkpoint(s, f"epoch-{epoch:04d}" if by_epoch else f"step-{step:08d}", step, epoch, eff)
    _write_state(s, step, epoch, position, skipped, eff)
    metrics.flush()
    return path


def _finish(s: Setup, step: int, epoch: int, position: int, skipped: int, metrics, eff: int) -> Path | None:
    path = _write_checkpoint(s, "last", step, epoch, eff)
    _write_state(s, step, epoch, position, skipped, eff)
    _render_grid(s, step, metrics)
    metrics.close()
    if s.accelerator.is_main_process:
        log.info("done: %d steps, %d samples; checkpoint %s", step, step * eff, path)
    return path


def _write_checkpoint(s: Setup, name: str, step: int, epoch: int, eff: int) -> Path | None:
    from tunelab.models.checkpoint import save_checkpoint

    acc = s.accelerator
    acc.wait_for_everyone()
    path = None
    if acc.is_main_process:
        path = save_checkpoint(s.comps, s.run.checkpoints / f"{name}.safetensors", dtype=s.cfg.save.dtype,
                               title=f"{s.cfg.run.name} {name}", training=_training_info(s, step, epoch, eff))
        prune_checkpoints(s.run, s.cfg.save.keep_last)
    acc.wait_for_everyone()
    return path


def _write_state(s: Setup, step: int, epoch: int, position: int, skipped: int, eff: int) -> None:
    info = {"step": step, "epoch": epoch, "position": position, "samples_seen": step * eff, "effective_batch": eff,
            "skipped_nonfinite": skipped, "fingerprint": s.cfg.fingerprint(),
            "world_size": s.accelerator.num_processes}
    save_state(s.accelerator, s.run, step, info)
