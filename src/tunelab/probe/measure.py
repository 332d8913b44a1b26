"""One model on a probe's fixed inputs: the loss per (sample, timestep) and the drift from the base.

    probe = Probe.from_config(cfg, sets)                 # sets: probe/sets.py
    base = probe.run(base_models, keep=True)             # the base's predictions, kept
    m = probe.run(models, base=base.predictions)         # loss (N, K) and drift (N, K) per set
    m.scalars()   # probe/learn_loss, probe/preserve_loss, probe/drift_learn, ... and per band

*Loss* is the run's own loss (objective, loss type, min-SNR weighting) at the fixed noise and
timesteps: what the trainer minimises, measured on inputs that never change. *Drift* is the mean
squared difference between the model's prediction and the base's at the same noisy latents,
prompt and timestep, averaged over the prediction's elements: what forgetting is, measured
without sampling an image (a model identical to the base has drift exactly 0). Both are kept per
timestep and summarised per noise band.

The items of a set (sample i at timestep k) are batched in a fixed order, grouped by latent
shape, so the same model gives the same numbers bit for bit on the same device.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Sequence

import torch

from tunelab.probe.sets import BANDS, ProbeSet, ProbeTimesteps, probe_noise, probe_timesteps

if TYPE_CHECKING:
    from tunelab.config import LossSection, RunConfig
    from tunelab.train.objectives import Objective
    from tunelab.train.step import StepModels, TextSettings


@dataclass
class SetNumbers:
    loss: torch.Tensor  # (N, K) float64 per sample and timestep
    drift: torch.Tensor | None  # (N, K) float64 mean squared difference to the base's prediction


@dataclass
class Measurement:
    timesteps: ProbeTimesteps
    sets: dict[str, SetNumbers]
    predictions: dict[str, list[torch.Tensor]] | None = None  # keep=True: per sample (K, C, h, w) float32

    def scalars(self) -> dict[str, float]:
        """The logged numbers: probe/<set>_loss and probe/drift_<set>, overall and per noise band."""
        out: dict[str, float] = {}
        for name, nums in self.sets.items():
            for metric, values in (("loss", nums.loss), ("drift", nums.drift)):
                if values is None:
                    continue
                tag = f"probe/{name}_loss" if metric == "loss" else f"probe/drift_{name}"
                out[tag] = float(values.mean())
                for band in BANDS:
                    cols = [k for k, b in enumerate(self.timesteps.bands) if b == band]
                    if cols:
                        out[f"{tag}/{band}"] = float(values[:, cols].mean())
        return out

    def rows(self, step: int, checkpoint: str = "") -> list[dict[str, Any]]:
        """The long table `tunelab probe` and the callback write: one row per (set, metric, timestep)."""
        t = self.timesteps
        rows = []
        for name, nums in self.sets.items():
            for metric, values in (("loss", nums.loss), ("drift", nums.drift)):
                if values is None:
                    continue
                for k in range(len(t)):
                    rows.append(table_row(step, checkpoint, name, metric, float(values[:, k].mean()), t.bands[k],
                                          float(t.values[k]), t.quantiles[k], int(values.shape[0])))
        return rows


def table_row(step: int, checkpoint: str, set_name: str, metric: str, value: float, band: str = "",
              timestep: float = float("nan"), quantile: float = float("nan"), samples: int = 0) -> dict[str, Any]:
    """One row of a probe table (image scores: metric `score/<name>`, no band or timestep)."""
    return {"step": step, "checkpoint": checkpoint, "set": set_name, "metric": metric, "band": band,
            "timestep": timestep, "quantile": quantile, "samples": samples, "value": value}


def score_rows(step: int, checkpoint: str, scores: dict[str, float]) -> list[dict[str, Any]]:
    """Rows of `images.image_scores`' numbers (tags probe/<set>_score/<name>)."""
    rows = []
    for tag, value in scores.items():
        set_name, _, name = tag.removeprefix("probe/").partition("_score/")
        rows.append(table_row(step, checkpoint, set_name, f"score/{name}", value))
    return rows


@dataclass
class Probe:
    """What a probe measures with: fixed sets and timesteps, the run's objective, loss and text settings."""

    sets: list[ProbeSet]
    timesteps: ProbeTimesteps
    objective: "Objective"
    loss: "LossSection"
    text: "TextSettings"
    seed: int = 0
    batch_size: int = 8

    @classmethod
    def from_config(cls, cfg: "RunConfig", sets: Sequence[ProbeSet], arch: str) -> "Probe":
        from tunelab.models.arch import load_arch
        from tunelab.train.objectives import Objective
        from tunelab.train.step import TextSettings

        # no noise offset: a probe's noise is plain N(0, 1), the same for every objective setting
        objective = Objective.from_config(cfg.objective, load_arch(arch).scheduler)
        text = TextSettings(cfg.model.max_chunks, cfg.model.clip_skip, trains=False)
        return cls(list(sets), probe_timesteps(objective, cfg.probe.timesteps), objective, cfg.loss, text,
                   cfg.probe.seed, cfg.probe.batch_size)

    @property
    def forwards(self) -> int:
        """UNet forward passes per probe (one per sample and timestep; the text encoders add one per batch)."""
        return sum(len(s) for s in self.sets) * len(self.timesteps)

    @torch.no_grad()
    def run(self, models: "StepModels", device: torch.device | str = "cpu",
            base: dict[str, list[torch.Tensor]] | None = None, keep: bool = False,
            autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> Measurement:
        """Loss (and drift, given the base's predictions) of `models` on every set."""
        out, kept = {}, {} if keep else None
        for set_index, s in enumerate(self.sets):
            loss, drift, preds = self._run_set(models, device, set_index, s,
                                               None if base is None else base[s.name], keep, autocast)
            out[s.name] = SetNumbers(loss, drift)
            if kept is not None:
                kept[s.name] = preds
        return Measurement(self.timesteps, out, kept)

    def _run_set(self, models, device, set_index: int, s: ProbeSet, base: list[torch.Tensor] | None, keep: bool,
                 autocast) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        from tunelab.train.step import denoise

        K = len(self.timesteps)
        loss = torch.zeros(len(s), K, dtype=torch.float64)
        drift = torch.zeros(len(s), K, dtype=torch.float64) if base is not None else None
        preds = [torch.empty(0)] * len(s)
        for items in self._batches(s):
            batch = _batch(s, [i for i, _ in items], device)
            latents = torch.stack([s.latents[i] for i, _ in items]).to(device)
            noise = torch.stack([probe_noise(self.seed, set_index, i, k, tuple(s.latents[i].shape)) for i, k in items])
            t = self.timesteps.values[[k for _, k in items]]
            noised = self.objective.make(latents, noise.to(device), t.to(device))
            with autocast():
                result = denoise(models, batch, noised, self.objective, self.loss, self.text, device)
            pred = result.prediction.float().cpu()
            for j, (i, k) in enumerate(items):
                loss[i, k] = float(result.loss[j])
                if drift is not None:
                    drift[i, k] = float((pred[j] - base[i][k]).pow(2).mean(dtype=torch.float64))
            if keep:
                for j, (i, k) in enumerate(items):
                    if preds[i].numel() == 0:
                        preds[i] = torch.empty((K, *pred.shape[1:]), dtype=torch.float32)
                    preds[i][k] = pred[j]
        return loss, drift, preds

    def _batches(self, s: ProbeSet) -> list[list[tuple[int, int]]]:
        """(sample, timestep) items in a fixed order: grouped by latent shape, chunked by batch_size."""
        groups: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        for i, lat in enumerate(s.latents):
            groups.setdefault(tuple(lat.shape), []).extend((i, k) for k in range(len(self.timesteps)))
        return [items[j:j + self.batch_size] for items in groups.values() for j in range(0, len(items), self.batch_size)]


def _batch(s: ProbeSet, idx: list[int], device: torch.device | str) -> dict[str, Any]:
    return {"prompt": [s.prompts[i] for i in idx],
            "original_size_hw": torch.tensor([s.original_size_hw[i] for i in idx], dtype=torch.long),
            "crop_top_left": torch.tensor([s.crop_top_left[i] for i in idx], dtype=torch.long),
            "target_size_hw": torch.tensor([s.target_size_hw[i] for i in idx], dtype=torch.long)}
