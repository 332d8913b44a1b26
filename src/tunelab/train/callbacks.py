"""The training loop's events and the callbacks that run on them (composer's pattern, kept small).

Four events, in the order a run meets them:

    START        after setup and any resume, before the first step of this process's loop
    STEP         after every optimizer step (a skipped non-finite step is not a step)
    CHECKPOINT   after a checkpoint file is complete on disk (`ctx.checkpoint` is its path)
    END          after the last step, its checkpoint and state

A callback is a small object with a method per event it cares about (`on_start`, `on_step`,
`on_checkpoint`, `on_end`; the others are no-ops). It declares

    every_n_steps   STEP fires it when step % n == 0 (0 = never on STEP)
    all_ranks       True when every process must take part (the EMA: every process keeps it);
                    False runs it on the main process while the others wait at a barrier
    forward         True when it runs the trained modules: under a sharded engine (FSDP,
                    ZeRO-3) every process then runs it too, as a forward gathers weights from
                    all of them; only the main process writes files and logs

and does its work through a *functional twin*, a plain function usable outside the loop (the
grid callback calls `sample.grid.render_training_grid`, which `tunelab grid` users can call on
any checkpoint). The in-training grid, the probes (`probe/callback.py`) and the report (`report/callback.py`) are callbacks.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunelab.config import RunConfig
    from tunelab.models.arch import Components
    from tunelab.run import RunDir
    from tunelab.train.metrics import MetricsLogger

log = logging.getLogger(__name__)


class Event(str, enum.Enum):
    START = "start"
    STEP = "step"
    CHECKPOINT = "checkpoint"
    END = "end"


@dataclass
class Progress:
    """Where training stands: what a state records and every callback sees."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch the next step starts in
    position: int = 0  # global batch position in that epoch where the next step starts
    skipped_nonfinite: int = 0  # steps skipped because the loss was NaN/inf
    effective_batch: int = 0  # images per optimizer step, all processes together

    @property
    def samples_seen(self) -> int:
        return self.step * self.effective_batch


@dataclass
class LoopContext:
    """What a callback may read (and the live modules it may use, without changing them)."""

    cfg: "RunConfig"
    run: "RunDir"
    comps: "Components"  # the live weights (unwrapped)
    tokenizers: tuple[Any, Any]
    accelerator: Any
    metrics: "MetricsLogger"
    progress: Progress
    total_steps: int
    checkpoint: Path | None = None  # set for CHECKPOINT: the file just written
    optimizer: Any = None  # the run's optimizer (read only: `train.lowprec.whole_weight` asks it for fp32 weights)
    sharded: bool = False  # the trained modules are split across processes (FSDP, ZeRO-3)
    autocast: Any = None  # () -> the forward's autocast context (the trainer's; default: accelerate's)

    def __post_init__(self) -> None:
        if self.autocast is None:
            self.autocast = self.accelerator.autocast

    @property
    def writes(self) -> bool:
        """Whether this process writes a callback's files (the main one)."""
        return self.accelerator.is_main_process


class Callback:
    """Base class: override the events you need and set the cadence."""

    every_n_steps: int = 0
    all_ranks: bool = False
    forward: bool = False

    def on_start(self, ctx: LoopContext) -> None: ...

    def on_step(self, ctx: LoopContext) -> None: ...

    def on_checkpoint(self, ctx: LoopContext) -> None: ...

    def on_end(self, ctx: LoopContext) -> None: ...

    def due(self, event: Event, ctx: LoopContext) -> bool:
        if event is not Event.STEP:
            return True
        n = self.every_n_steps
        return n > 0 and ctx.progress.step % n == 0 and ctx.progress.step < ctx.total_steps


@dataclass
class Callbacks:
    """The loop's callbacks, fired in order; rank and cadence rules live here, not in the loop."""

    items: list[Callback] = field(default_factory=list)

    def due(self, event: Event, ctx: LoopContext) -> bool:
        """Whether `fire` would run any callback (the same on every process: cadence only)."""
        return any(cb.due(event, ctx) for cb in self.items)

    def fire(self, event: Event, ctx: LoopContext) -> None:
        acc = ctx.accelerator
        for cb in self.items:
            if not cb.due(event, ctx):
                continue
            everyone = cb.all_ranks or (getattr(cb, "forward", False) and ctx.sharded)
            if everyone or acc.is_main_process:
                getattr(cb, f"on_{event.value}")(ctx)
            if not everyone:
                acc.wait_for_everyone()  # the others wait while rank 0 works


class GridCallback(Callback):
    """[grid]: prompts across, seeds down, every N steps and at the end, from the live weights,
    the EMA's (`grid.weights = "ema"`: into samples/ema/, logged as `grid_ema`) or both."""

    forward = True

    def __init__(self, every_n_steps: int, weights: str = "live", ema: Any = None) -> None:
        self.every_n_steps = every_n_steps
        self.which = {"live": ("live",), "ema": ("ema",), "both": ("live", "ema")}[weights]
        if "ema" in self.which and ema is None:
            raise ValueError("grid.weights = 'ema' / 'both' needs the run's EMA callback")
        self.ema = ema

    def on_step(self, ctx: LoopContext) -> None:
        self._render(ctx)

    def on_end(self, ctx: LoopContext) -> None:
        self._render(ctx)

    def _render(self, ctx: LoopContext) -> None:
        import tempfile

        from tunelab.sample.grid import render_training_grid

        step = ctx.progress.step
        for which in self.which:
            with tempfile.TemporaryDirectory(prefix="tunelab-grid-") as scratch:
                # a sharded run renders on every process; the others draw into a scratch folder
                out = ctx.run.samples if ctx.writes else Path(scratch)
                if which == "live":
                    result = render_training_grid(ctx.comps, ctx.tokenizers, ctx.cfg, out, step)
                else:
                    with self.ema.swapped_in(ctx.comps):
                        result = render_training_grid(ctx.comps, ctx.tokenizers, ctx.cfg, out / "ema", step)
            if not ctx.writes:
                continue
            tag = "grid" if which == "live" else "grid_ema"
            ctx.metrics.log_image(tag, result.grid, step)
            log.info("grid%s at step %d: %s", "" if which == "live" else " (EMA)", step, result.grid)


def default_callbacks(cfg: "RunConfig") -> Callbacks:
    """The callbacks a run file asks for."""
    items: list[Callback] = []
    ema = None
    if cfg.ema.enabled:  # first: the grid and the probes may draw on the step's EMA
        from tunelab.train.ema import EmaCallback

        ema = EmaCallback(cfg.ema)
        items.append(ema)
    if cfg.probe.enabled:  # before the grid: step 0's probe sees the base before any grid is rendered
        from tunelab.probe.callback import ProbeCallback

        items.append(ProbeCallback(cfg, ema=ema if cfg.probe.weights == "ema" else None))
    if cfg.grid.prompts:
        items.append(GridCallback(cfg.grid.every_n_steps, cfg.grid.weights, ema))
    if cfg.report.enabled:  # last: it shows what the others just wrote
        from tunelab.report.callback import ReportCallback

        items.append(ReportCallback())
    return Callbacks(items)
