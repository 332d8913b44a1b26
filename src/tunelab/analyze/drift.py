"""Weight drift (`tunelab drift`): how far N checkpoints moved from each other, per component,
UNet block and kind, in one pass over the files, key by key, never holding a whole model.

The work is split by job:

- `drift_read`: the streaming reader (each tensor read straight from the file, read ahead on
  threads, bounded memory);
- `drift_math`: one key's pair sums (squared distances, norms, sign counts), and their precision;
- `drift_scan`: the pass over all keys, per-tensor figures, problems (missing keys, shape
  mismatches, non-finite values: listed, never fatal);
- `drift_groups`: the figures per component / UNet block / kind (distance, relative change,
  cosines, sign agreement);
- `drift_write`: drift.json, drift.csv, tensors.csv; `drift_plots`: the PNGs.

This module is the entry point: `run_drift` checks the inputs before any output appears, scans,
writes and plots; `summary` is the text for the terminal. Written by hand: no library computes
streaming pairwise distances over safetensors files.
"""

from __future__ import annotations

import importlib
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tunelab.analyze.drift_read import open_checkpoints
from tunelab.analyze.drift_scan import DriftScan, scan
from tunelab.analyze.drift_write import report, write_outputs
from tunelab.errors import TunelabError
from tunelab.models.vocab import label
from tunelab.run import CHECKPOINTS, CheckpointFile, RunDir


@dataclass
class DriftReport:
    doc: dict  # the JSON document
    result: DriftScan
    pair: tuple[int, int]  # the pair of the per-block chart (indices into ml)
    written: list[Path]
    by_step: bool = False  # the run's checkpoints were put in training order (see `training_order`)


def resolve_pair(pair: tuple[int, int] | None, n: int) -> tuple[int, int]:
    """Indices into the model list (negative counts from the end); default: first and last."""
    i, j = pair if pair is not None else (0, n - 1)
    for v in (i, j):
        if not -n <= v < n:
            raise TunelabError(f"--pair {i},{j}: index {v} is out of range for {n} models (use 0..{n - 1})")
    i, j = i % n, j % n
    if i == j:
        raise TunelabError(f"--pair {i},{j}: pick two different models")
    return i, j


def training_order(paths: list[Path]) -> tuple[list[Path], bool]:
    """(paths, whether they were reordered). When every file, or every file after the first, is a
    checkpoint of one run (tunelab's names in its `checkpoints/` folder), those go in the order
    `RunDir.checkpoint_files()` gives: by the step each was written at (`epoch-*` by its `ss_steps`,
    `last` at the end), not by name (a shell glob puts `epoch-*` and `last` before `step-*`); a
    first file from elsewhere (the base) stays first, the reference. Anything else: as given."""
    for head in (0, 1):
        rest = paths[head:]
        folders = {p.resolve().parent for p in rest}
        if len(rest) < 2 or len(folders) != 1 or any(CheckpointFile.parse(p) is None for p in rest):
            continue
        folder = folders.pop()
        if folder.name != CHECKPOINTS or (head and paths[0].resolve().parent == folder):
            continue
        rank = {c.path.resolve(): i for i, c in enumerate(RunDir(folder.parent).checkpoint_files())}
        ordered = paths[:head] + sorted(rest, key=lambda p: rank.get(p.resolve(), len(rank)))
        return ordered, ordered != paths
    return paths, False


def run_drift(
    paths: list[str | Path], out_dir: str | Path, pair: tuple[int, int] | None = None,
    plots: bool = True, progress: bool = True, signs: bool = False,
) -> DriftReport:
    """Scan, then write drift.json, drift.csv (pairs x groups), tensors.csv and the plots to `out_dir`.
    A run's checkpoints are compared in training order (`training_order`), other files as given."""
    paths, by_step = training_order([Path(p) for p in paths])
    open_checkpoints(paths)  # every input check before any output folder appears
    ij = resolve_pair(pair, len(paths))
    if plots:  # import matplotlib while the scan waits on the disk (~0.6 s off the command)
        warm = threading.Thread(target=importlib.import_module, args=("tunelab.analyze.drift_plots",), daemon=True)
        warm.start()
    result = scan(paths, progress=progress, signs=signs)
    doc = report(result)
    doc["order"] = "training step" if by_step else "as given"
    out = Path(out_dir)
    written = write_outputs(doc, result, out)
    if plots:
        from tunelab.analyze import drift_plots  # matplotlib only when drawing

        written += drift_plots.write_plots(doc, out, ij)
    return DriftReport(doc, result, ij, written, by_step)


def top_tensors(result: DriftScan, pair: tuple[int, int], k: int = 5) -> list[tuple[str, float, float]]:
    """The k tensors with the largest L2 change between the pair: (key, l2, relative)."""
    i, j = pair
    rows = []
    for t in result.tensors:
        sq, base = t.sq[i, j], t.norm2[min(i, j)]
        if np.isfinite(sq):
            rows.append((t.key, math.sqrt(sq), math.sqrt(sq / base) if base > 0 else math.nan))
    return sorted(rows, key=lambda r: -r[1])[:k]


def summary(rep: DriftReport) -> list[str]:
    """A short text table for the terminal: distance from the first model per component, the
    blocks and tensors that moved most in the chosen pair, problems, files written."""
    doc, models, (a, b) = rep.doc, rep.doc["ml"], rep.pair
    lines = ["models: " + "  ".join(f"[{i}] {m}" for i, m in enumerate(models))]
    if rep.by_step:
        lines.append("  (the run's checkpoints in training order, by the step recorded in each file; not as given)")
    lines.append("L2 distance from [0] (relative change ||d|| / ||theta_0|| in brackets):")
    lines.append(f"{'group':<14}" + "".join(f"{f'[{j}]':>22}" for j in range(1, len(models))))
    for g, m in doc["dm"].items():
        rel = doc["relative"]["components"][g]
        cells = [_fmt_cell(m[0][j], rel[0][j]) for j in range(1, len(models))]
        lines.append(f"{label(g):<14}" + "".join(f"{c:>22}" for c in cells))
    ranked = sorted(((m[a][b] or 0.0, g) for g, m in doc["blocks"].items()), reverse=True)[:5]
    if ranked:
        lines.append(f"UNet blocks moving most, [{a}] vs [{b}]: " + ", ".join(f"{g} {v:.4g}" for v, g in ranked))
    lines.append(f"tensors moving most, [{a}] vs [{b}] (L2, relative):")
    lines += [f"  {key}  {l2:.4g}  {rel:.3g}" for key, l2, rel in top_tensors(rep.result, rep.pair)]
    if "sign_agreement" in doc:
        lines.append(_signs_line(doc, a, b))
    p = rep.result.problems
    lines.append("problems: none" if not p.count() else
                 f"problems: {len(p.missing)} keys missing somewhere, {len(p.shape_mismatch)} shape mismatches, "
                 f"{len(p.non_finite)} non-finite tensors (listed under \"problems\" in drift.json)")
    lines.append("wrote: " + ", ".join(str(w) for w in rep.written))
    return lines


def _signs_line(doc: dict, a: int, b: int) -> str:
    """Sign agreement for the chosen pair, or for [1] vs the last model when the pair includes
    model 0 (whose move from itself has no sign)."""
    n = len(doc["ml"])
    if min(a, b) == 0:
        if n < 3:
            return "sign agreement: needs two models besides [0] (the moves are counted from [0])"
        a, b = 1, n - 1
    cells = [f"{g} {m[a][b]:.3f}" for g, m in doc["sign_agreement"]["components"].items() if m[a][b] is not None]
    return (f"sign agreement of the moves from [0], [{a}] vs [{b}] (0.5 unrelated, 1 same way): "
            + (", ".join(cells) or "nothing moved in both"))


def _fmt_cell(v: float | None, rel: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4g} ({rel:.2g})" if rel is not None else f"{v:.4g}"
