"""`tunelab merge back`: the finetune merged back into its base at several ratios ("215c Evo" is
the ratio 0.5), one candidate per ratio, and on request what each candidate learned and forgot.

    candidate(r) = (1 - r) base + r finetune        (r on the parts named by `parts`, 0 elsewhere)

Each candidate is an sd-mecha weighted sum (`presets.build`) written with its `.mecha`. With a
run directory the probes measure every candidate on the run's own probe inputs (learn loss on its
held-out images, drift from the base on the preserve set; image scores with the run's scorer), and
with `drift` the weight distance from the base is added. One table (`merge-back.csv`, `.json`) and
one chart (`merge-back.png`) hold them all; the run report shows them.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import TunelabError
from tunelab.merge.presets import Ratio, build
from tunelab.merge.run import merge_recipe
from tunelab.run import write_text_atomic

log = logging.getLogger(__name__)

TABLE = "merge-back"
COLUMNS = ("probe/learn_loss", "probe/preserve_loss", "probe/drift_learn", "probe/drift_preserve")


@dataclass
class BackResult:
    out: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def parse_ratios(text: str) -> list[float]:
    try:
        ratios = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise TunelabError(f"--ratios {text!r}: give numbers separated by commas, e.g. 0.25,0.5,0.75") from None
    if not ratios or any(not 0.0 <= r <= 1.0 for r in ratios):
        raise TunelabError(f"--ratios {text!r}: each ratio is the finetune's share, from 0 (the base) to 1 (the finetune)")
    return sorted(set(ratios))


def _ratio(r: float, parts: list[str] | None) -> Ratio:
    if not parts:
        return Ratio(r)
    return Ratio(0.0, components={p: r for p in parts})


def merge_back(base: Path, finetune: Path, ratios: list[float], out: Path, parts: list[str] | None = None,
               run: Path | None = None, probe: bool = False, drift: bool = False, dtype: str = "fp16",
               progress: bool = True, grid: bool = False) -> BackResult:
    from tunelab.models.vocab import parse_component

    parts = [parse_component(p) for p in parts] if parts else None
    if probe and run is None:
        raise TunelabError("--probe measures the candidates on a run's probe inputs: give --run (the finetune's run "
                           "directory, trained with [probe] enabled, or any run: its inputs are built)")
    if grid and run is None:
        raise TunelabError("--grid renders the run's [grid] prompts and seeds for each candidate: give --run")
    out.mkdir(parents=True, exist_ok=True)
    result = BackResult(out)
    files = []
    for r in ratios:
        path = out / f"back-{r:.3g}.safetensors"
        merged = merge_recipe(build("weighted_sum", [base, finetune], alpha=_ratio(r, parts)), path, dtype, progress=progress)
        files.append(merged.path)
        result.rows.append({"ratio": r, "file": merged.path.name, "parts": ",".join(parts) if parts else "all"})
        log.info("ratio %.3g -> %s", r, merged.path)
    if probe:
        _probe(result, files, base, finetune, run, progress)
    if drift:
        _drift(result, files, base, finetune, progress)
    if grid:
        _grids(result, [base, *files, finetune], run)
    result.files = files + _write(result)
    return result


def _probe(result: BackResult, files: list[Path], base: Path, finetune: Path, run: Path, progress: bool) -> None:
    from tunelab.probe.command import ProbeOptions, run_probe

    rep = run_probe([*files, finetune], result.out, ProbeOptions(base=str(base), run=str(run)), progress=progress,
                    table=f"{TABLE}-probes", steps=list(range(1, len(files) + 2)))
    by_name = {c.name: c.scalars for c in rep.checkpoints}
    base_row = {"ratio": 0.0, "file": base.name, "parts": "base"} | {k: by_name.get("base", {}).get(k) for k in COLUMNS}
    for row, f in zip(result.rows, files):
        scalars = by_name.get(f.stem, {})
        row.update({k: scalars.get(k) for k in COLUMNS})
        row.update({k: v for k, v in scalars.items() if k.endswith("_score/all")})
    ft = by_name.get(finetune.stem, {})
    result.rows.insert(0, base_row | {k: v for k, v in by_name.get("base", {}).items() if k.endswith("_score/all")})
    result.rows.append({"ratio": 1.0, "file": finetune.name, "parts": "finetune"} | {k: ft.get(k) for k in COLUMNS}
                       | {k: v for k, v in ft.items() if k.endswith("_score/all")})


def _drift(result: BackResult, files: list[Path], base: Path, finetune: Path, progress: bool) -> None:
    from tunelab.analyze.drift import run_drift

    rep = run_drift([base, *files, finetune], result.out / "drift", pair=(0, len(files) + 1), progress=progress)
    rel = rep.doc["relative"]["components"]["all"][0]
    for row in result.rows:
        name = row["file"]
        idx = 0 if name == base.name else len(files) + 1 if name == finetune.name else \
            1 + [f.name for f in files].index(name)
        row["weights/distance_from_base"] = rel[idx]


def _grids(result: BackResult, paths: list[Path], run: Path) -> None:
    """The run's [grid] for the base, every candidate and the finetune: grids/step-0000000i/ (i in
    ratio order), so each prompt and seed can be compared across the ratios."""
    from tunelab.config import parse_config
    from tunelab.models.checkpoint import load_checkpoint
    from tunelab.models.text import load_tokenizers
    from tunelab.run import RunDir
    from tunelab.sample.grid import render_training_grid

    cfg = parse_config(json.loads(RunDir(run).config.read_text()), str(RunDir(run).config))
    if not cfg.grid.prompts:
        raise TunelabError(f"--grid: the run {run} has no [grid] prompts to render")
    for i, path in enumerate(paths):
        comps = load_checkpoint(path, dtype=torch.float32)
        toks = load_tokenizers(comps.arch if cfg.model.tokenizers == "auto" else cfg.model.tokenizers)
        grid = render_training_grid(comps, toks, cfg, result.out / "grids", i).grid
        name = path.name
        for row in result.rows:
            if row["file"] == name or (i == 0 and row.get("parts") == "base"):
                row["grid"] = str(grid.relative_to(result.out))
        log.info("grid of %s: %s", name, grid)


def _write(result: BackResult) -> list[Path]:
    rows = sorted(result.rows, key=lambda r: (r["ratio"], r["parts"] != "base"))
    result.rows = rows
    cols = list(dict.fromkeys(k for r in rows for k in r))
    csv_path = result.out / f"{TABLE}.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    json_path = write_text_atomic(result.out / f"{TABLE}.json", json.dumps({"rows": rows}, indent=1, default=str) + "\n")
    return [csv_path, json_path, plot(rows, result.out / f"{TABLE}.png")]


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Learn loss and preserve drift (and scores) against the ratio: what merging back keeps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[float], list[float]]:
        pts = [(r["ratio"], r[key]) for r in rows if r.get(key) is not None and math.isfinite(float(r[key]))]
        return [p[0] for p in pts], [float(p[1]) for p in pts]

    scores = sorted({k for r in rows for k in r if k.endswith("_score/all")})
    panels = 1 + bool(scores)
    fig, axes = plt.subplots(1, panels, figsize=(5.4 * panels, 3.8), squeeze=False)
    ax = axes[0][0]
    lines = [(k, c, lab) for k, c, lab in (("probe/learn_loss", "tab:blue", "learn loss (held out)"),
                                           ("probe/drift_preserve", "tab:red", "preserve drift from the base"),
                                           ("weights/distance_from_base", "tab:gray", "weight distance from the base"))
             if series(k)[0]]
    for i, (key, colour, label) in enumerate(lines[:2]):  # two axes: left and right
        axis = ax if i == 0 else ax.twinx()
        x, y = series(key)
        axis.plot(x, y, "o-", color=colour, label=label)
        axis.set_ylabel(label, color=colour)
    if not lines:
        ax.text(0.5, 0.5, "merged; measure with --run RUN --probe or --drift", ha="center", va="center",
                transform=ax.transAxes)
    ax.set(xlabel="ratio (0 = base, 1 = finetune)", title="merge back: learned / forgot per ratio")
    if scores:
        ax2 = axes[0][1]
        for key in scores:
            x, y = series(key)
            ax2.plot(x, [100 * v for v in y], "o-", label=key.removeprefix("probe/").removesuffix("/all"))
        ax2.set(xlabel="ratio", ylabel="drawn right (%)", title="image scores", ylim=(0, 105))
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
