"""`tunelab toy experiment NAME`: the seed's comparisons in miniature, over several seeds.

Each experiment finetunes the shipped toy base on one split (the concept `astolfo`, or the
outline style) in a few arms that differ in one setting, once per seed, and reads what every
finetune draws (`toy.evaluate`): concept accuracy (learned) and preserve accuracy (kept). It
prints mean ± spread per arm and writes `results.csv` (one row per arm and seed),
`summary.md` (the table) and `summary.png` (the plot) into its folder.

With probes on (`FinetuneSettings.probe`, the command's default) every finetune also records
the probe's numbers (docs/probes.md): the learn loss on 16 held-out images of the split, and the
prediction drift from the base on the preserve looks. The summary then gives the rank
correlation, over every finetune, between preserve drift (needs no images) and preserve
accuracy lost (needs rendering and reading): whether the cheap number tells the same story.
"""

from __future__ import annotations

import csv
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from tunelab.toy.finetune import FinetuneSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arm:
    name: str
    settings: FinetuneSettings


@dataclass(frozen=True)
class Experiment:
    name: str
    question: str
    arms: Callable[[FinetuneSettings], list[Arm]]
    split: str = "concept"
    learn_set: str = "concept"  # the set whose accuracy says "learned"


def _tte(s: FinetuneSettings) -> list[Arm]:
    full = s.but(unet="full")
    return [Arm("off", full.but(text_encoder="off")), Arm("on", full.but(text_encoder="on")),
            Arm("only", full.but(text_encoder="only"))]


def _unet_parts(s: FinetuneSettings) -> list[Arm]:
    return [Arm(name, s.but(text_encoder="on", unet=name)) for name in ("full", "unet71", "unet63")]


def _lr(s: FinetuneSettings) -> list[Arm]:
    return [Arm(f"{f:g}x", s.but(lr_unet=s.lr_unet * f, lr_text=s.lr_text * f)) for f in (0.3, 1.0, 3.0)]


def _bf16(s: FinetuneSettings) -> list[Arm]:
    # The field's ratio: UNet 1.5e-6, text encoders 1.2e-5 (8x); scaled to the toy's step count.
    field_ratio = s.but(lr_unet=s.lr_text / 8 * 2, lr_text=s.lr_text * 2)
    bf16 = field_ratio.but(mixed_precision="bf16", full_bf16=True)
    return [Arm("fp32 master", field_ratio), Arm("full_bf16 nearest", bf16.but(bf16_update="nearest")),
            Arm("full_bf16 stochastic", bf16.but(bf16_update="stochastic")), Arm("full_bf16 exact", bf16.but(bf16_update="exact"))]


def _accumulation(s: FinetuneSettings) -> list[Arm]:
    # 4 GPUs x batch 1 x accumulation 4 = 16 (here: 1 process x batch 4 x 4, the same sums);
    # the mistake: the same run file on 1 GPU, effective batch 4.
    return [Arm("effective 16", s.but(batch=4, grad_accumulation=4)),
            Arm("effective 4 (1 GPU)", s.but(batch=1, grad_accumulation=4))]


EXPERIMENTS = {
    "tte": Experiment("tte", "text encoders off / on / only, for a concept named by a word the base never saw", _tte),
    "unet-parts": Experiment("unet-parts", "the full UNet vs 71 % vs 63 %, text encoders on, at the same LR",
                             _unet_parts),
    "lr": Experiment("lr", "learning rate x0.3 / x1 / x3 (text encoders on, 71 % UNet)", _lr),
    "bf16": Experiment("bf16", "fp32 master weights vs full_bf16 with round-to-nearest, stochastic rounding or exact updates at the "
                       "field's LR ratio", _bf16),
    "accumulation": Experiment("accumulation", "effective batch 16 as intended vs 4 (the run moved to 1 GPU)",
                               _accumulation),
}


@dataclass
class ArmResult:
    arm: str
    seed: int
    learned: float
    kept: float
    seconds: float
    settings: dict = field(default_factory=dict)
    probe: dict = field(default_factory=dict)  # the probe's scalars at the last step (probe/learn_loss, ...)


@dataclass
class ExperimentResult:
    name: str
    base_learned: float
    base_kept: float
    rows: list[ArmResult]
    files: dict[str, Path]
    base_probe: dict = field(default_factory=dict)  # the probe at step 0 (the base): its losses

    def summary(self) -> list[tuple[str, float, float, float, float]]:
        """(arm, learned mean, learned spread, kept mean, kept spread) per arm, in arm order."""
        out = []
        for arm in dict.fromkeys(r.arm for r in self.rows):
            rows = [r for r in self.rows if r.arm == arm]
            learned, kept = [r.learned for r in rows], [r.kept for r in rows]
            out.append((arm, statistics.fmean(learned), _spread(learned), statistics.fmean(kept), _spread(kept)))
        return out


    def probe_summary(self) -> list[tuple[str, float, float, float, float]]:
        """(arm, learn loss mean, spread, preserve drift mean, spread) per arm; [] without probes."""
        out = []
        for arm in dict.fromkeys(r.arm for r in self.rows if r.probe):
            rows = [r for r in self.rows if r.arm == arm and r.probe]
            loss, drift = [r.probe["probe/learn_loss"] for r in rows], [r.probe["probe/drift_preserve"] for r in rows]
            out.append((arm, statistics.fmean(loss), _spread(loss), statistics.fmean(drift), _spread(drift)))
        return out

    def drift_vs_forgetting(self) -> float | None:
        """Spearman rank correlation over every finetune of preserve drift and preserve accuracy lost."""
        rows = [r for r in self.rows if r.probe]
        if len(rows) < 3:
            return None
        return spearman([r.probe["probe/drift_preserve"] for r in rows], [self.base_kept - r.kept for r in rows])


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (nan when either side is constant)."""
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / (sxx * syy) ** 0.5 if sxx and syy else float("nan")


def _probe_numbers(run: Path, step: int | None = None) -> dict[str, float]:
    """The probe's scalars of a toy run at `step` (default: its last probe)."""
    from tunelab.probe.suite import TRAINING, read_table

    rows = read_table(run / "probes" / f"{TRAINING}.parquet")
    if not rows:
        return {}
    at = max(r["step"] for r in rows) if step is None else step
    sums: dict[str, list[float]] = {}
    for r in rows:
        if r["step"] == at and not r["metric"].startswith("score/"):
            tag = f"probe/{r['set']}_loss" if r["metric"] == "loss" else f"probe/drift_{r['set']}"
            sums.setdefault(tag, []).append(r["value"])
    return {tag: statistics.fmean(v) for tag, v in sums.items()}


def run_experiment(name: str, out: str | Path, seeds: int = 3, settings: FinetuneSettings = FinetuneSettings(),
                   eval_seeds: tuple[int, ...] = (11, 12), eval_steps: int = 30, images: int = 48) -> ExperimentResult:
    from tunelab.errors import TunelabError
    from tunelab.toy.evaluate import evaluate_file
    from tunelab.toy.finetune import finetune, prepare
    from tunelab.toy.pretrain import shipped_base

    if name not in EXPERIMENTS:
        raise TunelabError(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}")
    exp = EXPERIMENTS[name]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = shipped_base()
    data = prepare(out / "data", base, split=exp.split, n=images, held_out=16 if settings.probe else 0)
    sets = (exp.learn_set, "preserve")
    before = evaluate_file(str(base), sets, seeds=eval_seeds, steps=eval_steps)
    log.info("%s: %s\n  base: learned %.0f %%, kept %.0f %%", name, exp.question, 100 * before[sets[0]].accuracy,
             100 * before["preserve"].accuracy)
    rows, base_probe = [], {}
    for arm in exp.arms(settings):
        for seed in range(seeds):
            t = time.perf_counter()
            s = arm.settings.but(seed=seed)
            run = out / "runs" / f"{_slug(arm.name)}-seed{seed}"
            last = finetune(run, base, data, s, name=f"{name}-{arm.name}", isolated=True)
            scores = evaluate_file(str(last), sets, seeds=eval_seeds, steps=eval_steps)
            rows.append(ArmResult(arm.name, seed, scores[sets[0]].accuracy, scores["preserve"].accuracy,
                                  time.perf_counter() - t, asdict(s), _probe_numbers(run)))
            base_probe = base_probe or _probe_numbers(run, 0)
            probed = rows[-1].probe
            extra = (f", learn loss {probed['probe/learn_loss']:.4f}, preserve drift {probed['probe/drift_preserve']:.3g}"
                     if probed else "")
            log.info("  %-20s seed %d: learned %5.1f %%, kept %5.1f %%%s  [%.0f s]", arm.name, seed,
                     100 * rows[-1].learned, 100 * rows[-1].kept, extra, rows[-1].seconds)
    result = ExperimentResult(name, before[sets[0]].accuracy, before["preserve"].accuracy, rows, {}, base_probe)
    result.files = _write(result, exp, out)
    for line in summary_lines(result):
        log.info("%s", line)
    return result


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def summary_lines(result: ExperimentResult) -> list[str]:
    n = len({r.seed for r in result.rows})
    lines = ["| arm | learned (concept) | kept (preserve) |", "| --- | --- | --- |",
             f"| base (before) | {100 * result.base_learned:.1f} % | {100 * result.base_kept:.1f} % |"]
    for arm, lm, ls, km, ks in result.summary():
        lines.append(f"| {arm} | {100 * lm:.1f} ± {100 * ls:.1f} % | {100 * km:.1f} ± {100 * ks:.1f} % |")
    lines.append(f"mean ± standard deviation over {n} seed(s); "
                 f"{sum(r.seconds for r in result.rows):.0f} s of finetuning and scoring")
    probes = result.probe_summary()
    if probes:
        base_loss = result.base_probe.get("probe/learn_loss", float("nan"))
        lines += ["", "| arm | learn loss (held out) | preserve drift from the base |", "| --- | --- | --- |",
                  f"| base (before) | {base_loss:.4f} | 0 |"]
        lines += [f"| {arm} | {lm:.4f} ± {ls:.4f} | {dm:.4g} ± {ds:.2g} |" for arm, lm, ls, dm, ds in probes]
        rho = result.drift_vs_forgetting()
        if rho is not None:
            lines.append(f"rank correlation (Spearman) of preserve drift and preserve accuracy lost over the "
                         f"{sum(1 for r in result.rows if r.probe)} finetunes: {rho:+.2f}")
    return lines


def _write(result: ExperimentResult, exp: Experiment, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {"csv": out / "results.csv", "md": out / "summary.md", "png": out / "summary.png"}
    with open(files["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "seed", "learned", "kept", "seconds", "learn_loss", "preserve_loss", "drift_learn",
                    "drift_preserve"])
        for r in result.rows:
            p = [r.probe.get(t) for t in ("probe/learn_loss", "probe/preserve_loss", "probe/drift_learn",
                                          "probe/drift_preserve")]
            w.writerow([r.arm, r.seed, f"{r.learned:.4f}", f"{r.kept:.4f}", f"{r.seconds:.1f}"]
                       + ["" if v is None else f"{v:.6g}" for v in p])
    files["md"].write_text(f"# toy experiment `{exp.name}`\n\n{exp.question}\n\n" + "\n".join(summary_lines(result)) + "\n")
    summary = result.summary()
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(summary), 3.6))
    xs = range(len(summary))
    ax.bar([x - 0.18 for x in xs], [100 * s[1] for s in summary], 0.36, yerr=[100 * s[2] for s in summary],
           label="learned (concept)", color="#d96aa7", capsize=3)
    ax.bar([x + 0.18 for x in xs], [100 * s[3] for s in summary], 0.36, yerr=[100 * s[4] for s in summary],
           label="kept (preserve)", color="#4a7bd0", capsize=3)
    ax.axhline(100 * result.base_learned, color="#d96aa7", ls=":", lw=1, label="base: concept")
    ax.axhline(100 * result.base_kept, color="#4a7bd0", ls=":", lw=1, label="base: preserve")
    ax.set_xticks(list(xs), [s[0] for s in summary])
    ax.set_ylim(0, 105)
    ax.set_ylabel("drawn right (%)")
    ax.set_title(f"toy experiment: {exp.name}", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(files["png"], dpi=110)
    plt.close(fig)
    files["html"] = _report(result, exp, out)
    return files


def _report(result: ExperimentResult, exp: Experiment, out: Path) -> Path:
    """The arms side by side (their first seed): settings that differ, loss, probes, last grids, drift."""
    from tunelab.report import write_report

    first = min(r.seed for r in result.rows)
    runs = [out / "runs" / f"{_slug(arm)}-seed{first}" for arm in dict.fromkeys(r.arm for r in result.rows)]
    return write_report(runs, out / "report.html", progress=False,
                        title=f"toy experiment {exp.name}: {exp.question} (seed {first} of each arm)")
