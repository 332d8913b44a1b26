"""The in-training probe (`[probe] enabled = true`): learn / preserve numbers every N steps.

At START it prepares the probe (`suite.prepare`: the sets and the base's predictions, made from
the live weights on a fresh run, from the base file on a resume that finds none) and measures
step 0; then every `every_n_steps` and at the end. Each probe logs `probe/learn_loss`,
`probe/preserve_loss`, `probe/drift_learn`, `probe/drift_preserve` (and `/low`, `/mid`, `/high`
per noise band, `probe/<set>_score/<name>` with a scorer, and `probe/seconds`, what the probe
took) to tensorboard and metrics.parquet, and rewrites `RUN/probes/training.{parquet,csv,png}`.

Under several processes the probe runs on rank 0 while the others wait (the model is not
sharded: DDP keeps a whole copy on every rank). `every_n_steps = 0` chooses the interval at which
a probe costs about 1 % of the training's compute, counting a training sample as three UNet
forwards (forward and backward) and a probe item as one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from tunelab.train.callbacks import Callback, LoopContext

if TYPE_CHECKING:
    from tunelab.config import RunConfig

log = logging.getLogger(__name__)

TARGET_SHARE = 0.01  # of the training compute, for every_n_steps = 0


def probe_cost(forwards: int, renders: int, render_steps: int) -> int:
    """UNet forwards of one probe: one per item, and 2 per sampler step per rendered image (CFG)."""
    return forwards + 2 * render_steps * renders


def planned_cost(cfg: "RunConfig", arch: str) -> int:
    """UNet forwards of one probe as the settings plan it (the learn set at its full `learn_samples`)."""
    from tunelab.probe.images import render_count
    from tunelab.probe.sets import default_preserve_prompts

    p = cfg.probe
    preserve = list(p.preserve_prompts) or default_preserve_prompts(arch)
    learn = [""] * p.learn_samples if p.learn else []
    items = (len(learn) + len(preserve) * len(p.preserve_seeds)) * p.timesteps
    return probe_cost(items, render_count(p.scorer, {"learn": learn, "preserve": preserve}, p.preserve_seeds),
                      p.preserve_steps)


def auto_interval(cost: int, samples_per_step: int, share: float = TARGET_SHARE) -> int:
    """Steps between probes so that a probe costs `share` of the training: a sample = 3 forwards."""
    return max(1, math.ceil(cost / (share * 3 * max(1, samples_per_step))))


@contextlib.contextmanager
def _probe_folder(ctx: LoopContext) -> Iterator[Path]:
    """Where `prepare` reads and writes the probe sets and the base's predictions. Under a sharded
    engine every process prepares (the base's forward needs them all): all decide from the same
    files before any is written, and a process that does not write works in a scratch folder."""
    from tunelab.probe.suite import reusable

    acc = ctx.accelerator
    if not ctx.sharded or ctx.writes and acc.num_processes == 1:
        yield ctx.run.probes
        return
    acc.wait_for_everyone()
    ready = reusable(ctx.cfg, ctx.comps.arch, ctx.run.probes)
    acc.wait_for_everyone()
    if ctx.writes or ready:
        yield ctx.run.probes
        return
    with tempfile.TemporaryDirectory(prefix="tunelab-probe-") as scratch:
        yield Path(scratch)


class ProbeCallback(Callback):
    all_ranks = False
    forward = True  # a sharded run measures on every process; the main one writes (LoopContext.writes)

    def __init__(self, cfg: "RunConfig", ema: Any = None) -> None:
        self.every_n_steps = cfg.probe.every_n_steps
        self.ema = ema  # probe.weights = "ema": measure the EMA's weights (swapped in, then back)
        self.prepared = None
        self.prepare_seconds = 0.0
        self.rows: list[dict] = []

    def due(self, event, ctx: LoopContext) -> bool:
        if self.every_n_steps == 0:  # auto: from the settings alone, so that every rank agrees
            per_step = ctx.progress.effective_batch // max(1, ctx.accelerator.num_processes)
            self.every_n_steps = auto_interval(planned_cost(ctx.cfg, ctx.comps.arch), per_step)
        return super().due(event, ctx)

    def on_start(self, ctx: LoopContext) -> None:
        from tunelab.probe.suite import TRAINING, prepare, read_table

        cfg, step, acc = ctx.cfg, ctx.progress.step, ctx.accelerator
        t0 = time.perf_counter()
        with _probe_folder(ctx) as folder:
            self.prepared = prepare(cfg, ctx.comps.arch, folder, lambda: self._base(ctx), acc.device, ctx.autocast)
        self.prepare_seconds = time.perf_counter() - t0
        probe = self.prepared.probe
        cost = planned_cost(cfg, ctx.comps.arch)
        per_step = ctx.progress.effective_batch // max(1, acc.num_processes)
        share = cost / (3 * max(1, per_step) * self.every_n_steps)
        scored = f" ({cost} with the image scores' renders)" if cfg.probe.scorer else ""
        log.info("probe: %s x %d timesteps = %d UNet forwards per probe%s, every %d steps (~%.1f %% of the "
                 "training's compute); tables in %s", " + ".join(f"{s.name} {len(s)}" for s in probe.sets),
                 len(probe.timesteps), probe.forwards, scored, self.every_n_steps, 100 * share, ctx.run.probes)
        self.rows = [r for r in read_table(ctx.run.probes / f"{TRAINING}.parquet") if r["step"] <= step]
        if not any(r["step"] == step for r in self.rows):
            self._measure(ctx, base=self.prepared.base_measurement if step == 0 else None)

    def on_step(self, ctx: LoopContext) -> None:
        self._measure(ctx)

    def on_end(self, ctx: LoopContext) -> None:
        if not any(r["step"] == ctx.progress.step for r in self.rows):
            self._measure(ctx)

    def _score_prompts(self) -> dict[str, list[str]]:
        return {s.name: list(s.prompts) for s in self.prepared.probe.sets}

    def _base(self, ctx: LoopContext):
        """The base's components: the live weights before the first step, else the base file."""
        if ctx.progress.step == 0:
            return ctx.comps, ctx.tokenizers
        from tunelab.train.engines import whole_modules
        from tunelab.train.trainer import load_model

        with whole_modules(ctx.accelerator):
            comps, tokenizers = load_model(ctx.cfg)
        for name in ("unet", "vae", "text_encoder_1", "text_encoder_2"):
            getattr(comps, name).to(ctx.accelerator.device)
        return comps, tokenizers

    def _measure(self, ctx: LoopContext, base=None) -> None:
        if self.ema is not None and base is None:
            with self.ema.swapped_in(ctx.comps):
                self._measure_live(ctx)
        else:
            self._measure_live(ctx, base)

    def _measure_live(self, ctx: LoopContext, base=None) -> None:
        from tunelab.probe.images import image_scores
        from tunelab.probe.measure import score_rows
        from tunelab.probe.plots import plot_probes
        from tunelab.probe.sets import preserve_scale
        from tunelab.probe.suite import TRAINING, measure_models, write_table
        from tunelab.train.step import StepModels

        cfg, step, acc = ctx.cfg, ctx.progress.step, ctx.accelerator
        t0 = time.perf_counter()
        m = base or measure_models(self.prepared, StepModels.of(ctx.comps, ctx.tokenizers), acc.device, ctx.autocast)
        scalars = m.scalars()
        p = cfg.probe
        scores = image_scores(ctx.comps, ctx.tokenizers, p.scorer, self._score_prompts(), p.preserve_seeds,
                              p.preserve_steps, preserve_scale(p, ctx.comps.arch))
        seconds = time.perf_counter() - t0 + (self.prepare_seconds if base is not None else 0.0)  # step 0: + the base's
        ctx.metrics.log(step, scalars | scores | {"probe/seconds": seconds})
        self.rows += m.rows(step) + score_rows(step, "", scores)
        if not ctx.writes:
            return
        write_table(self.rows, ctx.run.probes, TRAINING)
        plot_probes(self.rows, ctx.run.probes / f"{TRAINING}.png", f"{cfg.run.name}: probes during training")
        log.info("probe at step %d (%.1f s): %s", step, seconds, summary_line(scalars | scores))


def summary_line(scalars: dict[str, float]) -> str:
    """The headline numbers of one probe, for the log and the terminal."""
    parts = []
    for tag, label in (("probe/learn_loss", "learn loss"), ("probe/preserve_loss", "preserve loss"),
                       ("probe/drift_preserve", "preserve drift"), ("probe/drift_learn", "learn drift")):
        if tag in scalars:
            parts.append(f"{label} {scalars[tag]:.5g}")
    parts += [f"{tag.removeprefix('probe/')} {100 * v:.1f} %" for tag, v in scalars.items() if tag.endswith("_score/all")]
    return ", ".join(parts)
