"""The "learned / forgot" chart of a probe table: loss, drift and image scores over steps."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from tunelab.probe.sets import BANDS

_COLOURS = {"learn": "tab:blue", "preserve": "tab:red"}
_BAND_STYLE = {"low": ":", "mid": "-.", "high": "--"}


def series(rows: Iterable[dict[str, Any]], set_name: str, metric: str, band: str | None = None) -> tuple[list[int], list[float]]:
    """(steps, values): the mean over timesteps (or one band's) of one set's metric, per step."""
    acc: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        if r["set"] == set_name and r["metric"] == metric and (band is None or r["band"] == band):
            acc[r["step"]].append(r["value"])
    steps = sorted(acc)
    return steps, [sum(acc[s]) / len(acc[s]) for s in steps]


def plot_probes(rows: list[dict[str, Any]], out: Path, title: str = "") -> Path:
    """Panels: learn / preserve loss; drift from the base (per noise band, thin); image scores if any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = sorted({r["metric"] for r in rows if r["metric"].startswith("score/")})
    panels = 3 if scores else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.0))
    ax = axes[0]
    for name in ("learn", "preserve"):
        x, y = series(rows, name, "loss")
        if x:
            ax.plot(x, y, "o-", color=_COLOURS[name], label=f"{name} loss")
    ax.set(title="loss at fixed noise and timesteps", xlabel="step", ylabel="loss (lower: learned)")
    ax.legend(fontsize=8)
    ax = axes[1]
    for name in ("preserve", "learn"):
        x, y = series(rows, name, "drift")
        if not x:
            continue
        ax.plot(x, y, "o-", color=_COLOURS[name], label=f"{name} drift")
        for band in BANDS:
            bx, by = series(rows, name, "drift", band)
            ax.plot(bx, by, _BAND_STYLE[band], color=_COLOURS[name], linewidth=0.8, alpha=0.7, label=f"  {band} noise")
    ax.set(title="prediction drift from the base", xlabel="step", ylabel="mean squared difference (higher: moved)")
    ax.legend(fontsize=7, ncol=2)
    if scores:
        ax = axes[2]
        for metric in scores:
            for name in ("learn", "preserve"):
                x, y = series(rows, name, metric)
                if x:
                    ax.plot(x, [100 * v for v in y], "o-" if metric.endswith("/all") else "s--", color=_COLOURS[name],
                            label=f"{name} {metric.removeprefix('score/')}")
        ax.set(title="image scores", xlabel="step", ylabel="%", ylim=(-3, 103))
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
