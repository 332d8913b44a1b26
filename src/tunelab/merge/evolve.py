"""`tunelab merge evolve`: CMA-ES over per-part merge ratios, the fitness measured by the probes.

    candidate(w) = base + sum_i  w[i, g(key)] * (model_i - base)      g: the key's part

The parts are the two text encoders and the UNet's 21 blocks (`space = "blocks"`), or te1, te2 and
the UNet as a whole (`"components"`); the VAE and keys of no part keep the base. Each candidate is
mixed in memory, in the live modules, from task vectors computed once (no file per evaluation), and
measured on the finetune's run's probe inputs:

    fitness = sum of weight x probe number       (lower is better; default learn_loss + drift_preserve)

with any probe scalar (`probe/learn_loss`, `probe/drift_preserve`, `probe/preserve_loss`, a
scorer's `probe/preserve_score/all` with a negative weight, ...). The search is the `cma`
package's CMA-ES (mergekit-evolve's choice; x0 = the uniform ratio 0.5, sigma0 = 1/6, bounds
[0, 1]); the same budget of uniform ratios (a grid from 0 to 1, what `merge back` tries) is
measured first as the baseline. After each generation the optimizer (and NumPy's random state, which
CMA-ES samples from) is saved atomically: a killed search started again with the same command
resumes there and ends exactly where an uninterrupted one ends. The winner is written by sd-mecha
(`best.safetensors` with `best.mecha`), with `history.csv`, `summary.json` and `evolve.png`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import pickle
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

STATE = "state.pkl"
SPACES = ("blocks", "components")


@dataclass
class EvolveSettings:
    budget: int = 60  # evaluations of the search (the uniform baseline gets as many)
    space: str = "blocks"
    fitness: dict[str, float] = field(default_factory=lambda: {"probe/learn_loss": 1.0, "probe/drift_preserve": 1.0})
    popsize: int = 0  # 0: CMA-ES's default, 4 + 3 ln(dimensions)
    sigma0: float = 1 / 6
    seed: int = 0


def parse_fitness(text: str) -> dict[str, float]:
    """`learn_loss=1,drift_preserve=2` (the `probe/` prefix may be left out)."""
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = item.partition("=")
        try:
            out[name if name.startswith(("probe/", "weights/")) else f"probe/{name}"] = float(value) if eq else 1.0
        except ValueError:
            raise TunelabError(f"--fitness {item!r}: give NAME=WEIGHT, e.g. learn_loss=1,drift_preserve=2") from None
    if not out:
        raise TunelabError("--fitness names at least one probe number, e.g. learn_loss=1,drift_preserve=1")
    return out


def part_of(sgm_key: str, space: str) -> str | None:
    """The search part a key belongs to (None: it keeps the base)."""
    from tunelab.models.blocks import component_of, unet_block_of

    comp = component_of(sgm_key)
    if comp in ("te1", "te2"):
        return comp
    if comp == "unet":
        return unet_block_of(sgm_key) if space == "blocks" else "unet"
    return None


class Mixer:
    """Live modules of the base, and each model's difference from it per parameter and part."""

    def __init__(self, base: Path, models: list[Path], space: str) -> None:
        from tunelab.models.checkpoint import load_checkpoint
        from tunelab.models.keys import rules_for_arch

        if space not in SPACES:
            raise TunelabError(f"--space {space!r}: choose one of {', '.join(SPACES)}")
        self.comps = load_checkpoint(base, dtype=torch.float32)
        arch = self.comps.arch
        parts_of: dict[tuple[str, str], str] = {}
        for rule in rules_for_arch(arch):
            part = part_of(rule.sgm, space)
            if part is not None:
                for name in rule.names:
                    parts_of[(rule.component, name)] = part
        from tunelab.models.blocks import block_order

        self.parts = sorted(set(parts_of.values()), key=lambda p: (p not in ("te1", "te2"), p == "te2",
                                                                   block_order(p) if p not in ("te1", "te2", "unet") else (0, 0)))
        index = {p: i for i, p in enumerate(self.parts)}
        self.params: list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], int]] = []  # live, base, deltas, part
        others = [load_checkpoint(m, dtype=torch.float32) for m in models]
        for comp_name in ("text_encoder_1", "text_encoder_2", "unet"):
            live = getattr(self.comps, comp_name).state_dict(keep_vars=True)
            theirs = [getattr(o, comp_name).state_dict() for o in others]
            for name, p in live.items():
                part = parts_of.get((comp_name, name))
                if part is None:
                    continue
                deltas = [t[name].float() - p.detach() for t in theirs]
                self.params.append((p, p.detach().clone(), deltas, index[part]))
        self.n_models = len(models)
        self.space = space
        del others

    @property
    def dims(self) -> int:
        return self.n_models * len(self.parts)

    @torch.no_grad()
    def apply(self, w: np.ndarray) -> None:
        w = np.asarray(w, dtype=np.float64).reshape(self.n_models, len(self.parts))
        for live, base, deltas, part in self.params:
            mixed = base.clone()
            for i, d in enumerate(deltas):
                if w[i, part]:
                    mixed.add_(d, alpha=float(w[i, part]))
            live.copy_(mixed)


class Fitness:
    """The probe on the run's inputs, with the candidate in the live modules."""

    def __init__(self, run: Path, mixer: Mixer, weights: dict[str, float]) -> None:
        from tunelab.config import parse_config
        from tunelab.models.text import load_tokenizers
        from tunelab.probe.suite import prepare
        from tunelab.run import RunDir

        rd = RunDir(run)
        if not rd.config.is_file():
            raise TunelabError(f"--run {run}: not a run directory (no config.json)")
        cfg = parse_config(json.loads(rd.config.read_text()), str(rd.config))
        self.cfg, self.mixer, self.weights = cfg, mixer, weights
        arch = mixer.comps.arch
        self.tokenizers = load_tokenizers(arch if cfg.model.tokenizers == "auto" else cfg.model.tokenizers)

        def base_models():
            mixer.apply(np.zeros(mixer.dims))
            return mixer.comps, self.tokenizers

        self.prepared = prepare(cfg, arch, rd.probes, base_models)
        self.evaluations = 0

    def __call__(self, w: np.ndarray) -> tuple[float, dict[str, float]]:
        from tunelab.probe.suite import measure_models
        from tunelab.train.step import StepModels

        self.mixer.apply(w)
        scalars = measure_models(self.prepared, StepModels.of(self.mixer.comps, self.tokenizers)).scalars()
        missing = [k for k in self.weights if k not in scalars]
        if missing:
            raise TunelabError(f"--fitness names {', '.join(missing)}, which the probe does not measure (it has "
                               f"{', '.join(sorted(k for k in scalars if '/' in k))})")
        self.evaluations += 1
        return float(sum(v * scalars[k] for k, v in self.weights.items())), scalars


@dataclass
class EvolveResult:
    out: Path
    best_fitness: float
    best_weights: list[float]
    uniform_fitness: float
    uniform_ratio: float
    parts: list[str]
    history: list[dict[str, Any]]
    files: list[Path]

    @property
    def improvement(self) -> float:
        return self.uniform_fitness - self.best_fitness


def evolve(base: Path, models: list[Path], run: Path, out: Path, s: EvolveSettings = EvolveSettings(),
           dtype: str = "fp16", progress: bool = True) -> EvolveResult:
    import cma

    for p in [base, *models]:
        if not Path(p).is_file():
            raise TunelabError(f"{p}: no such checkpoint")
    if s.budget < 4:
        raise TunelabError(f"--budget {s.budget}: give at least 4 evaluations")
    out.mkdir(parents=True, exist_ok=True)
    mixer = Mixer(base, models, s.space)
    fitness = Fitness(run, mixer, s.fitness)
    state_path = out / STATE
    state = _load_state(state_path, s, base, models)
    if state is None:
        history: list[dict[str, Any]] = []
        for r in np.linspace(0.0, 1.0, s.budget):  # the baseline: the same budget of uniform ratios
            f, scalars = fitness(np.full(mixer.dims, r))
            history.append(_row("uniform", len(history), float(r), f, scalars, np.full(mixer.dims, r), mixer))
        opts = {"seed": s.seed + 1, "bounds": [0.0, 1.0], "verbose": -9, "maxfevals": s.budget}
        if s.popsize:
            opts["popsize"] = s.popsize
        es = cma.CMAEvolutionStrategy(np.full(mixer.dims, 0.5), s.sigma0, opts)
        state = {"settings": asdict(s), "inputs": [str(base), *map(str, models)], "es": es, "history": history,
                 "random": np.random.get_state(), "generation": 0}
        _save_state(state_path, state)
    else:
        log.info("resuming the search at generation %d (%d evaluations done)", state["generation"],
                 sum(h["kind"] == "cma" for h in state["history"]))
    es, history = state["es"], state["history"]
    np.random.set_state(state["random"])
    t = time.perf_counter()
    while not es.stop() and sum(h["kind"] == "cma" for h in history) < s.budget:
        xs = es.ask()
        left = s.budget - sum(h["kind"] == "cma" for h in history)
        xs = xs[:left] if left < len(xs) else xs
        fs = []
        for x in xs:
            f, scalars = fitness(np.clip(x, 0.0, 1.0))
            fs.append(f)
            history.append(_row("cma", len(history), state["generation"], f, scalars, np.clip(x, 0.0, 1.0), mixer))
        if len(xs) == len(fs) and len(fs) == es.popsize:
            es.tell(xs, fs)
        state["generation"] += 1
        state["random"] = np.random.get_state()
        _save_state(state_path, state)  # after each generation: a kill loses at most this one
        best = min(h["fitness"] for h in history if h["kind"] == "cma")
        if progress:
            log.info("generation %d: best fitness %.6g (%d evaluations, %.0f s)", state["generation"], best,
                     sum(h["kind"] == "cma" for h in history), time.perf_counter() - t)
    return _finish(out, history, mixer, base, models, dtype, progress)


def _row(kind: str, i: int, step: float, f: float, scalars: dict[str, float], w: np.ndarray, mixer: Mixer) -> dict[str, Any]:
    row = {"kind": kind, "evaluation": i, "step": step, "fitness": f}
    row.update({k: v for k, v in scalars.items() if k.startswith("probe/") and k.count("/") == 1})
    for mi in range(mixer.n_models):
        for pi, part in enumerate(mixer.parts):
            row[f"w{mi}/{part}"] = float(w.reshape(mixer.n_models, -1)[mi, pi])
    return row


def _load_state(path: Path, s: EvolveSettings, base: Path, models: list[Path]) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = pickle.loads(path.read_bytes())  # noqa: S301 - our own file, written by this command
    except Exception as err:  # noqa: BLE001
        raise TunelabError(f"{path}: the saved search cannot be read ({err}); delete it to start again") from None
    if state.get("settings") != asdict(s) or state.get("inputs") != [str(base), *map(str, models)]:
        raise TunelabError(f"{path} is a search with other settings or models; use another --out, or delete it to "
                           "start again")
    return state


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(pickle.dumps(state))
    os.replace(tmp, path)


def _finish(out: Path, history: list[dict[str, Any]], mixer: Mixer, base: Path, models: list[Path], dtype: str,
            progress: bool) -> EvolveResult:
    from tunelab.merge.recipe import Line, Recipe, Ref
    from tunelab.merge.run import merge_recipe

    cma_rows = [h for h in history if h["kind"] == "cma"]
    uniform = min((h for h in history if h["kind"] == "uniform"), key=lambda h: h["fitness"])
    best = min(cma_rows, key=lambda h: h["fitness"]) if cma_rows else uniform
    weights = [[best[f"w{mi}/{p}"] for p in mixer.parts] for mi in range(mixer.n_models)]
    # the winner, by sd-mecha: base + sum_i w_i (model_i - base), the ratios per key
    from tunelab.models.safetensors_io import read_header

    keys = list(read_header(base).tensors)
    r = Recipe([], "merge evolve")
    r.lines.append(Line("model", [str(base)], {"model_config": "sdxl-sgm", "merge_space": "weight"}))
    current = Ref(0)
    for mi, m in enumerate(models):
        r.lines.append(Line("model", [str(m)], {"model_config": "sdxl-sgm", "merge_space": "weight"}))
        model = Ref(len(r.lines) - 1)
        r.lines.append(Line("merge", ["subtract", model, Ref(0)]))
        delta = Ref(len(r.lines) - 1)
        index = {p: i for i, p in enumerate(mixer.parts)}
        values = {k: weights[mi][index[p]] if (p := part_of(k, mixer.space)) in index else 0.0 for k in keys}
        r.lines.append(Line("literal_keys", [values], {"model_config": "sdxl-sgm"}))
        alpha = Ref(len(r.lines) - 1)
        r.lines.append(Line("merge", ["add_difference", current, delta], {"alpha": alpha}))
        current = Ref(len(r.lines) - 1)
    merged = merge_recipe(r, out / "best.safetensors", dtype, progress=progress)
    files = [merged.path, merged.mecha, _write_history(history, out / "history.csv")]
    summary = {"best_fitness": best["fitness"], "uniform_fitness": uniform["fitness"], "uniform_ratio": uniform["step"],
               "improvement": uniform["fitness"] - best["fitness"], "parts": mixer.parts, "best_weights": weights,
               "evaluations": len(cma_rows), "best": {k: v for k, v in best.items() if k.startswith("probe/")},
               "uniform": {k: v for k, v in uniform.items() if k.startswith("probe/")}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    files += [out / "summary.json", _plot(history, mixer, weights, out / "evolve.png")]
    return EvolveResult(out, best["fitness"], [w for ws in weights for w in ws], uniform["fitness"], uniform["step"],
                        mixer.parts, history, files)


def _write_history(history: list[dict[str, Any]], path: Path) -> Path:
    cols = list(dict.fromkeys(k for h in history for k in h))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        for h in history:
            w.writerow({k: h.get(k, "") for k in cols})
    return path


def _plot(history: list[dict[str, Any]], mixer: Mixer, weights: list[list[float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax3, ax2) = plt.subplots(1, 3, figsize=(14, 3.8), gridspec_kw={"width_ratios": [1, 0.8, 1.4]})
    uni = [h for h in history if h["kind"] == "uniform"]
    ax.plot([h["step"] for h in uni], [h["fitness"] for h in uni], "o-", color="tab:gray", label="uniform ratio")
    cma_rows = [h for h in history if h["kind"] == "cma"]
    best_so_far = np.minimum.accumulate([h["fitness"] for h in cma_rows]) if cma_rows else []
    ax.axhline(min(h["fitness"] for h in uni), color="tab:gray", ls=":", lw=1)
    if cma_rows:
        ax.axhline(best_so_far[-1], color="tab:green", ls="--", lw=1, label="CMA-ES best")
    ax.set(xlabel="uniform ratio", ylabel="fitness (lower is better)", title="the baseline: one ratio everywhere")
    ax.legend(fontsize=8)
    if cma_rows:
        ax3.plot(range(1, len(best_so_far) + 1), best_so_far, color="tab:green", label="CMA-ES best so far")
    ax3.axhline(min(h["fitness"] for h in uni), color="tab:gray", ls=":", lw=1, label="best uniform ratio")
    ax3.set(xlabel="evaluation", ylabel="fitness", title="the search")
    ax3.legend(fontsize=8)
    x = np.arange(len(mixer.parts))
    for mi, ws in enumerate(weights):
        ax2.bar(x + 0.8 * mi / max(1, len(weights)), ws, 0.8 / max(1, len(weights)), label=f"model {mi + 1}")
    ax2.set_xticks(x, mixer.parts, rotation=60, fontsize=7)
    ax2.set(ylim=(0, 1.05), ylabel="ratio", title="the best ratios per part")
    if len(weights) > 1:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

