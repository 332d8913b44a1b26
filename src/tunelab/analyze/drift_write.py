"""The files of `tunelab drift`: the JSON document (the field's `ml` / `dm` layout first, then
tunelab's sections), drift.csv (one row per pair, one column per group) and tensors.csv (one row
per tensor and pair), each written through a temporary file renamed into place.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from tunelab.analyze.drift_groups import TENSOR_METRICS, GroupDrift, groupings, tensor_figures
from tunelab.analyze.drift_scan import DriftScan
from tunelab.run import write_atomic

DEFINITIONS = {
    "dm": "L2 distance sqrt(sum over the group's tensors of ||theta_i - theta_j||^2), over tensors both models hold",
    "relative": "||theta_i - theta_j|| / ||theta_a||, a = whichever of i, j comes first in ml",
    "cosine_models": "cos(theta_i, theta_j) over the group's tensors (close to 1 for finetunes of one base)",
    "cosine_deltas": "cos(theta_i - theta_0, theta_j - theta_0), theta_0 = ml[0]; null in row/column 0",
    "sign_agreement": "(with --signs) of the weights both i and j moved away from theta_0, the share moved the same "
                      "way: 0.5 unrelated, 1 same direction; null in row/column 0",
    "blocks": "UNet blocks: EMB (time/label embeddings), IN00-IN08, M00, OUT00-OUT08, FINAL (out.*)",
    "kinds": "UNet tensors by layer kind: self-attention (attn1), cross-attention (attn2), other",
    "null": "pair not comparable (no shared tensor in the group)",
    "groups": "only groups holding at least one tensor appear; dm always has 'all'",
    "order": "the order of ml: 'training step' (a run's checkpoints, by the step each was written at; a first "
             "file from elsewhere stays first) or 'as given' (the command line's)",
}


def _matrix(a: np.ndarray) -> list[list[float | None]]:
    return [[float(v) if np.isfinite(v) else None for v in row] for row in a]


def _section(groups: dict[str, GroupDrift], metric: str) -> dict[str, list[list[float | None]]]:
    return {name: _matrix(getattr(g, metric)()) for name, g in groups.items()}


def report(result: DriftScan) -> dict:
    """The JSON document: the field's `ml` / `dm` layout first, then tunelab's extra sections."""
    gs = groupings(result)
    doc: dict = {"ml": result.models, "dm": _section(gs["components"], "distance")}
    doc["files"] = [str(p) for p in result.paths]
    doc["blocks"] = _section(gs["blocks"], "distance")
    doc["kinds"] = _section(gs["kinds"], "distance")
    metrics = ("relative", "cosine_models", "cosine_deltas") + (("sign_agreement",) if result.signs else ())
    for metric in metrics:
        doc[metric] = {part: _section(gs[part], metric) for part in ("components", "blocks", "kinds")}
    doc["tensors"] = {part: {name: g.n_tensors for name, g in groups.items()} for part, groups in gs.items()}
    doc["problems"] = result.problems.as_dict()
    doc["definitions"] = DEFINITIONS
    return doc


def _pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def write_pairs_csv(doc: dict, path: Path) -> None:
    """One row per pair, one column per group: `component.unet`, `block.IN04`, `kind.cross-attention`."""
    cols = [(f"component.{g}", m) for g, m in doc["dm"].items()]
    cols += [(f"block.{g}", m) for g, m in doc["blocks"].items()]
    cols += [(f"kind.{g}", m) for g, m in doc["kinds"].items()]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model_a", "model_b", *(c for c, _ in cols)])
        for i, j in _pairs(len(doc["ml"])):
            w.writerow([doc["ml"][i], doc["ml"][j], *("" if m[i][j] is None else f"{m[i][j]:.9g}" for _, m in cols)])


def write_tensors_csv(result: DriftScan, path: Path) -> None:
    """One row per tensor and pair: where it lives and how it moved (for "which tensors moved most")."""
    n = len(result.models)
    figures = tensor_figures(result)
    metrics = [figures[m] for m in TENSOR_METRICS]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "component", "block", "kind", "numel", "model_a", "model_b", *TENSOR_METRICS])
        for k, t in enumerate(result.tensors):
            where = [t.key, t.component, t.block or "", t.kind or "", t.numel]
            for i, j in _pairs(n):
                if np.isfinite(t.sq[i, j]):
                    w.writerow([*where, result.models[i], result.models[j], *(_num(m[k, i, j]) for m in metrics)])


def _num(v: float) -> str:
    return f"{v:.9g}" if np.isfinite(v) else ""


def write_outputs(doc: dict, result: DriftScan, out: Path) -> list[Path]:
    """drift.json, drift.csv and tensors.csv into `out` (created if needed); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "drift.json", out / "drift.csv", out / "tensors.csv"]
    write_atomic(written[0], lambda p: p.write_text(json.dumps(doc, indent=1) + "\n"))
    write_atomic(written[1], lambda p: write_pairs_csv(doc, p))
    write_atomic(written[2], lambda p: write_tensors_csv(result, p))
    return written
