"""Training state that resumes exactly: written atomically, checked before a resume, retained.

Where things live is `tunelab/run.py`'s business; this module writes and reads the state folder.
A state folder counts only once complete: it is written as `step-N.partial` and renamed after
every process has finished writing and `trainer.json` exists, so a kill at any moment leaves the
previous complete state intact. Running `tunelab train` again on the directory resumes from the
newest complete state.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

from tunelab import faults
from tunelab.errors import TunelabError
from tunelab.run import TRAINER_INFO, RunDir, TrainerInfo, state_manifest

__all__ = ["RunDir", "check_resume", "choose_state", "load_state", "save_state"]

log = logging.getLogger(__name__)


def check_resume(info: TrainerInfo, fingerprint: str, allow_change: bool, index_digest: str | None = None,
                 num_samples: int | None = None) -> None:
    """A resume with settings or data that change the math would not continue the same run."""
    if info.fingerprint != fingerprint and not allow_change:
        raise TunelabError(
            "the run file changed since this run's last state (train/optim/objective/loss/data settings differ), "
            "so resuming would not continue the same run; restore the settings, use a new run.output_dir, or pass "
            "--allow-config-change to resume anyway"
        )
    if info.index_digest and index_digest and info.index_digest != index_digest and not allow_change:
        size = f" ({info.num_samples} training images then, {num_samples} now)" if info.num_samples != num_samples else ""
        raise TunelabError(
            f"the dataset index changed since this run's last state{size}: it was rebuilt or edited under the same "
            "path, so the resumed run would not see the batches it would have seen; restore the index the run "
            "started with, start a new run (new run.output_dir, or --init-from a checkpoint of this one), or pass "
            "--allow-config-change to resume on the new data anyway"
        )


def save_state(accelerator, run: RunDir, info: TrainerInfo, keep: int = 2,
               extra: Callable[[Path], None] | None = None) -> Path:
    """Every process writes its part (`extra(folder)` too, on every process: FSDP's shards); the
    folder is renamed into place when all are done."""
    final = run.state_path(info.step)
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial), safe_serialization=True)
    if extra is not None:
        extra(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        faults.point("state.files")
        info = dataclasses.replace(info, files=state_manifest(partial))  # what a resume will check
        (partial / TRAINER_INFO).write_text(info.to_json())
        if final.exists():
            shutil.rmtree(final)
        faults.point("state.rename")
        partial.rename(final)
        prune_states(run, keep)
    accelerator.wait_for_everyone()
    return final


def load_state(accelerator, run: RunDir, state: Path, sharded: Mapping[str, Any] | None = None,
               optimizer: Any = None) -> TrainerInfo:
    """accelerate's part of the state, then (FSDP: `sharded` = the trained modules) the shards of
    the weights and the optimizer."""
    try:
        accelerator.load_state(str(state))
        if sharded is not None:
            from tunelab.train import sharding

            sharding.load(state, sharded, optimizer)
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        older = [p.name for p in run.complete_states() if p.name < state.name]
        hint = f"resume from an earlier one with --resume-from {run.states / older[-1]}" if older else \
            "start the run again in a new run.output_dir (or --init-from one of its checkpoints)"
        raise TunelabError(f"the training state {state} cannot be loaded ({type(err).__name__}: {err}); {hint}") from None
    return run.read_trainer_info(state)


def choose_state(run: RunDir, resume_from: str | Path | None = None) -> Path | None:
    """The state to resume from: `resume_from` if given (it must be usable), else the newest
    usable one; damaged newer states are passed over with a warning that says why."""
    if resume_from is not None:
        state = Path(resume_from)
        if not state.is_dir() and (run.states / str(resume_from)).is_dir():
            state = run.states / str(resume_from)  # a bare name: step-00000040
        problem = run.state_problem(state) if state.is_dir() else f"{state} is not a state folder"
        if problem:
            raise TunelabError(f"--resume-from: {problem}; states in this run: "
                               f"{', '.join(p.name for p in run.complete_states()) or 'none'}")
        return state
    state, skipped = run.usable_state()
    for bad, why in skipped:
        log.warning("passing over the damaged training state %s (%s)%s", bad.name, why,
                    f"; resuming from {state.name}" if state else "")
    if skipped and state is None:
        raise TunelabError(f"no training state in {run.states} can be resumed from ({skipped[-1][1]}); "
                           "delete the state folder to start the run again, or start a new run.output_dir")
    return state


def prune_states(run: RunDir, keep: int) -> None:
    """Keep the newest `keep` complete states (at least the newest one) and no partial ones."""
    for old in run.complete_states()[:-max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in run.partial_states():
        shutil.rmtree(leftover, ignore_errors=True)
