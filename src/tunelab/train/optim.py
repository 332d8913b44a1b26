"""Optimizers and learning-rate schedules, one named parameter group per trained part.

Reused: torch's AdamW, bitsandbytes' AdamW8bit (when installed and CUDA is present), transformers'
Adafactor, schedulefree's AdamWScheduleFree, torch-optimi's AdamW / Lion / StableAdamW / Adan
(`optimi_*`; Kahan summation is their bf16 remedy), torch's LambdaLR. Hand-written: Lion (Chen et
al. 2023, "Symbolic Discovery of Optimization Algorithms"), and the four schedule multipliers
(below), so they are plain picklable objects whose state resumes exactly.

Schedule-free AdamW (Defazio et al. 2024, "The Road Less Scheduled") keeps two points: the live
weights y where gradients are taken (train mode) and the average x that is the model (eval mode);
`optimizer.eval()` turns y into x in place, `optimizer.train()` back. `eval_weights` is the one
place the trainer does that: around checkpoint files, training states and the loop's callbacks
(a no-op for every other optimizer).

Parameter groups carry a `name`: `unet`, `text_encoder_1`, `text_encoder_2`, or `unet/IN04`-style
names when block LRs are on (`unet/BASE`, `unet/IN00`.., `unet/MID00`.., `unet/OUT00`.., `unet/OUT`;
lr = lr_unet x the block's multiplier). Only trainable parameters are handed over (the plan from
`tunelab.train.parts.select_trainable` holds nothing else). The trainer logs `lr/<name>` per group
(`group_lrs`).

Schedules (multiplier of each group's base lr at optimizer step s, W = warmup_steps, N = total
steps), the definitions transformers / diffusers use, so runs compare with the field's:

    constant              1
    constant_with_warmup  s / W for s < W, then 1
    cosine                s / W for s < W, then 0.5 (1 + cos(pi p)), p = (s - W) / (N - W)
    linear                s / W for s < W, then (N - s) / (N - W), floored at 0
    cosine_with_restarts  s / W for s < W, then 0.5 (1 + cos(pi ((c p) mod 1))), 0 from p = 1 (c = num_cycles;
                          transformers' get_cosine_with_hard_restarts_schedule_with_warmup)
    polynomial            s / W for s < W, then (1 - p)^power (transformers' polynomial decay, lr_end = min)
    warmup_stable_decay   s / W for s < W, 1 until the last D steps, then 0.5 (1 + cos(pi q)) over them
                          (D = decay_steps or N / 10; transformers' get_wsd_schedule, cosine decay)

A decaying schedule with `min_lr_ratio` m > 0 ends at m instead of 0: m + (1 - m) x the above
(transformers' cosine_with_min_lr for cosine).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from tunelab.config import OptimSection
from tunelab.errors import TunelabError
from tunelab.train.lowprec import LowPrecisionLion
from tunelab.train.parts import TrainablePlan

log = logging.getLogger(__name__)


def param_groups(plan: TrainablePlan, optim: OptimSection) -> list[dict]:
    """Named torch parameter groups with their base learning rates (empty parts left out)."""
    groups = []
    if plan.unet_blocks:
        for block, params in plan.unet_blocks.items():
            groups.append({"name": f"unet/{block}", "params": params, "lr": optim.lr_unet * plan.block_multipliers[block]})
    elif plan.param_groups["unet"]:
        groups.append({"name": "unet", "params": plan.param_groups["unet"], "lr": optim.lr_unet})
    for te in ("text_encoder_1", "text_encoder_2"):
        if plan.param_groups[te]:
            groups.append({"name": te, "params": plan.param_groups[te], "lr": getattr(optim, f"lr_{te}")})
    for g in groups:
        if g["lr"] == 0:
            log.warning("parameter group %s has learning rate 0: it will not move (weight decay scales with lr)", g["name"])
    if not groups:
        raise TunelabError("nothing trains: every parameter is frozen; check train.parts (text_encoder, unet, "
                           "unet_exclude, block_lrs) and the optim.lr_* settings")
    return groups


def build_optimizer(plan: TrainablePlan, optim: OptimSection, bf16_update: str = "nearest",
                    seed: int = 0) -> torch.optim.Optimizer:
    """The optimizer named by `optim.name` over the plan's trainable parameters; `bf16_update`
    'stochastic' / 'kahan' (bf16 weights: `train.full_bf16`) picks its low-precision twin
    (`train/lowprec.py`), with fp32 math and states; for the optimi_* ones 'kahan' is optimi's
    own kahan_sum (`_optimi`)."""
    groups = param_groups(plan, optim)
    lr = groups[0]["lr"]  # every group sets its own lr; this is only the constructor default
    if optim.name in OPTIMI:
        return _optimi(groups, optim, bf16_update)
    if bf16_update != "nearest":
        from tunelab.train.lowprec import LowPrecisionAdamW

        if optim.name == "adamw":
            return LowPrecisionAdamW(groups, lr=lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
                                     update=bf16_update, seed=seed)
        if optim.name == "lion":
            return LowPrecisionLion(groups, lr=lr, betas=optim.betas, weight_decay=optim.weight_decay,
                                    update=bf16_update, seed=seed)
        raise TunelabError(f"train.bf16_update = {bf16_update!r} is built for optim.name = 'adamw' or 'lion' ('kahan' "
                           f"also for the optimi_* ones), not {optim.name!r}; use one of those, or train.bf16_update = "
                           "'nearest' (updates below half a bf16 step are then lost)")
    extra = dict(optim.args)
    if optim.name == "adamw":
        # foreach: one multi-tensor kernel per group instead of a Python loop over ~2,500 tensors
        # (torch picks it by itself only on CUDA).
        return _construct(torch.optim.AdamW, groups, dict(lr=lr, betas=optim.betas, eps=optim.eps,
                                                          weight_decay=optim.weight_decay, foreach=True), extra, optim)
    if optim.name == "adamw8bit":
        return _adamw8bit(groups, optim)
    if optim.name == "adafactor":
        from transformers.optimization import Adafactor

        # relative_step=False and scale_parameter=False by default: the given lr is the step size, as
        # with the other optimizers; optim.args = {relative_step = true} gives Adafactor's own (lr and
        # the schedule are then ignored, as in kohya with lr=None).
        kw = dict(lr=lr, relative_step=False, scale_parameter=False, warmup_init=False, weight_decay=optim.weight_decay)
        if extra.get("relative_step"):
            kw["lr"] = None
            log.warning("Adafactor with relative_step: its own step size replaces optim.lr_* and the schedule")
        return _construct(Adafactor, groups, kw, extra, optim)
    if optim.name == "lion":
        return _construct(Lion, groups, dict(lr=lr, betas=optim.betas, weight_decay=optim.weight_decay), extra, optim)
    if optim.name == "prodigy":
        cls = _imported("prodigyopt", "Prodigy", "prodigyopt")
        return _construct(cls, groups, dict(lr=lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay),
                          extra, optim)
    if optim.name == "came":
        cls = _imported("came_pytorch", "CAME", "came-pytorch")
        return _construct(cls, groups, dict(lr=lr, weight_decay=optim.weight_decay), extra, optim)
    if optim.name == "adamw_schedulefree":
        cls = _imported("schedulefree", "AdamWScheduleFree", "schedulefree")
        # Its own warm-up (optim.warmup_steps) replaces the schedule, which config check keeps constant.
        return _construct(cls, groups, dict(lr=lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
                                            warmup_steps=optim.warmup_steps), extra, optim)
    if optim.name == "class":
        if "." not in optim.class_path:
            raise TunelabError("optim.name = 'class' needs optim.class_path = 'package.module.Class' (e.g. torch.optim.RAdam)")
        module, _, name = optim.class_path.rpartition(".")
        return _construct(_imported(module, name, module.split(".")[0]), groups, dict(lr=lr), extra, optim)
    raise TunelabError(f"optim.name = {optim.name!r} is unknown; choose adamw, adamw8bit, adafactor, lion, prodigy, came, "
                       f"adamw_schedulefree, {', '.join(OPTIMI)} or class")


# optim.name -> torch-optimi's class. Their states are kept in the weights' dtype (bf16 under
# train.full_bf16); Kahan summation (kahan_sum) is the package's own low-precision remedy.
OPTIMI = {"optimi_adamw": "AdamW", "optimi_lion": "Lion", "optimi_stableadamw": "StableAdamW", "optimi_adan": "Adan"}


def _optimi(groups: list[dict], optim: OptimSection, bf16_update: str) -> torch.optim.Optimizer:
    """torch-optimi's optimizer; on bf16 weights kahan_sum follows train.bf16_update ('kahan' on,
    'nearest' off; it has no stochastic rounding). On fp32 weights optimi's own default stands
    (it compensates only low-precision weights anyway)."""
    name = OPTIMI[optim.name]
    cls = _imported("optimi", name, "torch-optimi")
    if optim.name == "optimi_adan" and len(optim.betas) != 3:
        raise TunelabError("optim.name = 'optimi_adan' takes three betas (gradient, gradient-difference and squared-"
                           "gradient averages); set optim.betas = [0.98, 0.92, 0.99] (Adan's own)")
    kw = dict(lr=groups[0]["lr"], betas=optim.betas, weight_decay=optim.weight_decay)
    if optim.name != "optimi_lion":  # Lion has no epsilon
        kw["eps"] = optim.eps
    if any(p.dtype in (torch.bfloat16, torch.float16) for g in groups for p in g["params"]):
        if bf16_update in ("exact", "stochastic"):
            raise TunelabError(f"optim.name = {optim.name!r} has no {bf16_update} write-back for bf16 weights; set "
                               "train.bf16_update = 'kahan' (its Kahan summation, +2 bytes per weight) or 'nearest', or "
                               "use optim.name = 'adamw' / 'lion' for stochastic rounding")
        kw["kahan_sum"] = bf16_update == "kahan"
    return _construct(cls, groups, kw, dict(optim.args), optim)


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer keeps schedule-free train / eval weights (schedulefree's optimizers
    mark every parameter group with `train_mode`; accelerate's wrapper passes its groups through)."""
    groups = optimizer.param_groups
    return bool(groups) and "train_mode" in groups[0] and callable(getattr(optimizer, "eval", None))


@contextlib.contextmanager
def eval_weights(optimizer: torch.optim.Optimizer | None, enabled: bool = True) -> Iterator[None]:
    """Inside: the live weights are the ones a checkpoint holds. For a schedule-free optimizer,
    `eval()` (weights y -> x) on entry and `train()` (x -> y) on exit, so training steps always see
    y. The trainer saves checkpoints and training states and fires its callbacks inside, so the
    files, grids, probes and EMA all see x, and every state is saved in eval mode (a resumed run's
    first `train()` repeats the uninterrupted run's: exact resume). No-op for other optimizers."""
    if not enabled or optimizer is None or not is_schedule_free(optimizer):
        yield
        return
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()


def _imported(module: str, name: str, package: str):
    """A class from an optional package, or an error that says what to install."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise TunelabError(f"the optimizer {module}.{name} needs the {package} package: pip install {package}") from None
    cls = getattr(mod, name, None)
    if cls is None:
        raise TunelabError(f"{module} has no {name}; check optim.class_path")
    return cls


def _construct(cls, groups: list[dict], kw: dict, extra: dict, optim: OptimSection) -> torch.optim.Optimizer:
    """cls(groups, **kw, **optim.args); an argument the class does not take is named with the fix."""
    try:
        return cls(groups, **(kw | extra))
    except TypeError as err:
        raise TunelabError(f"optim.args {extra} do not fit {cls.__module__}.{cls.__name__} ({err}); remove or rename "
                           "them in optim.args") from None


def _adamw8bit(groups: list[dict], optim: OptimSection) -> torch.optim.Optimizer:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TunelabError("optim.name = 'adamw8bit' needs the bitsandbytes package (pip install bitsandbytes) and a "
                           "CUDA GPU; install it, or set optim.name = 'adamw' (or 'adafactor' for less optimizer memory)")
    if not torch.cuda.is_available():
        raise TunelabError("optim.name = 'adamw8bit' needs a CUDA GPU (bitsandbytes' 8-bit states live on it) and none "
                           "is available; set optim.name = 'adamw' (or 'adafactor' for less optimizer memory)")
    import bitsandbytes as bnb

    return _construct(bnb.optim.AdamW8bit, groups, dict(lr=groups[0]["lr"], betas=optim.betas, eps=optim.eps,
                                                        weight_decay=optim.weight_decay), dict(optim.args), optim)


class Lion(LowPrecisionLion):
    """Lion (Chen et al. 2023, Algorithm 2), with decoupled weight decay:

        u = sign(beta1 m + (1 - beta1) g)
        p = p (1 - lr wd) - lr u
        m = beta2 m + (1 - beta2) g

    One state tensor per parameter (`exp_avg` = m), so it needs half of AdamW's optimizer memory.
    Lion wants a 3-10x smaller lr and 3-10x larger weight decay than AdamW. The math is
    `train/lowprec.py`'s, in fp32, written back to the weights' dtype by plain rounding.
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        if lr < 0 or not all(0 <= b < 1 for b in betas) or weight_decay < 0:
            raise ValueError(f"Lion needs lr >= 0, 0 <= betas < 1, weight_decay >= 0; got {lr}, {betas}, {weight_decay}")
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay, update="nearest")


_DECAYING = ("cosine", "linear", "cosine_with_restarts", "polynomial", "warmup_stable_decay")


@dataclass
class ScheduleMultiplier:
    """LR multiplier at optimizer step s (module docstring); a plain object so LambdaLR saves its state."""

    kind: str
    warmup_steps: int = 0
    total_steps: int = 0
    min_ratio: float = 0.0
    num_cycles: int = 1
    power: float = 1.0
    decay_steps: int = 0

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return 1.0
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if self.kind == "constant_with_warmup":
            return 1.0
        if self.kind not in _DECAYING:
            raise TunelabError(f"optim.schedule = {self.kind!r} is unknown; choose constant, constant_with_warmup, "
                               + ", ".join(_DECAYING))
        m = self.min_ratio
        return m + (1.0 - m) * self._decay(step)

    def _decay(self, step: int) -> float:
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if self.kind == "linear":
            return max(0.0, 1.0 - progress)
        if self.kind == "cosine_with_restarts":
            return 0.0 if progress >= 1.0 else 0.5 * (1.0 + math.cos(math.pi * ((self.num_cycles * progress) % 1.0)))
        if self.kind == "polynomial":
            return max(0.0, 1.0 - progress) ** self.power
        decay = self.decay_steps or max(1, self.total_steps // 10)  # warmup_stable_decay
        start = self.total_steps - decay
        if step < start:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - start) / decay)))


def schedule_multiplier(optim: OptimSection, total_steps: int) -> ScheduleMultiplier:
    return ScheduleMultiplier(optim.schedule, optim.warmup_steps, total_steps, optim.min_lr_ratio, optim.num_cycles,
                              optim.power, optim.decay_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimSection, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over every group; call `.step()` once per optimizer step."""
    if optim.schedule in _DECAYING and total_steps <= optim.warmup_steps:
        raise TunelabError(f"optim.schedule = {optim.schedule!r} decays after optim.warmup_steps = {optim.warmup_steps}, "
                           f"but the run has only {total_steps} optimizer steps; lower warmup_steps or train longer")
    fn = schedule_multiplier(optim, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [fn] * len(optimizer.param_groups))


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """{group name: current lr} for logging as `lr/<name>`."""
    return {g.get("name", f"group{i}"): g["lr"] for i, g in enumerate(optimizer.param_groups)}
