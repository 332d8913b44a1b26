"""`tunelab report`: read the runs, bring their drift up to date, write one HTML file atomically."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.report.collect import DRIFT, RunData, drift_inputs, read_drift, read_run
from tunelab.report.page import Page
from tunelab.run import write_text_atomic

log = logging.getLogger(__name__)


def default_out(runs: list[Path]) -> Path:
    """One run: RUN/report.html (beside what it shows); several: report.html here."""
    from tunelab.run import RunDir

    return RunDir(runs[0]).report if len(runs) == 1 else Path("report.html")


def update_drift(data: RunData, progress: bool = True) -> None:
    """Compute RUN/drift over the base and the checkpoints when it is missing or out of date."""
    from tunelab.analyze.drift import run_drift

    if data.drift is not None:
        return
    inputs = drift_inputs(data)
    if len(inputs) < 2:
        data.drift_note = "fewer than two models to compare (the base is not a file and there is at most one checkpoint)"
        return
    folder = data.run.path / DRIFT
    log.info("%s: weight drift over %d models -> %s", data.name, len(inputs), folder)
    run_drift(inputs, folder, progress=progress)
    data.drift, data.drift_note = read_drift(folder, inputs)


def write_report(runs: list[str | Path], out: str | Path | None = None, *, drift: bool = True,
                 progress: bool = True, title: str = "") -> Path:
    """The report of one run or the comparison of several, written to `out` (atomically)."""
    if not runs:
        raise TunelabError("name at least one run directory")
    paths = [Path(r) for r in runs]
    out = Path(out) if out is not None else default_out(paths)
    if out.suffix.lower() not in (".html", ".htm"):
        raise TunelabError(f"--out {out}: the report is one HTML file; give a name ending in .html")
    data = [read_run(p) for p in paths]  # every run is checked before anything is computed or written
    if drift:
        for d in data:
            update_drift(d, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    page = Page(data, out.parent.resolve(), title)
    html = page.render(time.strftime("%Y-%m-%d %H:%M:%S"))
    return write_text_atomic(out, html)
