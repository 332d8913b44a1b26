"""The run directory: every file and folder name, every file schema, checkpoint naming, retention.

One run = one directory (DESIGN.md decision 6). Train writes it; grid, loss, drift, probe and
report read it; all of them take the names from here and nowhere else:

    config.json                     the resolved run file (every default filled in)
    banner.txt                      the derived numbers the trainer printed at its last (re)start
    checkpoints/                    SGM single-file checkpoints, for users and other tools:
        step-00010000.safetensors       every save.every_n_steps steps
        epoch-0008.safetensors          every save.every_n_epochs epochs (8 = epochs completed)
        last.safetensors                the end of training
    state/step-00010000/            full training state for an exact resume (accelerate's
                                    save_state + trainer.json, written last, with the size of
                                    every file); `.partial` while being written, so only
                                    complete states count, and a damaged one is passed over
    .lock                           held by the `tunelab train` using the directory (its pid)
    events/                         tensorboard event files
    metrics.parquet                 the scalars as a table, METRICS_SCHEMA
    samples/step-00000024/          grids rendered during training
    probes/                         probe results (learn / preserve numbers per checkpoint)
    drift/                          `tunelab drift` over the base and the checkpoints (the report's)
    report.html                     the run report (rewritten at every checkpoint)

Retention: `save.keep_last` step/epoch checkpoints (0 = all; `last` always stays) and
`save.keep_states` training states (at least 1: the newest complete state is never removed).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from tunelab.errors import TunelabError

CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
STATES = "state"
EVENTS = "events"
METRICS = "metrics.parquet"
SAMPLES = "samples"
PROBES = "probes"
REPORT = "report.html"
BANNER = "banner.txt"
TRAINER_INFO = "trainer.json"
LOCK = ".lock"
PARTIAL = ".partial"
CHECKPOINT_SUFFIX = ".safetensors"
LAST = "last"

# metrics.parquet: one row per scalar per optimizer step. The trainer writes it, `tunelab loss`
# and the report read it.
METRICS_SCHEMA = pa.schema([("step", pa.int64()), ("tag", pa.string()), ("value", pa.float64()),
                            ("wall_time", pa.float64())])

_STEP_RE = re.compile(r"^step-(\d{8})$")
_EPOCH_RE = re.compile(r"^epoch-(\d{4,})$")


# --- writing ----------------------------------------------------------------------------------------


def write_atomic(path: Path, write) -> Path:  # noqa: ANN001 - write(tmp_path) writes the whole file
    """Write through a temporary sibling renamed into place: a reader (or a crash) never sees half a file."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# --- names ------------------------------------------------------------------------------------------


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def epoch_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


@dataclass(frozen=True)
class CheckpointFile:
    """A checkpoint of a run and what its name says (`step` or `epoch`, or neither for `last`)."""

    path: Path
    step: int | None = None
    epoch: int | None = None

    @property
    def is_last(self) -> bool:
        return self.path.stem == LAST

    @classmethod
    def parse(cls, path: Path) -> "CheckpointFile | None":
        stem = path.name[: -len(CHECKPOINT_SUFFIX)] if path.name.endswith(CHECKPOINT_SUFFIX) else None
        if stem is None:
            return None
        if m := _STEP_RE.match(stem):
            return cls(path, step=int(m[1]))
        if m := _EPOCH_RE.match(stem):
            return cls(path, epoch=int(m[1]))
        return cls(path) if stem == LAST else None


# --- the trainer's record of a state ------------------------------------------------------------------


@dataclass
class TrainerInfo:
    """`state/step-N/trainer.json`: where training stands, and what a resume must match."""

    step: int
    epoch: int  # the epoch the next step starts in
    position: int  # global batch position in that epoch
    samples_seen: int
    effective_batch: int
    skipped_nonfinite: int
    fingerprint: str  # RunConfig.fingerprint() of the settings that change the math
    world_size: int
    index_digest: str | None = None  # the dataset index's identity (data/index.py index_digest)
    num_samples: int | None = None  # train-split rows the sampler drew from
    files: dict[str, int] | None = None  # every file of the state folder and its size (the manifest)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str = "trainer.json") -> "TrainerInfo":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise TunelabError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(raw, dict):
            raise TunelabError(f"{where}: not a training-state record")
        known = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in raw]
        if missing:
            raise TunelabError(f"{where}: not a complete training state (missing {', '.join(missing)}); "
                               "delete that state folder to resume from the one before")
        return cls(**{k: v for k, v in raw.items() if k in known})


# --- the directory -------------------------------------------------------------------------------------


@dataclass
class RunDir:
    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def states(self) -> Path:
        return self.path / STATES

    @property
    def events(self) -> Path:
        return self.path / EVENTS

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def samples(self) -> Path:
        return self.path / SAMPLES

    @property
    def probes(self) -> Path:
        return self.path / PROBES

    @property
    def report(self) -> Path:
        return self.path / REPORT

    @property
    def banner(self) -> Path:
        return self.path / BANNER

    def make(self) -> None:
        for p in (self.path, self.checkpoints, self.states, self.events, self.samples):
            p.mkdir(parents=True, exist_ok=True)

    def is_run(self) -> bool:
        """Whether the folder looks like a run directory (has its config or checkpoints)."""
        return self.config.is_file() or self.checkpoints.is_dir()

    # checkpoints

    def checkpoint_path(self, name: str) -> Path:
        return self.checkpoints / f"{name}{CHECKPOINT_SUFFIX}"

    def checkpoint_files(self) -> list[CheckpointFile]:
        """The run's checkpoints in training order (by the step each was written at; `last` at
        the end). An epoch checkpoint's step is read from its header (`ss_steps`)."""
        if not self.checkpoints.is_dir():
            return []
        found = [c for p in self.checkpoints.iterdir() if (c := CheckpointFile.parse(p))]
        return sorted(found, key=lambda c: (c.is_last, c.step if c.step is not None else _written_at_step(c.path)))

    def prune_checkpoints(self, keep_last: int) -> list[Path]:
        """Keep the newest `keep_last` step- and epoch- checkpoints each (0 = keep all); `last` stays."""
        removed: list[Path] = []
        if keep_last <= 0:
            return removed
        files = self.checkpoint_files()
        for kind in ("step", "epoch"):
            mine = [c for c in files if getattr(c, kind) is not None]
            for old in sorted(mine, key=lambda c: getattr(c, kind))[:-keep_last]:
                old.path.unlink(missing_ok=True)
                removed.append(old.path)
        return removed

    # training states

    def state_path(self, step: int) -> Path:
        return self.states / step_name(step)

    def complete_states(self) -> list[Path]:
        if not self.states.is_dir():
            return []
        done = [p for p in self.states.iterdir() if _STEP_RE.match(p.name) and (p / TRAINER_INFO).is_file()]
        return sorted(done, key=lambda p: p.name)

    def latest_state(self) -> Path | None:
        """The newest complete training state, or None for a fresh run."""
        done = self.complete_states()
        return done[-1] if done else None

    def state_problem(self, state: Path) -> str | None:
        """Why a state folder cannot be resumed from (None: it can): its record unreadable, or a
        file its manifest lists missing or of another size (a disk that filled up, a copy cut
        short, a file deleted by hand)."""
        try:
            info = self.read_trainer_info(state)
        except (TunelabError, OSError) as err:
            return str(err)
        for name, size in (info.files or {}).items():
            f = state / name
            if not f.is_file():
                return f"{f} is missing"
            if f.stat().st_size != size:
                return f"{f} has {f.stat().st_size:,} bytes, the state recorded {size:,}"
        return None

    def usable_state(self) -> tuple[Path | None, list[tuple[Path, str]]]:
        """The newest complete state that can be resumed from, and the newer ones passed over
        (with the reason), so a damaged last state falls back to the one before it."""
        skipped = []
        for state in reversed(self.complete_states()):
            problem = self.state_problem(state)
            if problem is None:
                return state, skipped
            skipped.append((state, problem))
        return None, skipped

    def lock(self) -> "RunLock":
        """Take the run directory for one `tunelab train` (see RunLock)."""
        return RunLock(self.path / LOCK).acquire()

    def partial_states(self) -> Iterator[Path]:
        return self.states.glob(f"*{PARTIAL}") if self.states.is_dir() else iter(())

    def read_trainer_info(self, state: Path) -> TrainerInfo:
        return TrainerInfo.from_json((state / TRAINER_INFO).read_text(), str(state / TRAINER_INFO))

    # samples

    def samples_at(self, step: int) -> Path:
        return self.samples / step_name(step)


def state_manifest(state: Path) -> dict[str, int]:
    """{relative path: size} of every file in a state folder (what `state_problem` checks)."""
    return {p.relative_to(state).as_posix(): p.stat().st_size for p in sorted(state.rglob("*")) if p.is_file()}


class RunLock:
    """An exclusive lock on a run directory (`.lock`, flock), held while `tunelab train` runs, so
    a second train on the same directory is refused instead of both writing states. The lock
    file holds the owner's pid; the OS frees the lock when the process dies, so a killed run
    never leaves the directory locked."""

    def __init__(self, path: Path) -> None:
        self.path, self._file = path, None

    def acquire(self) -> "RunLock":
        import fcntl
        import os

        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "unknown"
            f.close()
            raise TunelabError(
                f"{self.path.parent} is in use by another `tunelab train` (pid {owner}); wait for it to finish or "
                "stop it, or give this run another run.output_dir") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file frees the flock
            self._file = None


def open_run(path: str | Path) -> RunDir:
    """A run directory that must exist (for the commands that read one)."""
    run = RunDir(Path(path))
    if not run.is_run():
        raise TunelabError(f"{path}: not a run directory (no {CONFIG} or {CHECKPOINTS}/ in it); "
                           "pass the run.output_dir of a run file that `tunelab train` ran")
    return run


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint file was written at (its `ss_steps`), -1 when it does not say."""
    return _written_at_step(path)


def _written_at_step(path: Path) -> int:
    from tunelab.models.safetensors_io import read_header

    try:
        return int(read_header(path).metadata.get("ss_steps", -1))
    except (TunelabError, ValueError, OSError):
        return -1
