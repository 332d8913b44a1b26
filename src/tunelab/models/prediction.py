"""How a checkpoint predicts: epsilon, v (optionally zero-terminal SNR) or rectified flow.

The one place that reads and writes a checkpoint's *prediction record*, so training, sampling,
probes and merges agree on it. One vocabulary, the run file's (`objective.prediction`):

    epsilon   the UNet predicts the noise (SDXL base)
    v         v-prediction (Salimans & Ho 2022); `ztsnr` = zero-terminal-SNR noise schedule
    flow      rectified flow (the UNet predicts noise - x0 at t' * 1000)

Files from other tools may also be (read and carried through saves; not trained here):

    v on continuous EDM sigmas   ComfyUI's V_PREDICTION_EDM (CosXL): the UNet gets c_noise =
                                 ln(sigma) / 4 and predicts v, sigmas log-spaced in [min, max];
                                 sampled as ComfyUI samples it (sample/schedules.py)
    edm                          EDM preconditioning (Karras et al. 2022) as Playground v2.5
                                 ships it: sigma_data 0.5, sigmas [0.002, 80], its own latent
                                 scale; not sampled either

In a file the record is (the conventions ComfyUI / Forge / A1111 read):

    v_pred, ztsnr                   empty top-level marker tensors, shape (0,); present = true
    edm_vpred.sigma_min/_max        scalar float tensors: v on continuous EDM sigmas
    edm_mean, edm_std               Playground v2.5's latent statistics: the edm type
    modelspec.prediction_type       "epsilon" | "v" | "flow" (the SAI model spec's spelling for the
                                    first two, as kohya's `sai_model_spec.py` writes them)
    tunelab.ztsnr, tunelab.flow_shift   what no common marker says (flow's sampling shift)

Reading follows ComfyUI exactly wherever a file carries a marker (comfy/supported_models.py,
`SDXL.model_type`; comfy/model_base.py, `model_sampling`): edm_mean *and* edm_std -> edm; else
edm_vpred.sigma_max -> v on EDM sigmas (sigma_min from its marker, else 0.002); else v_pred ->
v, zero-terminal SNR exactly when ztsnr is present too; any other marker (ztsnr alone, one of
edm_mean / edm_std, edm_vpred.sigma_min alone) -> epsilon. The metadata is then ignored, as
ComfyUI ignores it (a warning names a disagreement). A file with no marker at all is read from
its metadata, where ComfyUI would sample epsilon: a deliberate difference, because kohya's
sd-scripts marks v-prediction only there (`modelspec.prediction_type = v`, older files
`ss_v_parameterization`) and flow has no marker; saving such a file through tunelab adds the
markers, after which ComfyUI reads it the same way.

Other tools' spellings are read as aliases ("v_prediction", "v-prediction", "vpred",
"flow_prediction", ...) and the diffusers name of each type is `diffusers_name`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

TYPES = ("epsilon", "v", "flow")  # what tunelab trains and samples (the run file's objective.prediction)
EDM = "edm"  # read and carried only
RECORD_TYPES = (*TYPES, EDM)
V_MARKER, ZTSNR_MARKER = "v_pred", "ztsnr"
EDM_V_MAX, EDM_V_MIN = "edm_vpred.sigma_max", "edm_vpred.sigma_min"
EDM_MEAN, EDM_STD = "edm_mean", "edm_std"
MARKERS = (V_MARKER, ZTSNR_MARKER, EDM_V_MAX, EDM_V_MIN, EDM_MEAN, EDM_STD)
VALUE_MARKERS = (EDM_V_MAX, EDM_V_MIN)  # markers whose value is part of the record
META_TYPE, META_ZTSNR, META_SHIFT = "modelspec.prediction_type", "tunelab.ztsnr", "tunelab.flow_shift"
# ComfyUI's constants: ModelSamplingContinuousEDM's default sigma_min (comfy/model_sampling.py), the
# Playground v2.5 settings of SDXL.model_type, and the clamp of the last alphas_cumprod after the
# zero-terminal-SNR rescale (`rescale_zero_terminal_snr_sigmas`; A1111 uses the same value).
EDM_SIGMA_MIN = 0.002
PLAYGROUND_SIGMAS, PLAYGROUND_SIGMA_DATA = (0.002, 80.0), 0.5
ZTSNR_LAST_ALPHA_BAR = 4.8973451890853435e-08

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

    type: str = "epsilon"  # one of RECORD_TYPES
    ztsnr: bool = False  # zero terminal SNR (v only): rescaled betas, trailing timesteps
    flow_shift: float | None = None  # flow only: the timestep shift it was trained with
    edm_sigmas: tuple[float, float] | None = None  # (min, max) of continuous EDM sigmas: "v" on them, or "edm"

    def __post_init__(self) -> None:
        if self.type not in RECORD_TYPES:
            raise TunelabError(f"prediction type must be one of {', '.join(RECORD_TYPES)}, got {self.type!r}")
        if self.ztsnr and (self.type != "v" or self.edm_sigmas is not None):
            raise TunelabError("zero-terminal SNR needs v-prediction on the discrete schedule "
                               "(epsilon is undefined at zero SNR)")
        if self.edm_sigmas is not None and self.type not in ("v", EDM):
            raise TunelabError(f"continuous EDM sigmas belong to 'v' or 'edm' records, not {self.type!r}")
        if self.type == EDM and self.edm_sigmas is None:
            raise TunelabError("an 'edm' record needs its sigma range (edm_sigmas)")
        if self.edm_sigmas is not None:
            if not 0 < self.edm_sigmas[0] < self.edm_sigmas[1]:
                raise TunelabError(f"EDM sigmas must satisfy 0 < sigma_min < sigma_max, got {self.edm_sigmas}")
            # held at the markers' precision (float32 scalars), so a record equals itself read back
            object.__setattr__(self, "edm_sigmas", tuple(float(torch.tensor(float(v)).float()) for v in self.edm_sigmas))

    @property
    def continuous(self) -> bool:
        """True for continuous EDM sigmas (the UNet gets ln(sigma) / 4, not a timestep index)."""
        return self.edm_sigmas is not None

    @property
    def sigma_data(self) -> float:
        """EDM's sigma_data: 0.5 for Playground's edm, 1.0 otherwise (ComfyUI's default)."""
        return PLAYGROUND_SIGMA_DATA if self.type == EDM else 1.0

    def unsupported(self) -> str | None:
        """Why tunelab cannot train this record (None: it can): its objectives use the preset's
        1000 discrete timesteps. `sampling_problem` says what the samplers refuse."""
        if self.type == EDM:
            return self.sampling_problem()
        if self.continuous:
            return (f"{self.describe()}: v-prediction on continuous EDM sigmas (ComfyUI's V_PREDICTION_EDM, as CosXL); "
                    "tunelab's training objectives use the 1000 discrete timesteps (its samplers do sample it)")
        return None

    def sampling_problem(self) -> str | None:
        """Why tunelab's samplers cannot sample this record (None: they can). They sample
        epsilon, v (discrete, zero-terminal SNR, or on continuous EDM sigmas) and flow."""
        if self.type == EDM:
            return (f"{self.describe()}: EDM preconditioning (sigma_data 0.5) with its own latent mean and std "
                    "(Playground v2.5's edm_mean / edm_std); tunelab samples epsilon, v (also on EDM sigmas) and "
                    "flow only (sample it in ComfyUI)")
        return None

    @property
    def diffusers_name(self) -> str:
        """The `prediction_type` of a diffusers scheduler for this record ("v_prediction" for v on
        EDM sigmas too); a record tunelab's samplers cannot sample is refused here, with the reason."""
        problem = self.sampling_problem()
        if problem:
            raise TunelabError(f"cannot sample {problem}")
        return _DIFFUSERS[self.type]

    def scheduler_config(self, base: Mapping[str, Any]) -> dict[str, Any]:
        """A diffusers scheduler config for this record on a preset's noise schedule (`base`), as a
        diffusers folder's `scheduler/scheduler_config.json` carries it. v on EDM sigmas gets
        diffusers' EDMEulerScheduler with log-spaced ("exponential") sigmas, which is ComfyUI's
        "normal" schedule on ModelSamplingContinuousEDM."""
        n = base.get("num_train_timesteps", 1000)
        if self.type == "flow":
            return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": n,
                    "shift": self.flow_shift if self.flow_shift is not None else 1.0}
        if self.type == EDM:
            raise TunelabError(f"cannot write a diffusers scheduler for {self.unsupported()}")
        if self.continuous:
            lo, hi = self.edm_sigmas
            return {"_class_name": "EDMEulerScheduler", "num_train_timesteps": n, "sigma_min": lo, "sigma_max": hi,
                    "sigma_data": self.sigma_data, "sigma_schedule": "exponential", "prediction_type": "v_prediction"}
        config = {k: v for k, v in base.items() if not k.startswith("_")}
        config.update(_class_name="EulerDiscreteScheduler", prediction_type=self.diffusers_name)
        if self.ztsnr:
            config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        return config

    def sigma_table(self, base: Mapping[str, Any]) -> torch.Tensor:
        """(1000,) float32 ascending sigmas of the model, as ComfyUI's `model_sampling` builds them
        (comfy/model_sampling.py): discrete sqrt((1 - a) / a) from the preset's betas, zero-terminal
        SNR rescaled with the last alphas_cumprod clamped to ZTSNR_LAST_ALPHA_BAR (sigma_max 4518.8,
        where diffusers' Euler clamps to 2**-24: 4096); EDM exp(linspace(ln min, ln max)); flow the
        shifted t / 1000 for t = 1..1000. The first/last entries are what a sampler starts and ends on."""
        n = int(base.get("num_train_timesteps", 1000))
        if self.continuous:
            lo, hi = self.edm_sigmas
            return torch.linspace(math.log(lo), math.log(hi), n, dtype=torch.float64).exp().float()
        if self.type == "flow":
            t = torch.arange(1, n + 1, dtype=torch.float64) / n
            shift = self.flow_shift if self.flow_shift is not None else 1.0
            return (shift * t / (1 + (shift - 1) * t)).float()
        if base.get("beta_schedule", "scaled_linear") != "scaled_linear":
            raise TunelabError(f"sigma_table knows the scaled_linear beta schedule, not {base.get('beta_schedule')!r}")
        betas = torch.linspace(base["beta_start"] ** 0.5, base["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2
        alpha_bar = torch.cumprod(1 - betas, dim=0)
        if self.ztsnr:  # Lin et al. 2023, Alg. 1, on sqrt(alpha_bar)
            root = alpha_bar.sqrt()
            first, last = root[0].clone(), root[-1].clone()
            alpha_bar = ((root - last) * first / (first - last)) ** 2
            alpha_bar[-1] = ZTSNR_LAST_ALPHA_BAR
        return ((1 - alpha_bar) / alpha_bar).sqrt().float()

    def describe(self) -> str:
        """"epsilon", "v + zero-terminal SNR", "flow (shift 3)", "v (EDM sigmas 0.002-120)"."""
        if self.type == "flow" and self.flow_shift is not None:
            return f"flow (shift {self.flow_shift:g})"
        if self.continuous:
            return f"{self.type} (EDM sigmas {self.edm_sigmas[0]:g}-{self.edm_sigmas[1]:g})"
        return self.type + (" + zero-terminal SNR" if self.ztsnr else "")

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_objective(cls, objective: Any) -> "PredictionRecord":
        """The record of a run file's `[objective]` section (what a finetune of it predicts)."""
        shift = float(objective.flow_shift) if objective.prediction == "flow" else None
        return cls(objective.prediction, bool(objective.zero_terminal_snr), shift)

    @classmethod
    def read(cls, keys: Any, metadata: Mapping[str, str] | None = None,
             values: Mapping[str, Any] | None = None) -> "PredictionRecord":
        """The record of a file from its tensor names and header metadata (see the module
        docstring for the rules). `keys` is any container of names; the EDM sigma markers' values
        come from `values` ({name: tensor or number}), or from `keys` itself when it maps names to
        tensors (a state dict, `Components.extras`)."""
        metadata = metadata or {}
        if values is None and isinstance(keys, Mapping):
            values = keys
        keys = set(keys)
        if EDM_MEAN in keys and EDM_STD in keys:  # Playground v2.5
            record = cls(EDM, edm_sigmas=PLAYGROUND_SIGMAS)
        elif EDM_V_MAX in keys:
            lo = _marker_value(values, EDM_V_MIN) if EDM_V_MIN in keys else EDM_SIGMA_MIN
            record = cls("v", edm_sigmas=(lo, _marker_value(values, EDM_V_MAX)))
        elif V_MARKER in keys:
            record = cls("v", ztsnr=ZTSNR_MARKER in keys)
        elif keys & set(MARKERS):  # ztsnr alone, one of edm_mean / edm_std, edm_vpred.sigma_min alone
            record = cls()
        else:
            return cls._from_metadata(metadata)
        said = cls._from_metadata(metadata, quiet=True) if metadata.get(META_TYPE) else None
        if said is not None and (said.type, said.ztsnr) != (record.type, record.ztsnr):
            _warn_once(f"the metadata says {said.describe()} but the file's markers ({', '.join(sorted(keys & set(MARKERS)))}) "
                       f"say {record.describe()}; read as the markers say (ComfyUI's reading)")
        return record

    @classmethod
    def _from_metadata(cls, metadata: Mapping[str, str], quiet: bool = False) -> "PredictionRecord":
        """A file without markers: `modelspec.prediction_type` (any alias), else kohya's older
        `ss_v_parameterization`; zero-terminal SNR from `tunelab.ztsnr` or kohya's
        `ss_zero_terminal_snr`; flow's shift from `tunelab.flow_shift`."""
        kind = "v" if metadata.get("ss_v_parameterization", "").lower() == "true" else "epsilon"
        if metadata.get(META_TYPE):
            try:
                kind = canonical_type(metadata[META_TYPE])
            except TunelabError:
                if not quiet:
                    log.warning("unknown %s %r in the file's metadata; reading it as epsilon", META_TYPE, metadata[META_TYPE])
                kind = "epsilon"
        ztsnr = kind == "v" and any(metadata.get(k, "").lower() == "true" for k in (META_ZTSNR, "ss_zero_terminal_snr"))
        shift = float(metadata[META_SHIFT]) if kind == "flow" and metadata.get(META_SHIFT) else None
        return cls(kind, ztsnr, shift)

    @classmethod
    def of(cls, comps: Any) -> "PredictionRecord":
        """The record of loaded components (their `extras` and file metadata)."""
        return cls.read(comps.extras, comps.metadata)

    @classmethod
    def of_file(cls, path: Any, header: Any) -> "PredictionRecord":
        """The record of a `.safetensors` file from its parsed header, reading only the few bytes
        of the EDM sigma markers (no memory map, no other tensor)."""
        from tunelab.models.safetensors_io import read_small_tensor

        values = {k: read_small_tensor(path, header, k) for k in VALUE_MARKERS if k in header.tensors}
        return cls.read(header.tensors.keys(), header.metadata, values)

    @classmethod
    def of_diffusers_scheduler(cls, config: Mapping[str, Any]) -> "PredictionRecord":
        """The record a diffusers folder's scheduler config implies."""
        name = str(config.get("_class_name", ""))
        if "shift" in config and "FlowMatch" in name:
            return cls("flow", False, float(config["shift"]))
        if name.startswith("EDM"):
            sigmas = (float(config.get("sigma_min", EDM_SIGMA_MIN)), float(config.get("sigma_max", 80.0)))
            if config.get("prediction_type") == "v_prediction":
                return cls("v", edm_sigmas=sigmas)
            return cls(EDM, edm_sigmas=sigmas)
        kind = canonical_type(config.get("prediction_type", "epsilon"))
        return cls(kind, bool(config.get("rescale_betas_zero_snr", False)) and kind == "v")

    # --- writing ------------------------------------------------------------------------------------

    def markers(self) -> dict[str, torch.Tensor | None]:
        """The marker tensors this record puts in a file, as ComfyUI's checkpoint save writes them
        (comfy_extras/nodes_model_merging.py): empty (0,) tensors, scalar float32 sigmas. None: a
        marker that only the source file can supply (Playground's latent statistics)."""
        if self.type == EDM:
            return {EDM_MEAN: None, EDM_STD: None}
        if self.continuous:
            return {EDM_V_MIN: torch.tensor(self.edm_sigmas[0]).float(), EDM_V_MAX: torch.tensor(self.edm_sigmas[1]).float()}
        if self.type == "v":
            return {V_MARKER: torch.zeros(0), **({ZTSNR_MARKER: torch.zeros(0)} if self.ztsnr else {})}
        return {}

    def stamp(self, extras: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """Write the record into a checkpoint's extras and metadata (in place), removing any
        marker that no longer holds. A marker the file had is kept as it was (exact round trip)."""
        wanted = self.markers()
        for name in MARKERS:
            if name not in wanted:
                extras.pop(name, None)
        for name, tensor in wanted.items():
            if tensor is None:
                if name not in extras:
                    raise TunelabError(f"cannot mark a file {self.describe()}: its {name} marker comes from the source file")
            elif name not in extras or (tensor.numel() == 1 and _marker_value(extras, name) != float(tensor)):
                extras[name] = tensor
        metadata.update(self.metadata())
        if self.type != "flow":
            metadata.pop(META_SHIFT, None)

    def metadata(self) -> dict[str, str]:
        meta = {META_TYPE: self.type, META_ZTSNR: str(self.ztsnr).lower()}
        if self.flow_shift is not None:
            meta[META_SHIFT] = f"{self.flow_shift:g}"
        return meta


def _marker_value(values: Mapping[str, Any] | None, name: str) -> float:
    if values is None or name not in values:
        raise TunelabError(f"the file has a {name} marker but its value was not read")
    value = values[name]
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TunelabError(f"the {name} marker must hold one number (ComfyUI reads it with .item()), "
                               f"it has shape {tuple(value.shape)}")
        value = value.item()
    return float(value)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


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

        return PredictionRecord.of_file(path, read_header(path))
    return None


def conversion_note(run: PredictionRecord, base: PredictionRecord) -> str:
    """" (converting the base's epsilon)" when a run trains another prediction than its base's."""
    if (run.type, run.ztsnr, run.edm_sigmas) == (base.type, base.ztsnr, base.edm_sigmas):
        return ""
    return f" (converting the base's {base.describe()})"
