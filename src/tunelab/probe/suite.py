"""A probe's files and its preparation, shared by the in-training callback and `tunelab probe`.

Under a folder (a run's `probes/`, or `tunelab probe --out`):

    sets.safetensors              the learn and preserve sets (latents, prompts, sizes)
    base-predictions.safetensors  the base's predictions on every (set, sample, timestep)
    preserve/                     the preserve images the base drew (to look at)
    training.{parquet,csv,png}    the callback's table and chart, one row per (step, set, timestep)
    checkpoints.{parquet,csv,png} what `tunelab probe` measured on a run's checkpoint files

The two `.safetensors` files carry a fingerprint of everything that makes them (the probe
settings, the base, the data index, the objective, loss and text settings); a file made for
other settings is rebuilt, so a probe never compares against stale inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager

import torch

from tunelab.probe.measure import Measurement, Probe
from tunelab.probe.sets import ProbeSet, learn_set, load_sets, preserve_set, save_sets

if TYPE_CHECKING:
    from tunelab.config import RunConfig
    from tunelab.train.step import StepModels

log = logging.getLogger(__name__)

SETS_FILE = "sets.safetensors"
BASE_FILE = "base-predictions.safetensors"
PRESERVE_DIR = "preserve"
TRAINING = "training"
CHECKPOINTS = "checkpoints"


def fingerprint(cfg: "RunConfig", arch: str) -> str:
    """What the probe's inputs and the base's predictions depend on."""
    from tunelab.data.index import index_digest

    index = cfg.data.index if cfg.probe.learn in ("holdout", "train") else cfg.probe.learn
    digest = index_digest(index) if index and Path(index).is_file() else None
    data = {"probe": cfg.probe.model_dump(mode="json", exclude={"enabled", "every_n_steps", "scorer"}),
            "base": str(cfg.model.base), "arch": arch, "index": digest,
            "objective": cfg.objective.model_dump(mode="json"), "loss": cfg.loss.model_dump(mode="json"),
            "text": [cfg.model.max_chunks, cfg.model.clip_skip], "captions": cfg.data.captions.model_dump(mode="json"),
            "seed": cfg.run.seed}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Prepared:
    probe: Probe
    base: dict[str, list[torch.Tensor]]  # the base's predictions per set: per sample (K, C, h, w)
    base_measurement: Measurement | None  # the base measured now (None when both files were reused)


BaseModels = Callable[[], tuple[Any, tuple[Any, Any]]]  # () -> (components, tokenizers) of the base


def prepare(cfg: "RunConfig", arch: str, folder: Path, base_models: BaseModels, device: torch.device | str = "cpu",
            autocast: Callable[[], ContextManager] = contextlib.nullcontext, learn: bool = True) -> Prepared:
    """The probe and the base's predictions: read from `folder` when made for these settings, else
    made with the base (`base_models()` is called only then) and written there."""
    folder.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(cfg, arch)
    sets = load_sets(folder / SETS_FILE, fp)
    base_preds = _load_predictions(folder / BASE_FILE, fp) if sets is not None else None
    if sets is not None and base_preds is not None:
        return Prepared(Probe.from_config(cfg, sets, arch), base_preds, None)
    comps, tokenizers = base_models()
    if sets is None:
        sets = _build_sets(cfg, arch, comps, tokenizers, folder, device, learn)
        save_sets(sets, folder / SETS_FILE, fp)
    probe = Probe.from_config(cfg, sets, arch)
    from tunelab.train.step import StepModels

    measured = probe.run(StepModels.of(comps, tokenizers), device, keep=True, autocast=autocast)
    _save_predictions(measured.predictions, folder / BASE_FILE, fp)
    measured.sets = {name: type(n)(n.loss, torch.zeros_like(n.loss)) for name, n in measured.sets.items()}
    return Prepared(probe, measured.predictions, measured)


def reusable(cfg: "RunConfig", arch: str, folder: Path) -> bool:
    """Whether `prepare` would read everything from `folder` (and so neither measure the base nor write)."""
    fp = fingerprint(cfg, arch)
    return load_sets(folder / SETS_FILE, fp) is not None and _load_predictions(folder / BASE_FILE, fp) is not None


def _build_sets(cfg: "RunConfig", arch: str, comps: Any, tokenizers: tuple[Any, Any], folder: Path,
                device: torch.device | str, learn: bool) -> list[ProbeSet]:
    sets = []
    if learn and cfg.probe.learn:
        sets.append(learn_set(cfg, comps.vae, device))
    sets.append(preserve_set(comps, tokenizers, cfg.probe, arch, folder / PRESERVE_DIR))
    log.info("probe sets: %s (images the base drew for the preserve set: %s)",
             ", ".join(f"{s.name} {len(s)}" for s in sets), folder / PRESERVE_DIR)
    return sets


def _save_predictions(preds: dict[str, list[torch.Tensor]], path: Path, fp: str) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".partial")
    save_file({f"{name}.{i}": t.contiguous() for name, ts in preds.items() for i, t in enumerate(ts)}, str(tmp),
              metadata={"fingerprint": fp, "sets": json.dumps({name: len(ts) for name, ts in preds.items()})})
    tmp.replace(path)


def _load_predictions(path: Path, fp: str) -> dict[str, list[torch.Tensor]] | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("fingerprint") != fp:
            return None
        return {name: [f.get_tensor(f"{name}.{i}") for i in range(n)] for name, n in json.loads(meta["sets"]).items()}


def measure_models(prepared: Prepared, models: "StepModels", device: torch.device | str = "cpu",
                   autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> Measurement:
    return prepared.probe.run(models, device, base=prepared.base, autocast=autocast)


# --- tables ------------------------------------------------------------------------------------------------


def write_table(rows: list[dict[str, Any]], folder: Path, name: str) -> tuple[Path, Path]:
    """`name`.parquet and `name`.csv from the rows (atomically: written beside, then renamed)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    parquet, csv = folder / f"{name}.parquet", folder / f"{name}.csv"
    for path, write in ((parquet, pq.write_table), (csv, pcsv.write_csv)):
        tmp = path.with_name(path.name + ".partial")
        write(table, tmp)
        tmp.replace(path)
    return parquet, csv


def read_table(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist() if path.is_file() else []
