"""Header metadata through re-saves, against the SAI model spec and kohya's sd-scripts.

References (re-derived here, not imported):
- Stability-AI/ModelSpec README.md, table row `hash_sha256`: "A hash of all tensor content (ie
  excluding the header section), with `0x` prefix"; examples/python/example_no_reqs.py, `process()`:
  read the 8-byte header length, skip the header, sha256 of everything after it.
- the same README, "Tool Recommendations / Trainers": copy pre-existing keys from the source file,
  auto-generate the hash, date and the like.
- kohya-ss/sd-scripts library/sai_model_spec.py, `precalculate_safetensors_hashes`: sha256 updated
  with each tensor's bytes (`safetensors.torch.save({"tensor": t})` after its header), tensor by tensor.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tunelab.models.checkpoint import Lineage, load_checkpoint, save_checkpoint
from tunelab.models.safetensors_io import data_sha256, read_header

STALE_HASH = "0x" + "ab" * 32
# What a file from elsewhere carries: a merged, kohya-trained SDXL-class base (8 extra keys).
SOURCE_META = {
    "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "tunelab-toy-sdxl", "modelspec.implementation": "sgm",
    "modelspec.title": "Evo 215c", "modelspec.date": "2024-05-01T12:00:00", "modelspec.resolution": "1024x1024",
    "modelspec.author": "someone", "modelspec.license": "CreativeML Open RAIL++-M",
    "modelspec.description": "a merged base", "modelspec.merged_from": "base A, finetune B",
    "modelspec.trigger_phrase": "astolfo", "modelspec.hash_sha256": STALE_HASH,
    "ss_steps": "777917", "ss_tag_frequency": json.dumps({"1_img": {"car": 3}}),
    "sshs_model_hash": "deadbeef", "other_tool.note": "kept as it is",
}
IDENTITY = ("modelspec.author", "modelspec.license", "modelspec.description", "modelspec.trigger_phrase",
            "other_tool.note")


def spec_hash(path: Path) -> str:
    """ModelSpec's own recipe (example_no_reqs.py): sha256 of the bytes after the header."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return "0x" + hashlib.sha256(raw[8 + n:]).hexdigest()


def kohya_hash(path: Path) -> str:
    """sd-scripts' precalculate_safetensors_hashes, fed the file's tensors in data order."""
    header = read_header(path)
    tensors = load_file(path)
    digest = hashlib.sha256()
    for name in sorted(header.tensors, key=lambda k: header.tensors[k].begin):
        raw = safetensors.torch.save({"tensor": tensors[name]})
        (n,) = struct.unpack("<Q", raw[:8])
        digest.update(raw[8 + n:])
    return "0x" + digest.hexdigest()


@pytest.fixture(scope="module")
def wild(tmp_path_factory, toy_checkpoint) -> Path:
    """The toy model's tensors with SOURCE_META, written by safetensors' own writer."""
    path = tmp_path_factory.mktemp("wild") / "evo.safetensors"
    save_file(load_file(toy_checkpoint), path, metadata=SOURCE_META)
    return path


def test_hash_sha256_is_the_specs_hash_of_the_tensor_data(tmp_path, toy_components):
    a = save_checkpoint(toy_components, tmp_path / "a.safetensors", dtype="fp16", title="one title")
    stated = read_header(a).metadata["modelspec.hash_sha256"]
    assert stated == spec_hash(a) == kohya_hash(a) == data_sha256(a)
    assert stated.startswith("0x") and len(stated) == 66
    # the tensors decide it, not the header: another title, the same hash; another dtype, another
    b = save_checkpoint(toy_components, tmp_path / "b.safetensors", dtype="fp16", title="another title")
    c = save_checkpoint(toy_components, tmp_path / "c.safetensors", dtype="fp32")
    assert read_header(b).metadata["modelspec.hash_sha256"] == stated == spec_hash(b)
    assert read_header(c).metadata["modelspec.hash_sha256"] == spec_hash(c) != stated


def test_convert_keeps_the_source_metadata_and_rewrites_only_what_changed(tmp_path, wild):
    from tunelab.cli import app

    out = tmp_path / "evo-fp16.safetensors"
    res = CliRunner().invoke(app, ["model", "convert", str(wild), "--out", str(out), "--dtype", "fp16"])
    assert res.exit_code == 0, res.output
    meta = read_header(out).metadata
    for key in (*IDENTITY, "modelspec.merged_from", "ss_steps", "ss_tag_frequency",
                "modelspec.title", "modelspec.date", "modelspec.resolution"):
        assert meta[key] == SOURCE_META[key], key  # the same model: its description, history and date
    assert meta["modelspec.hash_sha256"] == spec_hash(out) != STALE_HASH  # recomputed for the new bytes
    assert "sshs_model_hash" not in meta  # a hash of other bytes is dropped, not carried wrong
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["tunelab.dtype"] == "fp16" and meta["modelspec.prediction_type"] == "epsilon"
    assert not any(k.startswith("tunelab.base") for k in meta)  # a conversion is not a new model


def test_a_trained_checkpoint_names_its_base_and_drops_the_base_history(tmp_path, wild):
    comps = load_checkpoint(wild)
    out = save_checkpoint(comps, tmp_path / "step-00000010.safetensors", dtype="fp16", title="run step-10",
                          training={"steps": 10, "learning_rate": 1.5e-6}, lineage=Lineage.of(comps, "run", 10))
    meta = read_header(out).metadata
    for key in IDENTITY:
        assert meta[key] == SOURCE_META[key], key  # author, license, description, trigger phrase: inherited
    for key in ("modelspec.merged_from", "ss_tag_frequency", "sshs_model_hash"):
        assert key not in meta, key  # the base's history is not presented as this model's
    assert meta["ss_steps"] == "10" and meta["ss_learning_rate"] == "1.5e-06"
    assert meta["modelspec.title"] == "run step-10" and meta["modelspec.date"] != SOURCE_META["modelspec.date"]
    assert meta["modelspec.resolution"] == "64x64"  # the preset's, not the base's claim
    assert meta["tunelab.base"] == "evo.safetensors" and meta["tunelab.base_title"] == "Evo 215c"
    assert meta["tunelab.base_hash"] == spec_hash(wild) != STALE_HASH  # computed from the base's bytes
    assert meta["tunelab.run"] == "run" and meta["tunelab.step"] == "10"
    assert meta["modelspec.hash_sha256"] == spec_hash(out)
    # a checkpoint of that checkpoint names it, not the first base
    again = load_checkpoint(out)
    meta2 = read_header(save_checkpoint(again, tmp_path / "next.safetensors", lineage=Lineage.of(again, "run2", 3))).metadata
    assert meta2["tunelab.base"] == out.name and meta2["tunelab.base_hash"] == meta["modelspec.hash_sha256"]
    assert meta2["tunelab.run"] == "run2" and "ss_steps" not in meta2


def test_a_merged_file_gets_a_model_header(tmp_path, wild, toy_checkpoint):
    """What `merge run` does to sd-mecha's output (which carries only `mecha_recipe`). kohya-ss/
    sd-scripts library/sai_model_spec.py, `build_merged_from`: the models' titles (`modelspec.title`,
    else the file name without extension), joined by ", "."""
    from tunelab.models.checkpoint import stamp_merge

    tensors = load_file(toy_checkpoint)
    tensors["v_pred"] = torch.zeros(0)  # sd-mecha carries the markers (sdxl-sgm lists them)
    raw = tmp_path / ".merged.partial.safetensors"
    save_file(tensors, raw, metadata={"mecha_recipe": "version 0.1.0\n..."})
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, plain)  # no metadata: its file name stands for it
    out = stamp_merge(raw, tmp_path / "merged.safetensors", [wild, plain], "fp16")
    meta = read_header(out).metadata
    assert meta["modelspec.merged_from"] == "Evo 215c, plain"
    assert meta["modelspec.title"] == "merged" and meta["modelspec.architecture"] == "tunelab-toy-sdxl"
    assert meta["modelspec.prediction_type"] == "v" and meta["mecha_recipe"] == "version 0.1.0\n..."
    assert meta["modelspec.hash_sha256"] == spec_hash(out) == spec_hash(raw)  # the bytes are copied as they are
    assert "modelspec.author" not in meta and "ss_steps" not in meta  # several sources: no single author
    a, b = load_file(raw), load_file(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_merge_run_writes_the_model_header(tmp_path, wild, toy_checkpoint):
    """The same through sd-mecha itself (slow: sd-mecha's import and merge take ~20 s here)."""
    from tunelab.merge.run import run_file

    other = tmp_path / "other.safetensors"
    other.write_bytes(toy_checkpoint.read_bytes())  # tunelab's toy file: its title is "toy"
    recipe = tmp_path / "r.mecha"
    recipe.write_text(f'version 0.1.0\nmodel "{wild}" model_config="sdxl-sgm" merge_space="weight"\n'
                      f'model "{other}" model_config="sdxl-sgm" merge_space="weight"\n'
                      'merge "weighted_sum" &0 &1 alpha=0.5\n')
    merged = run_file(recipe, tmp_path / "merged.safetensors", progress=False)
    meta = read_header(merged.path).metadata
    assert meta["modelspec.merged_from"] == "Evo 215c, toy" and meta["mecha_recipe"]
    assert meta["modelspec.hash_sha256"] == spec_hash(merged.path)
