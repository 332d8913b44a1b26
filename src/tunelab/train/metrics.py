"""Training metrics: tensorboard events and a `metrics.parquet` mirror, written by rank 0 only.

One row per scalar per optimizer step (never per micro-step): `loss` is the mean over the step's
micro-batches and processes; learning rates are logged per parameter group as `lr/<group>` with
the group's real name. The Parquet table's schema is `tunelab.run.METRICS_SCHEMA` (what `tunelab
loss` and the report read). On resume, rows logged after the
resumed state (by a run that was killed later) are dropped from the table, and tensorboard is told
to purge them (`purge_step`), so curves never show a step twice.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tunelab.run import METRICS_SCHEMA as SCHEMA  # the run layout owns the schema

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, events_dir: Path, parquet_path: Path, enabled: bool, resume_step: int = 0):
        self.enabled, self.path = enabled, parquet_path
        self.rows: dict[str, list] = {name: [] for name in SCHEMA.names}
        self.writer = None
        if not enabled:
            return
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

    def log_image(self, tag: str, path: Path, step: int) -> None:
        """An image file (a grid sheet) into tensorboard; its path is recorded in the table too."""
        if not self.enabled:
            return
        import numpy as np
        from PIL import Image

        self.writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        self.log(step, {f"{tag}/rendered": 1.0})

    def flush(self) -> None:
        """Write the Parquet mirror (atomically) and flush tensorboard."""
        if not self.enabled:
            return
        self.writer.flush()
        table = pa.table(self.rows, schema=SCHEMA)
        tmp = self.path.with_name(self.path.name + ".partial")
        pq.write_table(table, tmp)
        tmp.replace(self.path)

    def close(self) -> None:
        if self.enabled:
            self.flush()
            self.writer.close()
