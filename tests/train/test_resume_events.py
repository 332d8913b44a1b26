"""A real toy training run killed with SIGKILL mid-run and resumed: the tensorboard events it
leaves read back with one value per step, as tensorboard shows them.

The events are written through at once (torch's SummaryWriter appends each record to the file
from its writer thread), so a run killed after its last complete state leaves the steps it
trained after that state in the event file; the resumed run logs those steps again in a new
file headed by `SessionLog.START` at its first step (`purge_step`). Reading applies tensorboard's
`EventAccumulator._MaybePurgeOrphanedData` (tensorboard/backend/event_processing/
event_accumulator.py). Marked slow (23-32 s on the 2-core box); its fast twin (SummaryWriter only, no training) is
tests/analyze/test_events.py::test_killed_and_resumed_run_keeps_one_value_per_step.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator as ea

from tests.conftest import run_cli
from tests.train.conftest import write_run
from tests.train.test_trainer import _train_until_state
from tunelab.analyze.events import discover_runs, read_scalars


@pytest.mark.slow  # 23-32 s measured: over the ~30 s budget of the default suite
def test_sigkill_and_resume_reads_one_value_per_step(tmp_path, world):
    run = tmp_path / "run"
    cfg = write_run(tmp_path / "run.toml", world, run, train={"max_steps": 10}, save={"every_n_steps": 2})
    _train_until_state(cfg, run / "state", step=6)
    # The kill landed while step 6's state was being written: the newest complete state is step 4,
    # and steps 5-6 are already in the event file (orphans once the run resumes from step 4).
    newest = run / "state" / "step-00000006"
    newest.rename(newest.with_name(newest.name + ".partial"))
    raw = ea.EventAccumulator(str(run / "events"), size_guidance={ea.SCALARS: 0}, purge_orphaned_data=False)
    raw.Reload()
    assert {5, 6} <= {e.step for e in raw.Scalars("loss")}

    resumed_at = time.time()
    assert "trained 10 steps" in run_cli("train", cfg, timeout=900).stdout
    (_, files), = discover_runs(run / "events")
    assert len(files) == 2  # the killed run's file and the resumed run's, in creation order
    scalars = read_scalars(files)
    for tag in ("loss", "grad_norm", "lr/unet"):
        np.testing.assert_array_equal(scalars.series[tag].step, np.arange(1, 11), err_msg=tag)  # not 12 values
    loss = scalars.series["loss"]
    assert (loss.wall_time[4:] >= resumed_at).all()  # steps 5-10: the resumed run's values
    assert (loss.wall_time[:4] < resumed_at).all()
    purged = ea.EventAccumulator(str(run / "events"), size_guidance={ea.SCALARS: 0})  # purge on: its default
    purged.Reload()
    np.testing.assert_array_equal(loss.value, [e.value for e in purged.Scalars("loss")])
    # The run directory itself reads metrics.parquet, which the trainer keeps purged.
    (_, table), = discover_runs(run)
    np.testing.assert_array_equal(read_scalars(table).series["loss"].step, np.arange(1, 11))
