"""What the report reads from a run directory, read once into plain data (`RunData`).

Everything is optional except the directory itself: a run that is one step old, has no probes,
no grids or no drift yet gets a report with those sections saying so. Nothing here writes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.errors import TunelabError
from tunelab.run import BANNER, CheckpointFile, RunDir, TrainerInfo

log = logging.getLogger(__name__)

DATA_ROWS = 12  # dataset rows shown (captions, tags, a thumbnail)
DRIFT = "drift"  # RUN/drift: `tunelab drift` over the base and the run's checkpoints (the report's)


@dataclass(frozen=True)
class GridCell:
    step: int
    prompt: str
    seed: int
    file: Path


@dataclass
class RunData:
    run: RunDir
    name: str
    config: dict[str, Any]
    banner: list[str] = field(default_factory=list)
    metrics: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # tag -> (steps, per-step mean)
    probes: list[dict[str, Any]] = field(default_factory=list)  # probes/training.parquet rows
    grids: dict[int, list[GridCell]] = field(default_factory=dict)  # step -> cells
    checkpoints: list[CheckpointFile] = field(default_factory=list)
    state: TrainerInfo | None = None  # the newest complete training state
    drift: dict[str, Any] | None = None  # drift.json of RUN/drift, when it covers the current checkpoints
    drift_note: str = ""
    data_rows: list[dict[str, Any]] = field(default_factory=list)
    data_stats: dict[str, Any] | None = None
    data_note: str = ""
    merges: list[tuple[Path, list[dict[str, Any]]]] = field(default_factory=list)  # (folder, merge-back rows)
    searches: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)  # (folder, merge evolve summary.json)

    @property
    def step(self) -> int:
        steps = [int(s[-1]) for s, _ in self.metrics.values() if len(s)]
        return max(steps, default=self.state.step if self.state else 0)


def read_run(path: str | Path, drift_dir: Path | None = None) -> RunData:
    run = RunDir(Path(path))
    if not run.path.is_dir() or not run.is_run():
        raise TunelabError(f"{path}: not a run directory (no {run.config.name} and no checkpoints/ in it); "
                           "pass the folder `tunelab train` wrote (run.output_dir)")
    config = _json(run.config) or {}
    data = RunData(run, (config.get("run") or {}).get("name") or run.path.name, config)
    if (run.path / BANNER).is_file():
        data.banner = (run.path / BANNER).read_text(encoding="utf-8", errors="replace").splitlines()
    data.metrics = read_metrics(run.metrics)
    data.probes = _probe_rows(run)
    data.grids = read_grids(run)
    data.checkpoints = run.checkpoint_files()
    latest = run.latest_state()
    if latest is not None:
        try:
            data.state = run.read_trainer_info(latest)
        except TunelabError as err:
            log.warning("%s", err)
    data.drift, data.drift_note = read_drift(drift_dir or run.path / DRIFT, drift_inputs(data))
    _read_dataset(data)
    data.merges = read_merges(run)
    data.searches = [(p.parent, doc) for p in sorted((run.path / "merges").glob("*/summary.json"))
                     if (doc := _json(p)) and "best_fitness" in doc]
    return data


def read_merges(run: RunDir) -> list[tuple[Path, list[dict[str, Any]]]]:
    """`tunelab merge back --run RUN` results: RUN/merges/*/merge-back.json."""
    found = []
    for doc_path in sorted((run.path / "merges").glob("*/merge-back.json")):
        doc = _json(doc_path)
        if doc and isinstance(doc.get("rows"), list):
            found.append((doc_path.parent, doc["rows"]))
    return found


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_metrics(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """metrics.parquet as tag -> (steps, value averaged per step), sorted by step."""
    if not path.is_file():
        return {}
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["step", "tag", "value"])
    steps = table["step"].to_numpy()
    values = table["value"].to_numpy()
    tags = np.asarray(table["tag"].to_pylist(), dtype=object)
    out = {}
    for tag in dict.fromkeys(tags.tolist()):
        mask = tags == tag
        s, inv, counts = np.unique(steps[mask], return_inverse=True, return_counts=True)
        out[tag] = (s, np.bincount(inv.reshape(-1), weights=values[mask], minlength=len(s)) / counts)
    return out


def _probe_rows(run: RunDir) -> list[dict[str, Any]]:
    from tunelab.probe.suite import TRAINING, read_table

    try:
        return read_table(run.probes / f"{TRAINING}.parquet")
    except Exception as err:  # noqa: BLE001 - a damaged table must not stop the report
        log.warning("probe table unreadable (%s); the report shows no probes", err)
        return []


def read_grids(run: RunDir) -> dict[int, list[GridCell]]:
    """The in-training grids: per step folder, its cells (prompt, seed, image file) from grid.json."""
    out: dict[int, list[GridCell]] = {}
    if not run.samples.is_dir():
        return out
    for folder in sorted(run.samples.glob("step-*")):
        doc = _json(folder / "grid.json")
        if not doc or not folder.name[5:].isdigit():
            continue
        step = int(folder.name[5:])
        cells = []
        for c in doc.get("cells", []):
            s = c.get("settings") or {}
            file = folder / str(c.get("file", ""))
            if file.is_file() and isinstance(s.get("prompt"), str):
                cells.append(GridCell(step, s["prompt"], int(s.get("seed", 0)), file))
        if cells:
            out[step] = cells
    return out


def drift_inputs(data: RunData) -> list[Path]:
    """What the run's drift compares: the base (when it is a file) and every checkpoint, in order."""
    base = Path(str((data.config.get("model") or {}).get("base", "")))
    ckpts = [c.path for c in data.checkpoints]
    return ([base] if base.is_file() else []) + ckpts


def read_drift(folder: Path, inputs: list[Path]) -> tuple[dict[str, Any] | None, str]:
    doc = _json(folder / "drift.json")
    if doc is None:
        return None, "not computed yet"
    if [str(Path(p).resolve()) for p in doc.get("files", [])] != [str(p.resolve()) for p in inputs]:
        return None, f"{folder / 'drift.json'} is from other checkpoints than the run has now"
    return doc, ""


def _read_dataset(data: RunData) -> None:
    index = str((data.config.get("data") or {}).get("index", ""))
    if not index:
        data.data_note = "the run names no dataset index"
        return
    path = Path(index)
    if not path.is_file():
        data.data_note = f"dataset index {index} not found (moved?)"
        return
    import pyarrow.parquet as pq

    from tunelab.data.index import index_stats

    try:
        data.data_stats = index_stats(path, top_tags=12, progress=False)
        pf = pq.ParquetFile(path)
        cols = [c for c in ("key", "path", "offset", "width", "height", "tags", "caption", "split", "repeats")
                if c in pf.schema_arrow.names]
        rows: list[dict[str, Any]] = []
        for batch in pf.iter_batches(batch_size=256, columns=cols):
            rows.extend(batch.to_pylist())
            if len(rows) >= DATA_ROWS:
                break
        data.data_rows = rows[:DATA_ROWS]
    except Exception as err:  # noqa: BLE001 - the report shows what it can
        data.data_note = f"dataset index {index} unreadable ({err})"
