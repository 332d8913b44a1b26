"""Training metrics: tensorboard events and a `metrics.parquet` mirror, written by rank 0 only.

One row per scalar per optimizer step (never per micro-step): `loss` is the mean over the step's
micro-batches and processes; learning rates are logged per parameter group as `lr/<group>` with
the group's real name. The Parquet table's schema is `tunelab.run.METRICS_SCHEMA` (what `tunelab
loss` and the report read). On resume, rows logged after the
resumed state (by a run that was killed later) are dropped from the table, and tensorboard is told
to purge them (`purge_step`), so curves never show a step twice.

With `[log] wandb = true` the same scalars and grid images also go to Weights & Biases (an
optional dependency: `pip install 'tunelab[wandb]'`), offline by default (files under
`RUN/wandb/`, nothing leaves the machine). W&B cannot drop logged steps, so each start of
`tunelab train` — a resume included — is its own W&B run, grouped under `run.name` and starting at
the resumed step; tensorboard and metrics.parquet hold the one continuous curve.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from tunelab import faults
from tunelab.config import WANDB_MISSING
from tunelab.errors import TunelabError
from tunelab.run import METRICS_SCHEMA as SCHEMA  # the run layout owns the schema

if TYPE_CHECKING:
    from tunelab.config import RunConfig

log = logging.getLogger(__name__)


@dataclass
class WandbSettings:
    """What `wandb.init` gets: from `[log]` and `[run]` of the run file."""

    project: str
    mode: str  # "offline" (default: nothing leaves the machine) or "online"
    name: str  # run.name: the W&B run's name and group
    run_dir: Path  # W&B writes RUN/wandb/ under it
    config: dict[str, Any]  # the resolved run file, shown as the W&B run's config

    @classmethod
    def from_config(cls, cfg: "RunConfig", run_dir: Path) -> "WandbSettings | None":
        if not cfg.log.wandb:
            return None
        return cls(cfg.log.wandb_project, cfg.log.wandb_mode, cfg.run.name, Path(run_dir), cfg.model_dump(mode="json"))


def start_wandb(settings: WandbSettings, resume_step: int = 0):
    """A W&B run (rank 0 only); refuses with the install command when wandb is missing."""
    try:
        import wandb
    except ImportError:
        raise TunelabError(WANDB_MISSING) from None
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=settings.project, name=settings.name, group=settings.name, job_type="train",
                      mode=settings.mode, dir=str(settings.run_dir), config=settings.config,
                      notes=f"resumed at step {resume_step}" if resume_step else None)


class MetricsLogger:
    def __init__(self, events_dir: Path, parquet_path: Path, enabled: bool, resume_step: int = 0,
                 wandb: WandbSettings | None = None):
        self.enabled, self.path = enabled, parquet_path
        self.rows: dict[str, list] = {name: [] for name in SCHEMA.names}
        self.writer = None
        self.wandb_run = None
        if not enabled:
            return
        if wandb is not None:  # first: a missing package fails before any file is written
            self.wandb_run = start_wandb(wandb, resume_step)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(events_dir), purge_step=resume_step + 1 if resume_step else None)
        if parquet_path.exists():
            old = pq.read_table(parquet_path)
            old = old.filter(pa.compute.less_equal(old["step"], resume_step))
            for name in SCHEMA.names:
                self.rows[name] = old[name].to_pylist()

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        now = time.time()
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step, walltime=now)
            self.rows["step"].append(step)
            self.rows["tag"].append(tag)
            self.rows["value"].append(float(value))
            self.rows["wall_time"].append(now)
        if self.wandb_run is not None:
            self.wandb_run.log({tag: float(value) for tag, value in scalars.items()}, step=step)

    def log_image(self, tag: str, path: Path, step: int) -> None:
        """An image file (a grid sheet) into tensorboard; its path is recorded in the table too."""
        if not self.enabled:
            return
        import numpy as np
        from PIL import Image

        self.writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({tag: wandb.Image(str(path))}, step=step)
        self.log(step, {f"{tag}/rendered": 1.0})

    def flush(self) -> None:
        """Write the Parquet mirror (atomically) and flush tensorboard."""
        if not self.enabled:
            return
        self.writer.flush()
        table = pa.table(self.rows, schema=SCHEMA)
        tmp = self.path.with_name(self.path.name + ".partial")
        pq.write_table(table, tmp)
        faults.point("metrics.write")
        tmp.replace(self.path)

    def close(self) -> None:
        if self.enabled:
            self.flush()
            self.writer.close()
            if self.wandb_run is not None:
                self.wandb_run.finish()
