"""`tunelab drift` over a run's checkpoints compares them in training order, not by file name
(issue 20): `checkpoints/*.safetensors` expands to epoch-*, last, step-*; the step each file was
written at is what `RunDir.checkpoint_files()` orders by."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from tests.analyze.test_drift import write_models
from tunelab.analyze import drift

# name -> the step it was written at (epoch files and `last` carry it in `ss_steps` only)
WRITTEN_AT = {"step-00000002": 2, "epoch-0001": 3, "step-00000004": 4, "epoch-0002": 6, "last": 7}


def _run_checkpoints(tmp_path: Path) -> tuple[Path, list[Path]]:
    (tmp_path / "m").mkdir()
    models = write_models(tmp_path / "m", 1 + len(WRITTEN_AT))  # a base, then one more step of noise each
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for src, (name, step) in zip(models[1:], WRITTEN_AT.items()):
        save_file(load_file(src), folder / f"{name}.safetensors", metadata={"ss_steps": str(step)})
    return models[0], sorted(folder.glob("*.safetensors"))  # what a shell glob gives


def test_a_runs_checkpoints_are_compared_in_training_order(tmp_path):
    base, globbed = _run_checkpoints(tmp_path)
    assert [p.stem for p in globbed][:3] == ["epoch-0001", "epoch-0002", "last"]  # by name: wrong
    training = [f"{name}.safetensors" for name in WRITTEN_AT]

    rep = drift.run_drift(globbed, tmp_path / "o", plots=False, progress=False)
    assert rep.doc["ml"] == training and rep.doc["order"] == "training step"  # before: the glob's order
    assert "in training order, by the step recorded in each file" in "\n".join(drift.summary(rep))
    # The trajectory then grows step by step (each file adds noise to the one before).
    far = rep.doc["dm"]["all"][0]
    assert far[1:] == sorted(far[1:])

    with_base = drift.run_drift([base, *globbed], tmp_path / "o2", plots=False, progress=False)
    assert with_base.doc["ml"] == ["m0.safetensors", *training]  # the reference stays first


def test_other_files_keep_the_command_line_order(tmp_path):
    base, globbed = _run_checkpoints(tmp_path)
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.copy(base, elsewhere)
    given = [globbed[2], elsewhere, globbed[0]]  # not all from the run after the first file
    assert drift.training_order(given) == (given, False)
    renamed = globbed[0].with_name("mine-keep.safetensors")  # not a name tunelab writes
    shutil.copy(globbed[0], renamed)
    assert drift.training_order([globbed[1], renamed, globbed[0]])[1] is False
    rep = drift.run_drift([globbed[2], base], tmp_path / "o", plots=False, progress=False)
    assert rep.doc["ml"] == ["last.safetensors", "m0.safetensors"] and rep.doc["order"] == "as given"
