"""Plots of a drift report (the JSON document of `tunelab.analyze.drift_write.report`).

- `trajectory.png`: distance of every model from the first, in the order compared, one line per
  component; absolute L2 on the left, relative change on the right (components differ by orders
  of magnitude in size, so the relative panel is the one to compare them on; log scale).
- `heatmaps.png`: the N x N distance matrix of each component and of `all`, a panel each.
- `map.png`: the checkpoints as points on a plane whose distances match the matrix as well as two
  dimensions allow (classical MDS), joined in the order compared; a panel per component.
- `blocks_<a>_vs_<b>.png`: L2 and relative change per UNet block for one pair.

Uses matplotlib's object API (`Figure`, no pyplot): no global state, no GUI backend, safe in
worker threads and on headless machines.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from tunelab.models.vocab import label

log = logging.getLogger(__name__)

COLORS = {"te1": "tab:orange", "te2": "tab:red", "unet": "tab:blue", "vae": "tab:green",
          "other": "tab:gray", "all": "black"}
MAX_ANNOTATED = 12  # cell values are written into heatmaps up to this many models


def _short(name: str, width: int = 28) -> str:
    """File names can be long; keep the end, where step numbers and suffixes live."""
    name = name.removesuffix(".safetensors")
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _array(m: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in m], dtype=float)


def write_plots(doc: dict, out: Path, pair: tuple[int, int]) -> list[Path]:
    """Draw every plot into `out`; returns the files written."""
    written = [plot_trajectory(doc, out / "trajectory.png")]
    written.append(plot_heatmaps(doc, out / "heatmaps.png"))
    written.append(plot_map(doc, out / "map.png"))
    if doc["blocks"]:
        a, b = pair
        written.append(plot_blocks(doc, pair, out / f"blocks_{a}_vs_{b}.png"))
    else:
        log.info("drift: no UNet tensors, so no per-block chart")
    return written


def plot_trajectory(doc: dict, path: Path) -> Path:
    models = doc["ml"]
    x = np.arange(len(models))
    fig = Figure(figsize=(max(9.0, 1.2 * len(models) + 5), 4.8), layout="constrained")
    ax_abs, ax_rel = fig.subplots(1, 2)
    for name, m in doc["dm"].items():
        style = dict(color=COLORS.get(name), marker="o", lw=2.2 if name == "all" else 1.6,
                     ls="--" if name == "all" else "-", label=label(name))
        ax_abs.plot(x, _array(m)[0], **style)
        rel = _array(doc["relative"]["components"][name])[0]
        rel[~(rel > 0)] = np.nan  # zero (the start, identical files) cannot sit on a log axis
        if np.isfinite(rel).any():
            ax_rel.plot(x, rel, **style)
    ax_abs.set_title("L2 distance from the first model")
    ax_abs.set_ylabel("‖θ − θ₀‖")
    ax_rel.set_title("relative change ‖θ − θ₀‖ / ‖θ₀‖ (zeros not drawn)")
    ax_rel.set_yscale("log")
    for ax in (ax_abs, ax_rel):
        ax.set_xticks(x, [f"[{i}] {_short(m, 18)}" for i, m in enumerate(models)], rotation=30, ha="right",
                      fontsize=8)
        ax.grid(alpha=0.3)
    ax_abs.legend(title="component", fontsize=8)
    order = "training order" if doc.get("order") == "training step" else "command-line order"
    fig.suptitle(f"Weight drift over {len(models)} checkpoints ({order})")
    fig.savefig(path, dpi=110)
    return path


def plot_heatmaps(doc: dict, path: Path) -> Path:
    """One panel per component (and `all`), each on its own colour scale: components differ by
    orders of magnitude. Axes carry the model indices; the index -> file legend is underneath."""
    models, names = doc["ml"], list(doc["dm"])
    n, k = len(models), len(names)
    cols = min(3, k)
    rows = -(-k // cols)
    annotate = n <= MAX_ANNOTATED
    side = max(3.2, 0.42 * n + 1.6)
    legend_h = 0.22 * -(-n // 2) + 0.3
    fig = Figure(figsize=(cols * (side + (0 if annotate else 0.9)), rows * side + legend_h + 0.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, name in zip(axes, names):
        d = _array(doc["dm"][name])
        im = ax.imshow(np.ma.masked_invalid(d), cmap="viridis")
        ax.set_xticks(range(n), [str(i) for i in range(n)], fontsize=8)
        ax.set_yticks(range(n), [str(i) for i in range(n)], fontsize=8)
        ax.set_title(label(name), fontsize=11)
        if annotate:
            top = np.nanmax(d) if np.isfinite(d).any() else 0.0
            for i in range(n):
                for j in range(n):
                    v = d[i, j]
                    text = "n/a" if not np.isfinite(v) else f"{v:.3g}"
                    # Dark cells get white text; viridis is dark at the low end.
                    color = "white" if not np.isfinite(v) or v <= 0.6 * top else "black"
                    ax.text(j, i, text, ha="center", va="center", fontsize=7 if n > 6 else 8, color=color)
        else:
            fig.colorbar(im, ax=ax, shrink=0.8)
    for ax in axes[k:]:
        ax.set_axis_off()
    legend = [f"[{i}] {_short(m, 40)}" for i, m in enumerate(models)]
    lines = ["      ".join(legend[i : i + 2]) for i in range(0, n, 2)]  # two per line, in index order
    fig.supxlabel("\n".join(lines), fontsize=8, ha="center")
    fig.suptitle("Pairwise L2 distance per component (row / column = model index)")
    fig.savefig(path, dpi=110)
    return path


def mds_2d(d: np.ndarray) -> tuple[np.ndarray, float]:
    """Classical multidimensional scaling: (N, 2) points whose distances approximate the N x N
    distance matrix `d`, and the share of the structure the two axes keep (their eigenvalues over
    the sum of the positive ones; 1.0 when the points truly lie in a plane)."""
    n = len(d)
    centre = np.eye(n) - 1.0 / n
    b = -0.5 * centre @ (d * d) @ centre
    w, v = np.linalg.eigh(b)
    order = np.argsort(w)[::-1]
    w, v = w[order], v[:, order]
    keep = np.clip(w[:2], 0.0, None)
    points = np.zeros((n, 2))
    points[:, : len(keep)] = v[:, : len(keep)] * np.sqrt(keep)
    positive = np.clip(w, 0.0, None).sum()
    return points, float(keep.sum() / positive) if positive > 0 else 1.0


def plot_map(doc: dict, path: Path) -> Path:
    """The checkpoints as points on a plane, one panel per component: placed so that their distances
    match the N x N matrix as well as two dimensions allow (classical MDS), joined in command-line
    order. A straight run of steps shows as a line, a run that turns as a bend, and two finetunes
    of one base as two arms."""
    models, names = doc["ml"], list(doc["dm"])
    n, k = len(models), len(names)
    cols = min(3, k)
    rows = -(-k // cols)
    fig = Figure(figsize=(cols * 4.4, rows * 4.2 + 0.35 * -(-n // 2) + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, name in zip(axes, names):
        d = _array(doc["dm"][name])
        ax.set_title(label(name), fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
        if not np.isfinite(d).all():
            ax.text(0.5, 0.5, "some pairs share no tensor", ha="center", va="center", transform=ax.transAxes)
            continue
        if not d.any():
            ax.text(0.5, 0.5, "identical in every model", ha="center", va="center", transform=ax.transAxes)
            continue
        pts, kept = mds_2d(d)
        ax.plot(pts[:, 0], pts[:, 1], "-", color=COLORS.get(name, "black"), lw=1.4, alpha=0.7, zorder=1)
        ax.scatter(pts[:, 0], pts[:, 1], c=np.arange(n), cmap="viridis", s=60, zorder=2, edgecolors="black")
        for i, (x, y) in enumerate(pts):
            ax.annotate(str(i), (x, y), xytext=(5, 5), textcoords="offset points", fontsize=9)
        ax.set_aspect("equal", adjustable="datalim")
        ax.margins(0.15)
        scale = np.nanmax(d)
        ax.set_xlabel(f"largest distance {scale:.3g}; the plane keeps {100 * kept:.0f} %", fontsize=8)
    for ax in axes[k:]:
        ax.set_axis_off()
    legend = [f"[{i}] {_short(m, 40)}" for i, m in enumerate(models)]
    fig.supxlabel("\n".join("      ".join(legend[i : i + 2]) for i in range(0, n, 2)), fontsize=8)
    fig.suptitle("Checkpoint map: points placed by their pairwise L2 distances (classical MDS), joined in file order")
    fig.savefig(path, dpi=110)
    return path


def plot_blocks(doc: dict, pair: tuple[int, int], path: Path) -> Path:
    a, b = pair
    names = list(doc["blocks"])
    l2 = np.array([_array(doc["blocks"][g])[a, b] for g in names])
    rel = np.array([_array(doc["relative"]["blocks"][g])[a, b] for g in names])
    fig = Figure(figsize=(max(9.0, 0.45 * len(names) + 3), 6.4), layout="constrained")
    ax_abs, ax_rel = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(names))
    colors = [_block_color(g) for g in names]
    ax_abs.bar(x, np.nan_to_num(l2), color=colors)
    ax_abs.set_ylabel("L2 distance")
    ax_rel.bar(x, np.nan_to_num(rel), color=colors)
    ax_rel.set_ylabel(f"relative change\n‖Δ‖ / ‖θ[{a}]‖")
    ax_rel.set_xticks(x, names, rotation=60, fontsize=8)
    for ax in (ax_abs, ax_rel):
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(bottom=0.0)
    if not np.nan_to_num(l2).any():
        ax_abs.text(0.5, 0.5, "identical in every UNet block", transform=ax_abs.transAxes, ha="center", fontsize=12)
    models = doc["ml"]
    fig.suptitle(f"UNet blocks: [{a}] {_short(models[a])}  vs  [{b}] {_short(models[b])}")
    fig.savefig(path, dpi=110)
    return path


def _block_color(name: str) -> str:
    """Input, middle and output blocks in three hues, so the U shape reads at a glance."""
    if name.startswith("IN"):
        return "tab:blue"
    if name == "M00":
        return "tab:purple"
    if name.startswith("OUT"):
        return "tab:orange"
    return "tab:gray"
