"""The prediction record: one vocabulary, markers and metadata read and written in one place, kept
exactly through load -> save, carried through diffusers folders, and sampled by the right scheduler."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from tunelab.errors import TunelabError
from tunelab.models.checkpoint import export_diffusers, import_diffusers, load_checkpoint, save_checkpoint
from tunelab.models.prediction import PredictionRecord, base_record, canonical_type
from tunelab.models.safetensors_io import read_header

V_ZTSNR = PredictionRecord("v", True)


@pytest.mark.parametrize(("written", "read"), [
    ("epsilon", "epsilon"), ("v", "v"), ("v_prediction", "v"), ("v-prediction", "v"), ("vpred", "v"),
    ("flow", "flow"), ("flow_prediction", "flow"), ("EPS", "epsilon"),
])
def test_other_tools_spellings_read_as_one_vocabulary(written, read):
    assert canonical_type(written) == read


def test_unknown_type_names_the_known_ones():
    with pytest.raises(TunelabError, match="epsilon, v, flow"):
        canonical_type("edm")
    with pytest.raises(TunelabError, match="needs v-prediction"):
        PredictionRecord("epsilon", ztsnr=True)


def test_markers_win_over_metadata_as_in_comfyui():
    assert PredictionRecord.read({"v_pred"}, {"modelspec.prediction_type": "epsilon"}) == PredictionRecord("v")
    assert PredictionRecord.read({"v_pred", "ztsnr"}, {}) == V_ZTSNR
    assert PredictionRecord.read({"ztsnr"}, {}) == PredictionRecord()  # ztsnr alone means nothing
    assert PredictionRecord.read(set(), {"modelspec.prediction_type": "v", "tunelab.ztsnr": "true"}) == V_ZTSNR
    assert PredictionRecord.read(set(), {"modelspec.prediction_type": "flow", "tunelab.flow_shift": "3"}) == \
        PredictionRecord("flow", flow_shift=3.0)
    assert PredictionRecord.read(set(), {"modelspec.prediction_type": "something-new"}) == PredictionRecord()


def test_stamp_adds_and_removes_markers():
    extras, meta = {"alphas_cumprod": torch.ones(3)}, {}
    V_ZTSNR.stamp(extras, meta)
    assert set(extras) == {"alphas_cumprod", "v_pred", "ztsnr"} and extras["v_pred"].shape == (0,)
    assert meta["modelspec.prediction_type"] == "v" and meta["tunelab.ztsnr"] == "true"
    PredictionRecord("flow", flow_shift=2.5).stamp(extras, meta)
    assert set(extras) == {"alphas_cumprod"} and meta["modelspec.prediction_type"] == "flow"
    assert meta["tunelab.flow_shift"] == "2.5"
    PredictionRecord().stamp(extras, meta)
    assert "tunelab.flow_shift" not in meta and meta["modelspec.prediction_type"] == "epsilon"


def test_saved_record_is_what_the_file_says_and_loads_back(tmp_path, toy_components):
    path = save_checkpoint(toy_components, tmp_path / "v.safetensors", dtype="fp32", prediction=V_ZTSNR)
    header = read_header(path)
    assert {"v_pred", "ztsnr"} <= set(header.tensors) and header.metadata["modelspec.prediction_type"] == "v"
    assert base_record(str(path)) == V_ZTSNR  # header only
    comps = load_checkpoint(path)
    assert PredictionRecord.of(comps) == V_ZTSNR
    again = save_checkpoint(comps, tmp_path / "again.safetensors", dtype="fp32")  # no record given: the file's
    a, b = load_file(path), load_file(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the base's components were not changed by stamping a record into a saved file
    assert PredictionRecord.of(toy_components) == PredictionRecord()


def test_a_marker_of_another_dtype_round_trips_exactly(tmp_path, toy_components):
    comps = dataclasses.replace(toy_components, extras={"v_pred": torch.zeros(0, dtype=torch.float16)})
    path = save_checkpoint(comps, tmp_path / "m.safetensors", dtype="fp32")
    assert load_file(path)["v_pred"].dtype == torch.float16


@pytest.mark.parametrize("record", [V_ZTSNR, PredictionRecord("v"), PredictionRecord("flow", flow_shift=3.0)])
def test_diffusers_folders_carry_the_record(tmp_path, toy_components, record):
    extras, meta = {}, {}
    record.stamp(extras, meta)
    comps = dataclasses.replace(toy_components, extras=extras, metadata=meta)
    folder = export_diffusers(comps, tmp_path / "d", dtype="fp32")
    assert base_record(str(folder)) == record
    assert PredictionRecord.of(import_diffusers(folder)) == record
    # the folder's scheduler is one diffusers itself can build
    import diffusers

    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    cls = getattr(diffusers, config.pop("_class_name"))
    sched = cls(**config)
    if record.type != "flow":
        assert sched.config.prediction_type == record.diffusers_name
