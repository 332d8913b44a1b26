"""A disk that fills up while a run saves: a real tmpfs mounted by the test (needs root; skipped
where mounting is not allowed, e.g. an unprivileged container, except under CI=true as root).
The save fails with a clear error and a non-zero exit, the previous checkpoint and state are
intact, and once there is space again `tunelab train` resumes to the same weights as a run that
never ran out."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.reliability.test_kill import _same, assert_nothing_half_written_is_taken
from tests.train.conftest import write_run


def _mount(where: Path, size_mb: int) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    if not _mount(disk, 90):
        if os.environ.get("CI") and os.geteuid() == 0:
            pytest.fail("could not mount a tmpfs as root")
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_disk_full_while_saving_loses_nothing_and_resumes(tmp_path, world, small_disk):
    sections = {"train": {"max_steps": 4}, "save": {"every_n_steps": 2, "dtype": "fp16"}, "report": {"enabled": False}}
    reference = write_run(tmp_path / "ref.toml", world, tmp_path / "ref", **sections)
    run_cli("train", reference, timeout=900)

    run = small_disk / "run"
    cfg = write_run(tmp_path / "full.toml", world, run, **sections)
    full = run_cli("train", cfg, check=False, timeout=900)  # 90 MB: one checkpoint (10 MB) + one state (~58 MB)
    assert full.returncode == 2, full.stderr[-3000:]
    error = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "no space left on the device" in error[0] and "resumes from step-00000002" in error[0], error
    assert "Traceback" not in full.stderr
    assert_nothing_half_written_is_taken(run)
    assert (run / "checkpoints" / "step-00000002.safetensors").exists()

    subprocess.run(["mount", "-o", "remount,size=400m", str(small_disk)], check=True)  # space freed
    again = run_cli("train", cfg, timeout=900)
    assert "trained 4 steps" in again.stdout
    assert _same(tmp_path / "ref" / "checkpoints" / "last.safetensors", run / "checkpoints" / "last.safetensors")
    assert_nothing_half_written_is_taken(run)
