"""The fused backward pass (`train.fused_backward`): each trainable parameter's optimizer step runs
inside backward, the moment its gradient is complete, and that gradient is freed at once, so a
step never holds every gradient (kohya sd-scripts' `--fused_backward_pass`, OneTrainer's fused back
pass). It saves the gradients' memory: 4 B per trained parameter (2 with `full_bf16`).

How: `torch.Tensor.register_post_accumulate_grad_hook` on every trainable parameter. Autograd
calls the hook once the parameter's gradient is summed into `.grad`, after every node that used
the parameter has run, so the weight can change in place without touching what backward still
needs. The hook records the gradient's norm (the logged `grad_norm`), clips it on its own when
`train.max_grad_norm_scope = "per_parameter"` (kohya's fused pass does this), steps the one
parameter and sets `.grad = None`. The hooks act only inside `FusedBackward.stepping()`: the
trainer enters it around the backward of a step whose loss is finite (the loss is known before
backward; a non-finite one never reaches it, so no parameter moves, as the unfused guard skips
the whole step). The LR schedule still steps once per optimizer step, after backward.

Which optimizers: those whose step is a loop over parameters that share nothing, so stepping them
one at a time is the same arithmetic as the whole step (the tests check it bit for bit):
- tunelab's low-precision AdamW / Lion and tunelab's Lion (`train/lowprec.py`): their `step_one`,
  with the parameter's index in the whole optimizer (it seeds stochastic rounding);
- torch's AdamW (foreach), transformers' Adafactor, came-pytorch's CAME and the torch.optim classes
  in `CLASS_PATHS`: the optimizer's own `step()` with `param_groups` narrowed, for that call, to
  the parameter's group holding only that parameter (the group's hyperparameters and the LR the
  schedule set are the group's own).
The rest are refused by `problems` (config check) and `check_launch` (at launch), naming the fix.

Hand-written: no installed library steps an arbitrary optimizer from gradient hooks (torch-optimi's
gradient release covers its own optimizers only; torch's tutorial builds one optimizer per
parameter, which would change their state dicts and resume).
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from tunelab.config import RunConfig

log = logging.getLogger(__name__)

FUSABLE_NAMES = ("adamw", "lion", "adafactor", "came")
# torch.optim classes whose step is a loop over parameters with per-parameter state only
CLASS_PATHS = ("torch.optim.AdamW", "torch.optim.Adam", "torch.optim.SGD", "torch.optim.RAdam", "torch.optim.NAdam",
               "torch.optim.Adamax", "torch.optim.Adagrad", "torch.optim.RMSprop")
_WHY_NOT = {
    "prodigy": "Prodigy estimates its step size d from every parameter's gradient together at each step",
    "adamw8bit": "bitsandbytes' 8-bit AdamW is not verified one parameter at a time (it needs CUDA, which the tests lack)",
}
_FIX = "or set train.fused_backward = false"


def problems(c: "RunConfig") -> list[str]:
    """What a run file with `train.fused_backward = true` asks that the fused pass cannot honour,
    each naming the setting to change (run by config.py's cross-field checks)."""
    t, o = c.train, c.optim
    if not t.fused_backward:
        return []
    found = []
    if not (o.name in FUSABLE_NAMES or (o.name == "class" and o.class_path in CLASS_PATHS)):
        found.append(_optimizer_problem(o.name, o.class_path))
    if t.max_grad_norm > 0 and t.max_grad_norm_scope == "global":
        found.append(f"train.max_grad_norm = {t.max_grad_norm:g} clips by the norm of all gradients together, which the "
                     "fused backward pass never holds at once; set train.max_grad_norm_scope = 'per_parameter' (each "
                     "parameter's gradient clipped on its own, as kohya's fused pass does), or train.max_grad_norm = 0, "
                     + _FIX)
    if t.mixed_precision == "fp16":
        found.append("train.mixed_precision = 'fp16' scales the loss and checks all gradients together for inf before a "
                     f"step; with train.fused_backward use mixed_precision = 'bf16' or 'no', {_FIX}")
    if t.expect_world_size and t.expect_world_size > 1:
        found.append(_world_problem(t.expect_world_size))
    accumulation = _accumulation(c)
    if accumulation and accumulation > 1:
        found.append(_accumulation_problem(accumulation))
    return found


def check_launch(c: "RunConfig", world: int, accumulation: int, distributed: str = "NO") -> None:
    """At launch (and `config check --world-size`): one plain process, one micro-batch per step."""
    if not c.train.fused_backward:
        return
    if world > 1:
        raise TunelabError(_world_problem(world))
    if distributed not in ("NO", "DistributedType.NO"):
        raise TunelabError(f"train.fused_backward needs a plain single-process launch; accelerate was launched with "
                           f"{distributed}, which steps the optimizer itself; launch without it, {_FIX}")
    if accumulation > 1:
        raise TunelabError(_accumulation_problem(accumulation))


def _accumulation(c: "RunConfig") -> int | None:
    t = c.train
    if t.target_effective_batch is None:
        return t.grad_accumulation
    per = (t.expect_world_size or 1) * t.batch_size  # more than one process is refused anyway
    return t.target_effective_batch // per if t.target_effective_batch % per == 0 else None


def _optimizer_problem(name: str, class_path: str) -> str:
    what = f"optim.class_path = {class_path!r}" if name == "class" else f"optim.name = {name!r}"
    why = _WHY_NOT.get(name) or ("schedule-free optimizers update averages shared by a whole group once per step"
                                 if "schedule" in (name + class_path).lower() else
                                 "it is not known to step each parameter on its own")
    return (f"train.fused_backward steps each parameter alone inside backward, which {what} cannot do: {why}; "
            f"use optim.name = {', '.join(FUSABLE_NAMES)} (or class with one of {', '.join(CLASS_PATHS)}), {_FIX}")


def _world_problem(world: int) -> str:
    return (f"train.fused_backward runs on one process, not {world}: DDP's average of the gradients across processes "
            "arrives in buckets after each parameter's hook has fired, so every process would step on its own "
            f"unaveraged gradient; launch one process (raise train.batch_size instead), {_FIX}")


def _accumulation_problem(accumulation: int) -> str:
    return (f"train.fused_backward steps inside every backward, so it needs one micro-batch per optimizer step, not "
            f"{accumulation} (accumulated gradients would be held between micro-batches, which is what the fused pass "
            f"avoids); set train.grad_accumulation = 1 / target_effective_batch = batch_size (raise batch_size instead), "
            f"{_FIX}")


# --- one parameter's step -------------------------------------------------------------------------------------


def parameter_steps(optimizer: torch.optim.Optimizer) -> Callable[[torch.nn.Parameter], None]:
    """A function that steps one parameter of `optimizer` exactly as `optimizer.step()` would."""
    where = {}  # parameter -> (its group, its index in the whole optimizer)
    for group in optimizer.param_groups:
        for p in group["params"]:
            where[p] = (group, len(where))
    if hasattr(optimizer, "step_one"):  # tunelab's own (train/lowprec.py): one parameter's step, by its index
        def indexed(p: torch.nn.Parameter) -> None:
            group, index = where[p]
            optimizer.step_one(group, p, index)

        return indexed
    if not _narrowable(optimizer):
        raise TunelabError(f"train.fused_backward cannot step {type(optimizer).__module__}.{type(optimizer).__name__} "
                           f"one parameter at a time; {_FIX}")

    def narrowed(p: torch.nn.Parameter) -> None:
        group = where[p][0]
        groups, params = optimizer.param_groups, group["params"]
        optimizer.param_groups, group["params"] = [group], [p]
        try:
            optimizer.step()
        finally:
            optimizer.param_groups, group["params"] = groups, params

    return narrowed


def _narrowable(optimizer: torch.optim.Optimizer) -> bool:
    cls = type(optimizer)
    path = f"{cls.__module__}.{cls.__name__}"
    torch_path = f"torch.optim.{cls.__name__}" if cls.__module__.startswith("torch.optim") else path
    return torch_path in CLASS_PATHS or path in ("transformers.optimization.Adafactor", "came_pytorch.CAME.CAME")


class FusedBackward:
    """The gradient hooks of one run: `stepping()` arms them for one backward; `grad_norm()` is
    the norm of every gradient that backward produced (before any clipping), as unfused logs it."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                 max_norm_per_parameter: float = 0.0) -> None:
        self._inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        self._step = parameter_steps(self._inner)  # refuses an optimizer it cannot step one parameter at a time
        self.max_norm = max_norm_per_parameter
        self.armed = False
        self._norms: list[torch.Tensor] = []
        self._seen: set[int] = set()
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]
        log.info("fused backward pass: %d parameter tensors step inside backward (%s)", len(params),
                 type(self._inner).__name__)

    @contextlib.contextmanager
    def stepping(self) -> Iterator[None]:
        """Arm the hooks for one backward. The groups are looked up afresh: loading a state
        (resume) replaces the optimizer's group dicts, and the schedule sets the LR on the new ones."""
        self._step = parameter_steps(self._inner)
        self.armed, self._norms, self._seen = True, [], set()
        try:
            yield
        finally:
            self.armed = False
            if self._seen:  # what torch's step wrapper records, so the LR schedule knows the optimizer stepped
                self._inner._opt_called = True

    def grad_norm(self) -> float:
        return total_norm(self._norms)

    @property
    def stepped(self) -> int:
        """How many parameters the last armed backward stepped."""
        return len(self._seen)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, p: torch.nn.Parameter) -> None:
        if not self.armed:  # a backward outside a training step: the gradient stays, as without hooks
            return
        if id(p) in self._seen:
            raise TunelabError(
                f"train.fused_backward: a parameter of shape {tuple(p.shape)} received its gradient in two parts in one "
                "backward (it is used in two places under reentrant gradient checkpointing) and would be stepped twice; "
                f"set train.gradient_checkpointing = false, {_FIX}")
        self._seen.add(id(p))
        self._norms.append(clip_one(p, self.max_norm))
        self._step(p)
        p.grad = None  # freed now: the point of the fused pass


def clip_one(p: torch.nn.Parameter, max_norm: float) -> torch.Tensor:
    """The norm of one parameter's gradient, which is then clipped to `max_norm` on its own (0 = not
    clipped): `train.max_grad_norm_scope = "per_parameter"`, kohya's clipping in its fused pass
    (`accelerator.clip_grad_norm_(tensor, max_grad_norm)` per parameter in sdxl_train.py)."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(p, max_norm)
    return torch.linalg.vector_norm(p.grad.detach())


def total_norm(norms: list[torch.Tensor]) -> float:
    """The norm of all gradients from each one's norm: torch's get_total_norm, which also takes the
    norm of the per-tensor norms."""
    if not norms:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms])))
