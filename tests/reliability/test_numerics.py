"""Forced NaN losses (`TUNELAB_FAULT=loss.nonfinite:N`, faults.py): one bad micro-batch is skipped
and counted and the run goes on; a persistent one stops the run cleanly (exit 2, no traceback)
with the last good checkpoint and state untouched."""

from __future__ import annotations

import json
import os
import subprocess

from safetensors.torch import load_file

from tests.conftest import tunelab_cli
from tests.reliability.test_kill import assert_nothing_half_written_is_taken
from tests.train.conftest import write_run


def _train(cfg, fault: str) -> subprocess.CompletedProcess:
    return subprocess.run([*tunelab_cli(), "train", str(cfg)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TUNELAB_FAULT": fault})


def test_one_nan_is_skipped_and_counted_persistent_nan_stops_cleanly(tmp_path, world):
    once = write_run(tmp_path / "once.toml", world, tmp_path / "once", train={"max_steps": 4, "max_nonfinite_steps": 2},
                     save={"every_n_steps": 2}, report={"enabled": False})
    proc = _train(once, "loss.nonfinite:2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "trained 4 steps" in proc.stdout and "step skipped (1 in a row, 1 in total)" in proc.stderr
    info = json.loads((tmp_path / "once" / "state" / "step-00000004" / "trainer.json").read_text())
    assert info["skipped_nonfinite"] == 1 and info["step"] == 4
    last = load_file(tmp_path / "once" / "checkpoints" / "last.safetensors")
    assert all(v.isfinite().all() for v in last.values())

    stuck = write_run(tmp_path / "stuck.toml", world, tmp_path / "stuck", train={"max_steps": 6, "max_nonfinite_steps": 2},
                      save={"every_n_steps": 2}, report={"enabled": False})
    proc = _train(stuck, "loss.nonfinite:5-")  # micro-batches 5, 6, ...: steps 1-4 fine, then NaN for good
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "NaN/inf for 2 optimizer steps in a row" in proc.stderr
    run = tmp_path / "stuck"
    assert sorted(p.name for p in (run / "checkpoints").glob("*.safetensors")) == ["step-00000002.safetensors",
                                                                                    "step-00000004.safetensors"]
    from tunelab.models.safetensors_io import HASH_KEY, data_sha256, read_header

    for ckpt in (run / "checkpoints").glob("*.safetensors"):  # intact: the data still has the hash written with it
        assert read_header(ckpt).metadata[HASH_KEY] == data_sha256(ckpt)
    assert json.loads((run / "state" / "step-00000004" / "trainer.json").read_text())["step"] == 4
    assert_nothing_half_written_is_taken(run)
