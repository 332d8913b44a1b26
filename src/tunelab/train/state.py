"""One run = one directory; training state that resumes exactly; checkpoint retention.

Layout of a run directory:

    config.json                     the resolved run file (every default filled in)
    checkpoints/step-00010000.safetensors, epoch-0008.safetensors, last.safetensors   (SGM, for users)
    state/step-00010000/            full training state (for resume): accelerate's save_state
                                    (trainable modules, optimizer, process RNGs, LR scheduler)
                                    + trainer.json (step, epoch, sampler position, ...), written last
    events/                         tensorboard event files
    metrics.parquet                 the same scalars as a table (step, tag, value, wall_time)

A state folder counts only once complete: it is written as `step-N.partial` and renamed after
every process has finished writing and `trainer.json` exists, so a kill at any moment leaves the
previous complete state intact. Running `tunelab train` again on the directory resumes from the
newest complete state.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

_STATE_RE = re.compile(r"^step-(\d{8})$")


@dataclass
class RunDir:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def states(self) -> Path:
        return self.path / "state"

    @property
    def events(self) -> Path:
        return self.path / "events"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.parquet"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    def make(self) -> None:
        for p in (self.path, self.checkpoints, self.states, self.events, self.samples):
            p.mkdir(parents=True, exist_ok=True)

    def latest_state(self) -> Path | None:
        """The newest complete training state, or None for a fresh run."""
        if not self.states.is_dir():
            return None
        done = [p for p in self.states.iterdir() if _STATE_RE.match(p.name) and (p / "trainer.json").is_file()]
        return max(done, key=lambda p: p.name) if done else None

    def state_path(self, step: int) -> Path:
        return self.states / f"step-{step:08d}"


def read_trainer_info(state: Path) -> dict[str, Any]:
    return json.loads((state / "trainer.json").read_text())


def check_resume(info: dict[str, Any], fingerprint: str, allow_change: bool) -> None:
    """A resume with settings that change the math would not continue the same run."""
    if info["fingerprint"] != fingerprint and not allow_change:
        raise TunelabError(
            "the run file changed since this run's last state (train/optim/objective/loss/data settings differ), "
            "so resuming would not continue the same run; restore the settings, use a new run.output_dir, or pass "
            "--allow-config-change to resume anyway"
        )


def save_state(accelerator, run: RunDir, step: int, info: dict[str, Any], keep: int = 2) -> Path:
    """Every process writes its part; the folder is renamed into place when all are done."""
    final = run.state_path(step)
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / "trainer.json").write_text(json.dumps(info, indent=2))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        _prune_states(run, keep)
    accelerator.wait_for_everyone()
    return final


def load_state(accelerator, state: Path) -> dict[str, Any]:
    accelerator.load_state(str(state))
    return read_trainer_info(state)


def _prune_states(run: RunDir, keep: int) -> None:
    states = sorted(p for p in run.states.iterdir() if _STATE_RE.match(p.name))
    for old in states[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in run.states.glob("*.partial"):
        shutil.rmtree(leftover, ignore_errors=True)


def prune_checkpoints(run: RunDir, keep_last: int) -> list[Path]:
    """Keep the newest `keep_last` step-/epoch- checkpoints (0 = keep all); `last` always stays."""
    removed: list[Path] = []
    if keep_last <= 0:
        return removed
    for pattern in ("step-*.safetensors", "epoch-*.safetensors"):
        files = sorted(run.checkpoints.glob(pattern))
        for old in files[:-keep_last]:
            old.unlink(missing_ok=True)
            removed.append(old)
    return removed
