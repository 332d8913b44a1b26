"""EMA of the trained weights (`[ema] enabled = true`): a loop callback, saved as its own SGM file
beside each checkpoint (`checkpoints/ema/<name>.safetensors`), resumed exactly.

The update is diffusers' `EMAModel.step` (training_utils.py), so an EMA run compares with the
field's: after n updates (counted from `update_after_step`),

    decay_n = min(decay, (1 + n) / (10 + n)), n >= 1   (0 at the first update: it copies the weights)
    ema    <- ema - (1 - decay_n) (ema - w)

every `every_n_steps` optimizer steps, over every trained parameter (frozen ones are the base's and
equal in both). The EMA lives on the CPU (`device = "cpu"`, the default: no GPU memory) or beside the
weights (`"same"`), in fp32.

Exact resume: the EMA is registered with accelerate's checkpointing, so every training state holds
it. A state is written right after its checkpoint and before the step's STEP event, so the update
that belongs to that step is made at CHECKPOINT already (and STEP then skips it): the saved EMA
is the one after the step the state records, and a resumed run continues it bit for bit.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from tunelab.train.callbacks import Callback, LoopContext

if TYPE_CHECKING:
    from tunelab.config import EmaSection
    from tunelab.models.arch import Components

log = logging.getLogger(__name__)

EMA_FOLDER = "ema"
_COMPONENTS = ("unet", "text_encoder_1", "text_encoder_2")


def ema_decay(decay: float, updates: int) -> float:
    """diffusers EMAModel.get_decay without warm-up options, n = the updates made before this one:
    0 for the first, then min(decay, (1 + n) / (10 + n))."""
    if updates <= 0:
        return 0.0
    return min(decay, (1 + updates) / (10 + updates))


def trained_parameters(comps: "Components") -> list[tuple[str, torch.nn.Parameter]]:
    """(component.name, parameter) of every trained parameter, in a fixed order."""
    out = []
    for comp in _COMPONENTS:
        for name, p in getattr(comps, comp).named_parameters():
            if p.requires_grad:
                out.append((f"{comp}.{name}", p))
    return out


class EmaCallback(Callback):
    all_ranks = True  # every process keeps the same EMA (its state is saved and loaded by all)

    def __init__(self, cfg: "EmaSection") -> None:
        self.cfg = cfg
        self.every_n_steps = 1  # checked against cfg.every_n_steps in `_due`
        self.names: list[str] = []
        self.shadow: list[torch.Tensor] | None = None
        self.last_step = -1  # the optimizer step of the last update (-1: none yet)
        self.updates = 0

    # accelerate's checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "updates": self.updates, "names": list(self.names),
                "shadow": [t.clone() for t in (self.shadow or [])]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step, self.updates = int(state["last_step"]), int(state["updates"])
        self.names = list(state["names"])
        self.shadow = [t.clone() for t in state["shadow"]]

    def _device(self, p: torch.Tensor) -> torch.device:
        return torch.device("cpu") if self.cfg.device == "cpu" else p.device

    def on_start(self, ctx: LoopContext) -> None:
        params = trained_parameters(ctx.comps)
        names = [n for n, _ in params]
        if self.shadow is None:
            self.names = names
            from tunelab.train.lowprec import whole_weight

            optimizer = getattr(ctx, "optimizer", None)
            self.shadow = [whole_weight(optimizer, p).to(self._device(p), torch.float32, copy=True) for _, p in params]
            return
        if self.names != names:
            log.warning("the saved EMA covers other parameters than this run trains; starting a new EMA")
            self.shadow, self.last_step, self.updates = None, -1, 0
            self.on_start(ctx)
            return
        self.shadow = [s.to(self._device(p)) for s, (_, p) in zip(self.shadow, params)]

    def _due(self, step: int) -> bool:
        return step > self.cfg.update_after_step and step % self.cfg.every_n_steps == 0 and step > self.last_step

    @torch.no_grad()
    def _update(self, ctx: LoopContext) -> None:
        step = ctx.progress.step
        if not self._due(step) or self.shadow is None:
            return
        one_minus = 1.0 - ema_decay(self.cfg.decay, self.updates)  # the first update copies the weights
        self.updates += 1
        from tunelab.train.lowprec import whole_weight

        optimizer = getattr(ctx, "optimizer", None)  # bf16_update = "exact": average the whole fp32 weights
        for s, (_, p) in zip(self.shadow, trained_parameters(ctx.comps)):
            s.sub_((s - whole_weight(optimizer, p).to(s.device, torch.float32)) * one_minus)
        self.last_step = step

    def on_step(self, ctx: LoopContext) -> None:
        self._update(ctx)

    def on_checkpoint(self, ctx: LoopContext) -> None:
        self._update(ctx)  # the update of this step, before the state is written
        if ctx.checkpoint is not None and ctx.accelerator.is_main_process and self.cfg.save:
            path = ema_checkpoint(ctx.checkpoint)
            self.write(ctx, path)
            log.info("EMA (decay %g, %d updates): %s", self.cfg.decay, self.updates, path)

    def on_end(self, ctx: LoopContext) -> None:
        self._update(ctx)

    @contextmanager
    def swapped_in(self, comps: "Components") -> Iterator[None]:
        """The EMA's weights in the live modules for the block (a grid, a probe, a save); the live
        weights are put back bit for bit after it, whatever happens inside."""
        params = [p for _, p in trained_parameters(comps)]
        if self.shadow is None or len(params) != len(self.shadow):
            raise RuntimeError("the EMA has not started yet (it starts with the loop's START event)")
        with torch.no_grad():
            kept = [p.detach().clone() for p in params]
            try:
                for p, s in zip(params, self.shadow):
                    p.copy_(s.to(p.device, p.dtype))
                yield
            finally:
                for p, k in zip(params, kept):
                    p.copy_(k)

    def write(self, ctx: LoopContext, path: Path) -> Path:
        """The EMA weights as an SGM file: swapped into the live modules, saved, swapped back."""
        from tunelab.models.checkpoint import Lineage, save_checkpoint

        with self.swapped_in(ctx.comps):
            path.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(ctx.comps, path, dtype=ctx.cfg.save.dtype, title=f"{ctx.cfg.run.name} {path.stem} EMA",
                            training={"steps": ctx.progress.step, "ema_decay": self.cfg.decay, "ema_updates": self.updates},
                            lineage=Lineage.of(ctx.comps, ctx.cfg.run.name, ctx.progress.step, ctx.cfg.model.base))
        return path


def ema_checkpoint(checkpoint: Path) -> Path:
    """checkpoints/step-00000100.safetensors -> checkpoints/ema/step-00000100.safetensors."""
    return checkpoint.parent / EMA_FOLDER / checkpoint.name
