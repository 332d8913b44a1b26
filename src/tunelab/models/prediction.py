"""How a checkpoint predicts: epsilon, v (optionally zero-terminal SNR) or rectified flow.

The one place that reads and writes a checkpoint's *prediction record*, so training, sampling,
probes and merges agree on it. One vocabulary, the run file's (`objective.prediction`):

    epsilon   the UNet predicts the noise (SDXL base)
    v         v-prediction (Salimans & Ho 2022); `ztsnr` = zero-terminal-SNR noise schedule
    flow      rectified flow (the UNet predicts noise - x0 at t' * 1000)

In a file the record is (the conventions ComfyUI / Forge / A1111 read):

    v_pred, ztsnr                   empty top-level marker tensors, shape (0,); present = true
    modelspec.prediction_type       "epsilon" | "v" | "flow" (the SAI model spec's spelling for the
                                    first two, as kohya's `sai_model_spec.py` writes them)
    tunelab.ztsnr, tunelab.flow_shift   what no common marker says (flow's sampling shift)

Other tools' spellings are read as aliases ("v_prediction", "v-prediction", "vpred",
"flow_prediction", ...) and the diffusers name of each type is `diffusers_name`. The markers win
over the metadata when they disagree, because that is what ComfyUI and Forge pick the sampler by.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

TYPES = ("epsilon", "v", "flow")
V_MARKER, ZTSNR_MARKER = "v_pred", "ztsnr"
MARKERS = (V_MARKER, ZTSNR_MARKER)
META_TYPE, META_ZTSNR, META_SHIFT = "modelspec.prediction_type", "tunelab.ztsnr", "tunelab.flow_shift"

_ALIASES = {
    "epsilon": "epsilon", "eps": "epsilon", "noise": "epsilon",
    "v": "v", "v_prediction": "v", "v-prediction": "v", "vpred": "v", "v_pred": "v",
    "flow": "flow", "flow_prediction": "flow", "flow-matching": "flow", "rectified_flow": "flow",
}
_DIFFUSERS = {"epsilon": "epsilon", "v": "v_prediction", "flow": "flow_prediction"}


def canonical_type(name: str) -> str:
    """The record's spelling of a prediction type written by any tool ("v_prediction" -> "v")."""
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise TunelabError(f"unknown prediction type {name!r}; tunelab knows {', '.join(TYPES)} "
                           f"(and the aliases {', '.join(sorted(k for k in _ALIASES if k not in TYPES))})")
    return _ALIASES[key]


@dataclass(frozen=True)
class PredictionRecord:
    """What a checkpoint predicts and on which noise schedule."""

    type: str = "epsilon"  # one of TYPES
    ztsnr: bool = False  # zero terminal SNR (v only): rescaled betas, trailing timesteps
    flow_shift: float | None = None  # flow only: the timestep shift it was trained with

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise TunelabError(f"prediction type must be one of {', '.join(TYPES)}, got {self.type!r}")
        if self.ztsnr and self.type != "v":
            raise TunelabError("zero-terminal SNR needs v-prediction (epsilon is undefined at zero SNR)")

    @property
    def diffusers_name(self) -> str:
        """The `prediction_type` of a diffusers scheduler config."""
        return _DIFFUSERS[self.type]

    def scheduler_config(self, base: Mapping[str, Any]) -> dict[str, Any]:
        """A diffusers scheduler config for this record on a preset's noise schedule (`base`), as a
        diffusers folder's `scheduler/scheduler_config.json` carries it."""
        if self.type == "flow":
            return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": base.get("num_train_timesteps", 1000),
                    "shift": self.flow_shift if self.flow_shift is not None else 1.0}
        config = {k: v for k, v in base.items() if not k.startswith("_")}
        config.update(_class_name="EulerDiscreteScheduler", prediction_type=self.diffusers_name)
        if self.ztsnr:
            config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        return config

    def describe(self) -> str:
        """"epsilon", "v + zero-terminal SNR", "flow (shift 3)"."""
        if self.type == "flow" and self.flow_shift is not None:
            return f"flow (shift {self.flow_shift:g})"
        return self.type + (" + zero-terminal SNR" if self.ztsnr else "")

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_objective(cls, objective: Any) -> "PredictionRecord":
        """The record of a run file's `[objective]` section (what a finetune of it predicts)."""
        shift = float(objective.flow_shift) if objective.prediction == "flow" else None
        return cls(objective.prediction, bool(objective.zero_terminal_snr), shift)

    @classmethod
    def read(cls, keys: Any, metadata: Mapping[str, str] | None = None) -> "PredictionRecord":
        """The record of a file from its tensor names (any container of keys) and header metadata."""
        metadata = metadata or {}
        keys = set(keys)
        meta_type = "epsilon"
        if metadata.get(META_TYPE):
            try:
                meta_type = canonical_type(metadata[META_TYPE])
            except TunelabError:
                log.warning("unknown %s %r in the file's metadata; reading it as epsilon", META_TYPE, metadata[META_TYPE])
        kind = "v" if V_MARKER in keys else meta_type
        ztsnr = kind == "v" and (ZTSNR_MARKER in keys or metadata.get(META_ZTSNR, "").lower() == "true")
        shift = None
        if kind == "flow" and metadata.get(META_SHIFT):
            shift = float(metadata[META_SHIFT])
        return cls(kind, ztsnr, shift)

    @classmethod
    def of(cls, comps: Any) -> "PredictionRecord":
        """The record of loaded components (their `extras` and file metadata)."""
        return cls.read(comps.extras.keys(), comps.metadata)

    @classmethod
    def of_diffusers_scheduler(cls, config: Mapping[str, Any]) -> "PredictionRecord":
        """The record a diffusers folder's scheduler config implies."""
        if "shift" in config and "FlowMatch" in str(config.get("_class_name", "")):
            return cls("flow", False, float(config["shift"]))
        kind = canonical_type(config.get("prediction_type", "epsilon"))
        return cls(kind, bool(config.get("rescale_betas_zero_snr", False)) and kind == "v")

    # --- writing ------------------------------------------------------------------------------------

    def stamp(self, extras: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """Write the record into a checkpoint's extras and metadata (in place), removing any
        marker that no longer holds."""
        wanted = {V_MARKER: self.type == "v", ZTSNR_MARKER: self.ztsnr}
        for name, keep in wanted.items():
            if not keep:
                extras.pop(name, None)
            elif name not in extras:  # a marker the file had is kept as it was (exact round trip)
                extras[name] = torch.zeros(0)
        metadata.update(self.metadata())
        if self.type != "flow":
            metadata.pop(META_SHIFT, None)

    def metadata(self) -> dict[str, str]:
        meta = {META_TYPE: self.type, META_ZTSNR: str(self.ztsnr).lower()}
        if self.flow_shift is not None:
            meta[META_SHIFT] = f"{self.flow_shift:g}"
        return meta


def base_record(source: str) -> PredictionRecord | None:
    """The record of a training base without loading its weights: 'toy' (built in code, epsilon),
    a `.safetensors` file (header only) or a diffusers folder (its scheduler config); None when
    it cannot be known yet (no such file, or a pickle checkpoint, which has no header)."""
    import json
    from pathlib import Path

    if source == "toy":
        return PredictionRecord()
    path = Path(source)
    if path.is_dir():
        sched = path / "scheduler" / "scheduler_config.json"
        return PredictionRecord.of_diffusers_scheduler(json.loads(sched.read_text())) if sched.is_file() else PredictionRecord()
    if path.suffix.lower() == ".safetensors" and path.is_file():
        from tunelab.models.safetensors_io import read_header

        header = read_header(path)
        return PredictionRecord.read(header.tensors.keys(), header.metadata)
    return None


def conversion_note(run: PredictionRecord, base: PredictionRecord) -> str:
    """" (converting the base's epsilon)" when a run trains another prediction than its base's."""
    if (run.type, run.ztsnr) == (base.type, base.ztsnr):
        return ""
    return f" (converting the base's {base.describe()})"
