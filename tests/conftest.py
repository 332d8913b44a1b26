"""Shared fixtures: tiny real models and checkpoint files, built in code (nothing downloaded)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Keep CPU tests single-threaded per process: the CI machine has 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def toy_checkpoint(tmp_path_factory) -> Path:
    """A seeded random toy checkpoint in fp32 (so round trips compare exactly)."""
    from tunelab.models.checkpoint import new_checkpoint

    return new_checkpoint("toy", tmp_path_factory.mktemp("ckpt") / "toy.safetensors", seed=7, dtype="fp32")


@pytest.fixture(scope="session")
def toy_components(toy_checkpoint):
    from tunelab.models.checkpoint import load_checkpoint

    return load_checkpoint(toy_checkpoint)


def tunelab_cli() -> list[str]:
    """The installed console script if present, else `python -m tunelab` from this interpreter."""
    exe = Path(sys.executable).with_name("tunelab")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tunelab"]


def run_cli(*args: str, cwd: Path | None = None, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `tunelab ARGS...` as a real subprocess; returns the completed process (text output)."""
    proc = subprocess.run([*tunelab_cli(), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"tunelab {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def cli():
    return run_cli


__all__ = ["run_cli", "tunelab_cli", "shutil"]
