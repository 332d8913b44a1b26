"""The report during training (`[report] enabled = true`, the default): RUN/report.html is
rewritten at every checkpoint and at the end, atomically, so it can be opened mid-run.

The refresh reads only what is on disk (the trainer flushes the metrics before every checkpoint
event) and computes nothing heavy:
the drift section shows RUN/drift when `tunelab report RUN` has computed it for the current
checkpoints. A report that fails to build is logged and training goes on.
"""

from __future__ import annotations

import logging
import time

from tunelab.train.callbacks import Callback, LoopContext

log = logging.getLogger(__name__)


class ReportCallback(Callback):
    all_ranks = False  # rank 0 writes; the others wait at the barrier

    def on_checkpoint(self, ctx: LoopContext) -> None:
        self._write(ctx)

    def on_end(self, ctx: LoopContext) -> None:
        self._write(ctx)

    def _write(self, ctx: LoopContext) -> None:
        from tunelab.report.build import write_report

        t = time.perf_counter()  # the trainer flushed metrics.parquet before CHECKPOINT; END follows it
        try:
            path = write_report([ctx.run.path], ctx.run.report, drift=False, progress=False)
        except Exception as err:  # noqa: BLE001 - a report must never stop a training run
            log.warning("report not written at step %d: %s", ctx.progress.step, err)
            return
        log.info("report at step %d: %s (%.2f s)", ctx.progress.step, path, time.perf_counter() - t)
