"""`tunelab probe`: the probe over a run's checkpoints (or any checkpoint files) against their base.

    tunelab probe runs/a                       # every checkpoint of the run, on the run's probe inputs
    tunelab probe a.safetensors b.safetensors --base base.safetensors [--learn index.parquet]

A run directory brings its settings (RUN/config.json: objective, loss, captions, `[probe]`) and
its probe inputs (RUN/probes/sets.safetensors and the base's predictions, when the in-training
probe made them for these settings), so its checkpoints are measured on the inputs training
used. Loose files take the probe defaults, the base's prediction type from its header, and a
learn set only when `--learn` names an index. The base is measured too, as step 0.

Writes `checkpoints.parquet`, `checkpoints.csv` and `checkpoints.png` (the learned / forgot
chart) to the run's `probes/` or `--out`, and returns the rows and a summary per checkpoint.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from tunelab.errors import TunelabError
from tunelab.run import RunDir

log = logging.getLogger(__name__)


@dataclass
class ProbeOptions:
    """What the command line can change of a run's `[probe]` (None: keep the run's / the default)."""

    base: str | None = None
    learn: str | None = None  # an index path, 'holdout', 'train' or '' (none)
    learn_latents: str | None = None
    learn_samples: int | None = None
    prompts: list[str] | None = None
    seeds: list[int] | None = None
    timesteps: int | None = None
    scorer: str | None = None
    device: str = "auto"
    precision: str = "fp32"  # fp32 / bf16 / fp16 autocast (CUDA only for half precision)
    run: str | None = None  # files measured on this run's settings and probe inputs (merge back candidates)


@dataclass
class CheckpointNumbers:
    name: str
    step: int
    scalars: dict[str, float] = field(default_factory=dict)


@dataclass
class ProbeReport:
    out: Path
    forwards: int
    checkpoints: list[CheckpointNumbers]
    rows: list[dict[str, Any]]
    files: list[Path]


def run_probe(targets: Sequence[Path], out: Path | None = None, options: ProbeOptions = ProbeOptions(),
              progress: bool = True, table: str | None = None, steps: Sequence[int] | None = None) -> ProbeReport:
    """`table` names the output tables (default `checkpoints`); `steps` replaces the files' steps
    (the x axis of the chart: merge back gives each candidate its ratio's index)."""
    from tunelab.probe.callback import summary_line
    from tunelab.probe.images import image_scores
    from tunelab.probe.measure import score_rows
    from tunelab.probe.plots import plot_probes
    from tunelab.probe.sets import preserve_scale
    from tunelab.probe.suite import CHECKPOINTS, measure_models, prepare, write_table
    from tunelab.train.step import StepModels

    cfg, checkpoints, folder = _resolve(list(targets), out, options)
    inputs = Path(RunDir(options.run).probes) if options.run else folder
    if steps is not None:
        checkpoints = [(name, int(s), path) for (name, _, path), s in zip(checkpoints, steps)]
    device = _device(options.device)
    autocast = _autocast(device, options.precision)
    arch = _arch(cfg.model.base)
    tokenizers = _tokenizers(cfg, arch)

    def base_models():
        return _base(cfg, device), tokenizers

    prepared = prepare(cfg, arch, inputs, base_models, device, autocast)
    p = cfg.probe
    prompts = {s.name: list(s.prompts) for s in prepared.probe.sets}
    scale = preserve_scale(p, arch)
    rows: list[dict[str, Any]] = []
    numbers: list[CheckpointNumbers] = []
    entries = [("base", 0, cfg.model.base)] + checkpoints
    bar = _bar(len(entries), progress)
    for name, step, path in entries:
        fresh = name != "base" or prepared.base_measurement is None or p.scorer
        comps = (_base(cfg, device) if name == "base" else _load(path, arch, device)) if fresh else None
        if name == "base" and prepared.base_measurement is not None:
            m = prepared.base_measurement
        else:
            m = measure_models(prepared, StepModels.of(comps, tokenizers), device, autocast)
        scores = image_scores(comps, tokenizers, p.scorer, prompts, p.preserve_seeds, p.preserve_steps, scale) if p.scorer else {}
        scalars = m.scalars() | scores
        rows += m.rows(step, name) + score_rows(step, name, scores)
        numbers.append(CheckpointNumbers(name, step, scalars))
        log.info("%s (step %d): %s", name, step, summary_line(scalars))
        del comps
        gc.collect()
        bar.update(1)
    bar.close()
    name = table or CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    files = list(write_table(rows, folder, name))
    files.append(plot_probes(rows, folder / f"{name}.png", f"probes over {name}"))
    return ProbeReport(folder, prepared.probe.forwards, numbers, rows, files)


def summary(rep: ProbeReport) -> list[str]:
    """The terminal table: one line per checkpoint."""
    cols = [("probe/learn_loss", "learn loss"), ("probe/preserve_loss", "preserve loss"),
            ("probe/drift_learn", "learn drift"), ("probe/drift_preserve", "preserve drift")]
    scores = sorted({t for c in rep.checkpoints for t in c.scalars if t.endswith("_score/all")})
    present = [(t, h) for t, h in cols if any(t in c.scalars for c in rep.checkpoints)]
    head = ["checkpoint", "step"] + [h for _, h in present] + [t.removeprefix("probe/") for t in scores]
    lines = [f"probe: {rep.forwards} UNet forwards per checkpoint; tables and chart in {rep.out}",
             "  ".join(f"{h:>14}" for h in head)]
    for c in rep.checkpoints:
        vals = [f"{c.name[-14:]:>14}", f"{c.step:>14}"] + [f"{c.scalars.get(t, float('nan')):>14.5g}" for t, _ in present]
        vals += [f"{100 * c.scalars.get(t, float('nan')):>13.1f}%" for t in scores]
        lines.append("  ".join(vals))
    return lines


# --- resolving what to measure ------------------------------------------------------------------------


def _resolve(targets: list[Path], out: Path | None, o: ProbeOptions):
    from tunelab.config import RunConfig, parse_config
    from tunelab.run import RunDir, checkpoint_step

    if not targets:
        raise TunelabError("give a run directory or checkpoint files to probe")
    if o.run:
        run = RunDir(o.run)
        if not run.config.is_file():
            raise TunelabError(f"{o.run}: not a run directory (no config.json)")
        cfg = parse_config(json.loads(run.config.read_text()), str(run.config))
        for t in targets:
            if not t.is_file():
                raise TunelabError(f"{t}: no such checkpoint file")
        checkpoints = [(t.stem, i, t) for i, t in enumerate(targets)]
        folder = out or run.probes
    elif len(targets) == 1 and targets[0].is_dir():
        run = RunDir(targets[0])
        if not run.config.is_file():
            raise TunelabError(f"{targets[0]}: not a run directory (no config.json); pass a run.output_dir "
                               "that `tunelab train` wrote, or checkpoint files with --base")
        cfg = parse_config(json.loads(run.config.read_text()), str(run.config))
        files = run.checkpoint_files()
        if not files:
            raise TunelabError(f"{targets[0]}: the run has no checkpoints yet")
        checkpoints = [(c.path.stem, c.step if c.step is not None else checkpoint_step(c.path), c.path) for c in files]
        folder = out or run.probes
    else:
        for t in targets:
            if not t.is_file():
                raise TunelabError(f"{t}: no such checkpoint file (give one run directory, or .safetensors files)")
        if not o.base:
            raise TunelabError("checkpoint files need --base (the model they were trained from), "
                               "or give the run directory instead")
        cfg = RunConfig()
        cfg.probe.learn = ""  # loose files: a learn set only with --learn
        cfg.objective.prediction = _prediction(o.base)
        checkpoints = [(t.stem, max(checkpoint_step(t), i + 1), t) for i, t in enumerate(targets)]
        folder = out or Path("probe")
    if o.base:
        cfg.model.base = o.base
    _apply(cfg, o)
    if not cfg.model.base or (cfg.model.base != "toy" and not Path(cfg.model.base).exists()):
        raise TunelabError(f"the base {cfg.model.base!r} is not a checkpoint on disk; pass it with --base")
    return cfg, checkpoints, Path(folder)


def _apply(cfg, o: ProbeOptions) -> None:
    p = cfg.probe
    for name, value in (("learn", o.learn), ("learn_latents", o.learn_latents), ("learn_samples", o.learn_samples),
                        ("preserve_prompts", o.prompts), ("preserve_seeds", o.seeds), ("timesteps", o.timesteps),
                        ("scorer", o.scorer)):
        if value is not None:
            setattr(p, name, value)


def _prediction(base: str) -> str:
    from tunelab.models.prediction import base_record

    record = base_record(base)
    return record.type if record is not None else "epsilon"


def _arch(base: str) -> str:
    from tunelab.models.checkpoint import base_arch

    return base_arch(base)


def _tokenizers(cfg, arch: str):
    from tunelab.models.text import load_tokenizers
    from tunelab.train.trainer import check_tokenizers

    return load_tokenizers(check_tokenizers(cfg, cfg.model.base), allow_download=cfg.model.allow_download)


def _base(cfg, device: torch.device):
    """The base as training started from it ('toy': the run's seeded initial weights), in fp32."""
    from tunelab.train.trainer import load_model

    comps, _ = load_model(cfg)
    for name in ("unet", "vae", "text_encoder_1", "text_encoder_2"):
        getattr(comps, name).to(device).eval()
    return comps


def _load(path: str | Path, arch: str, device: torch.device):
    from tunelab.models.checkpoint import load_checkpoint

    # fp32: the CPU's half-precision kernels are slow, and a number should not depend on a file's dtype
    comps = load_checkpoint(path, arch, dtype=torch.float32)
    for name in ("unet", "vae", "text_encoder_1", "text_encoder_2"):
        getattr(comps, name).to(device).eval()
    return comps


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext
    if device.type != "cuda":
        raise TunelabError(f"--precision {precision} needs a CUDA device; use --precision fp32 on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast("cuda", dtype=dtype)


def _bar(total: int, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="probe", unit="checkpoint", disable=not progress)
