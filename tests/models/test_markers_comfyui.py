"""Prediction markers read as ComfyUI reads them, for every combination, and what tunelab does with
the EDM kinds: v on EDM sigmas (CosXL) is sampled (tests/sample/test_edm_comfyui.py checks how) but
not trained; Playground's EDM is neither.

References, re-derived below (ComfyUI master):
- comfy/supported_models.py, `SDXL.model_type`: edm_mean and edm_std -> ModelType.EDM with
  sigma_data 0.5, sigma_max 80, sigma_min 0.002 (Playground v2.5); elif edm_vpred.sigma_max ->
  V_PREDICTION_EDM with sigma_max = its .item() and, if present, sigma_min = edm_vpred.sigma_min;
  elif v_pred -> V_PREDICTION, zsnr = True when ztsnr is present too; else EPS. The metadata is not read.
- comfy/model_base.py, `model_sampling`: V_PREDICTION_EDM = V_PREDICTION preconditioning on
  ModelSamplingContinuousEDM; EPS / V_PREDICTION on ModelSamplingDiscrete.
- comfy/model_sampling.py: ModelSamplingDiscrete builds sigmas = sqrt((1 - a) / a) from
  make_beta_schedule("linear", 1000, 0.00085, 0.012) = linspace(sqrt(start), sqrt(end))**2 in
  float64, rescaled by `rescale_zero_terminal_snr_sigmas` when zsnr (last alphas_cumprod set to
  4.8973451890853435e-08); ModelSamplingContinuousEDM: sigma_min default 0.002, sigmas =
  exp(linspace(ln sigma_min, ln sigma_max, 1000)).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from tunelab.errors import TunelabError
from tunelab.models.checkpoint import export_diffusers, import_diffusers, inspect_file, load_checkpoint, save_checkpoint
from tunelab.models.prediction import PredictionRecord, base_record


def comfy_model_type(sd: dict) -> tuple[str, dict]:
    """ComfyUI's SDXL.model_type: (ModelType name, the sampling_settings it sets)."""
    if "edm_mean" in sd and "edm_std" in sd:
        return "EDM", {"sigma_data": 0.5, "sigma_max": 80.0, "sigma_min": 0.002}
    if "edm_vpred.sigma_max" in sd:
        settings = {"sigma_max": float(sd["edm_vpred.sigma_max"].item())}
        if "edm_vpred.sigma_min" in sd:
            settings["sigma_min"] = float(sd["edm_vpred.sigma_min"].item())
        return "V_PREDICTION_EDM", settings
    if "v_pred" in sd:
        return "V_PREDICTION", {"zsnr": True} if "ztsnr" in sd else {}
    return "EPS", {}


def as_record(model_type: str, settings: dict) -> PredictionRecord:
    """The tunelab record that samples like ComfyUI's model_sampling for that type."""
    if model_type == "EDM":
        return PredictionRecord("edm", edm_sigmas=(settings["sigma_min"], settings["sigma_max"]))
    if model_type == "V_PREDICTION_EDM":  # ModelSamplingContinuousEDM's default sigma_min
        return PredictionRecord("v", edm_sigmas=(settings.get("sigma_min", 0.002), settings["sigma_max"]))
    if model_type == "V_PREDICTION":
        return PredictionRecord("v", ztsnr=settings.get("zsnr", False))
    return PredictionRecord()


EMPTY = torch.zeros(0)
MARKER_SETS = {
    "none": {},
    "v_pred": {"v_pred": EMPTY},
    "v_pred + ztsnr": {"v_pred": EMPTY, "ztsnr": EMPTY},
    "ztsnr alone": {"ztsnr": EMPTY},
    "edm_vpred (CosXL)": {"edm_vpred.sigma_max": torch.tensor(120.0), "edm_vpred.sigma_min": torch.tensor(0.002)},
    "edm_vpred.sigma_max alone": {"edm_vpred.sigma_max": torch.tensor(80.0)},
    "edm_vpred.sigma_min alone": {"edm_vpred.sigma_min": torch.tensor(0.01)},
    "edm_vpred + v_pred + ztsnr": {"edm_vpred.sigma_max": torch.tensor(120.0), "v_pred": EMPTY, "ztsnr": EMPTY},
    "edm_mean + edm_std (Playground)": {"edm_mean": torch.zeros(1, 4, 1, 1), "edm_std": torch.ones(1, 4, 1, 1)},
    "edm_mean alone": {"edm_mean": torch.zeros(1, 4, 1, 1)},
    "edm_mean + edm_std + v_pred": {"edm_mean": torch.zeros(1, 4, 1, 1), "edm_std": torch.ones(1, 4, 1, 1),
                                    "v_pred": EMPTY},
}
# Metadata ComfyUI ignores; tunelab too, once a file has any marker.
METADATA = [{}, {"modelspec.prediction_type": "v", "tunelab.ztsnr": "true"}, {"modelspec.prediction_type": "epsilon"}]


@pytest.mark.parametrize("markers", [k for k in MARKER_SETS if k != "none"])
@pytest.mark.parametrize("meta", range(len(METADATA)))
def test_every_marker_combination_reads_as_comfyui_reads_it(markers, meta):
    sd = MARKER_SETS[markers]
    expected = as_record(*comfy_model_type(sd))
    assert PredictionRecord.read(sd, METADATA[meta]) == expected
    assert PredictionRecord.read(sd.keys(), METADATA[meta], values=sd) == expected


def test_without_markers_the_metadata_decides_a_documented_difference():
    """ComfyUI samples a file without markers as epsilon whatever its metadata; kohya marks
    v-prediction only in the metadata, so tunelab reads it (and its saves add the markers)."""
    assert comfy_model_type({}) == ("EPS", {})
    assert PredictionRecord.read({}, {}) == PredictionRecord()
    assert PredictionRecord.read({}, {"modelspec.prediction_type": "v"}) == PredictionRecord("v")
    assert PredictionRecord.read({}, {"ss_v_parameterization": "True", "ss_zero_terminal_snr": "True"}) == \
        PredictionRecord("v", ztsnr=True)


def test_a_kohya_v_file_saved_by_tunelab_is_marked_for_comfyui(tmp_path, toy_checkpoint):
    src = tmp_path / "kohya-v.safetensors"
    save_file(load_file(toy_checkpoint), src, metadata={"modelspec.prediction_type": "v", "ss_v_parameterization": "True"})
    out = save_checkpoint(load_checkpoint(src), tmp_path / "marked.safetensors", dtype="fp32")
    assert comfy_model_type(load_file(out)) == ("V_PREDICTION", {})


def _discrete_reference(zsnr: bool) -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    if zsnr:  # rescale_zero_terminal_snr_sigmas
        root = (1 / (sigmas * sigmas + 1)).sqrt()
        first, last = root[0].clone(), root[-1].clone()
        root -= last
        root *= first / (first - last)
        alphas_bar = root ** 2
        alphas_bar[-1] = 4.8973451890853435e-08
        sigmas = ((1 - alphas_bar) / alphas_bar) ** 0.5
    return sigmas.float()


@pytest.mark.parametrize("name", ["none", "v_pred", "v_pred + ztsnr", "ztsnr alone", "edm_vpred (CosXL)",
                                  "edm_vpred.sigma_max alone"])
def test_the_sigmas_a_sampler_gets_are_comfyuis(name):
    from tunelab.models.arch import load_arch

    model_type, settings = comfy_model_type(MARKER_SETS[name])
    record = PredictionRecord.read(MARKER_SETS[name])
    if model_type == "V_PREDICTION_EDM":
        lo, hi = settings.get("sigma_min", 0.002), settings["sigma_max"]
        expected = torch.linspace(math.log(lo), math.log(hi), 1000).exp()
    else:
        expected = _discrete_reference(settings.get("zsnr", False))
    got = record.sigma_table(load_arch("toy").scheduler)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    if settings.get("zsnr"):  # ComfyUI/A1111 start a ZTSNR model at sigma 4518.8 (diffusers' Euler: 4096)
        assert abs(float(got[-1]) - 4518.8) < 0.1


def test_edm_markers_survive_load_and_save_and_are_read_from_the_header(tmp_path, toy_checkpoint, monkeypatch):
    import safetensors

    tensors = load_file(toy_checkpoint)
    tensors.update({"edm_vpred.sigma_max": torch.tensor(120.0), "edm_vpred.sigma_min": torch.tensor(0.002)})
    src = tmp_path / "cosxl.safetensors"
    save_file(tensors, src, metadata={"modelspec.prediction_type": "v"})
    out = save_checkpoint(load_checkpoint(src), tmp_path / "again.safetensors", dtype="fp32")
    again = load_file(out)
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    expected = as_record(*comfy_model_type(tensors))
    assert expected.describe() == "v (EDM sigmas 0.002-120)"

    def no_mmap(*args, **kwargs):
        raise AssertionError("header-only readers memory-mapped the file")

    monkeypatch.setattr(safetensors, "safe_open", no_mmap)
    assert base_record(str(src)) == expected  # header + the two scalars' 8 bytes
    assert inspect_file(src)["prediction"] == expected.describe()


def test_a_record_change_rewrites_the_edm_markers(toy_components):
    extras, meta = {"edm_vpred.sigma_max": torch.tensor(120.0)}, {}
    PredictionRecord("v").stamp(extras, meta)  # converted to discrete v: the EDM markers go
    assert set(extras) == {"v_pred"}
    cosxl = PredictionRecord("v", edm_sigmas=(0.002, 120.0))
    cosxl.stamp(extras, meta)
    assert set(extras) == {"edm_vpred.sigma_min", "edm_vpred.sigma_max"}
    assert comfy_model_type(extras) == ("V_PREDICTION_EDM", {"sigma_max": 120.0, "sigma_min": pytest.approx(0.002)})
    with pytest.raises(TunelabError, match="edm_mean marker comes from the source file"):
        PredictionRecord("edm", edm_sigmas=(0.002, 80.0)).stamp({}, {})


def test_edm_v_samples_playground_is_refused_and_the_trainer_refuses_both(tmp_path, toy_components, toy_checkpoint):
    from tunelab.config import ModelSection, ObjectiveSection, RunConfig
    from tunelab.models.text import load_tokenizers
    from tunelab.sample.pipeline import build_pipeline
    from tunelab.train.trainer import check_prediction

    cosxl = dataclasses.replace(toy_components, extras={"edm_vpred.sigma_max": torch.tensor(120.0)})
    model = build_pipeline(cosxl, load_tokenizers("toy"))  # ComfyUI's ModelSamplingContinuousEDM
    assert model.noise.continuous and model.noise.sigma_max == pytest.approx(120.0, rel=1e-6)
    assert model.noise.sigma_min == pytest.approx(0.002, rel=1e-6)  # ModelSamplingContinuousEDM's default
    playground = dataclasses.replace(toy_components, extras=dict(MARKER_SETS["edm_mean + edm_std (Playground)"]))
    with pytest.raises(TunelabError, match="Playground"):
        build_pipeline(playground, load_tokenizers("toy"))
    tensors = load_file(toy_checkpoint)
    tensors["edm_vpred.sigma_max"] = torch.tensor(120.0)
    save_file(tensors, tmp_path / "cosxl.safetensors")
    cfg = RunConfig(model=ModelSection(base=str(tmp_path / "cosxl.safetensors")), objective=ObjectiveSection(prediction="v"))
    with pytest.raises(TunelabError, match="V_PREDICTION_EDM.*objective.convert_base = true"):
        check_prediction(cfg, cfg.model.base)
    converting = cfg.model_copy(update={"objective": ObjectiveSection(prediction="v", convert_base=True)})
    mine, base = check_prediction(converting, cfg.model.base)
    assert mine == PredictionRecord("v") and base.continuous


def test_a_diffusers_folder_of_an_edm_v_model_carries_its_sigmas(tmp_path, toy_components):
    import diffusers

    cosxl = PredictionRecord("v", edm_sigmas=(0.002, 120.0))
    extras, meta = {}, {}
    cosxl.stamp(extras, meta)
    folder = export_diffusers(dataclasses.replace(toy_components, extras=extras, metadata=meta), tmp_path / "d",
                              dtype="fp32")
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "EDMEulerScheduler" and config["prediction_type"] == "v_prediction"
    sched = diffusers.EDMEulerScheduler.from_config(config)
    # diffusers' EDM Euler conditions the UNet as ComfyUI's ModelSamplingContinuousEDM does
    assert float(sched.precondition_noise(torch.tensor(10.0))) == pytest.approx(0.25 * math.log(10.0))
    assert base_record(str(folder)) == PredictionRecord.of(import_diffusers(folder)) == cosxl
