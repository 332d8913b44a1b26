"""`tunelab grid` end to end, through a real subprocess."""

from __future__ import annotations

import json

from tests.conftest import run_cli


def test_grid_cli_end_to_end(tmp_path):
    from tunelab.models.checkpoint import new_checkpoint

    for seed in (1, 2):  # in-process: each CLI start costs seconds of imports
        new_checkpoint("toy", tmp_path / f"step-{seed}00.safetensors", seed=seed, dtype="fp32")
    out = tmp_path / "grid"
    proc = run_cli("grid", tmp_path / "step-100.safetensors", tmp_path / "step-200.safetensors",
                   "-p", "(1boy:0), [astolfo]", "--empty-prompt", "--uncond", "empty", "--pad-conds",
                   "--z", "seed: 460372993, 744089893", "--sampler", "DDIM CFG++", "--cfg", "6", "--steps", "2",
                   "--pag-scale", "1", "--seg-scale", "3", "--format", "png", "--out", out)
    assert "wrote 8 images (2 checkpoint load(s))" in proc.stdout
    side = json.loads((out / "grid.json").read_text())
    assert len(side["cells"]) == 8 and len(side["sheets"]) == 3
    assert side["sheets"][-1] == "grid-s-var-64x64-cfg6-st2.png"
    assert all((out / s).exists() for s in side["sheets"])
    from tunelab.sample.infotext import parse_infotext, read_infotext

    info = parse_infotext(read_infotext(out / side["cells"][0]["file"]))
    assert info["Sampler"] == "DDIM CFG++" and info["CFG scale"] == "6" and info["Uncond"] == "empty"
    assert info["Pad conds"] == "True" and side["spec"]["base"]["comma_backtrack"] == 20
    assert len(info["Model hash"]) == 10
    # regenerating from grid.json is tested in-process (test_grid.py): a second CLI start costs ~10 s


def test_grid_cli_bad_input_is_one_line(tmp_path):
    proc = run_cli("grid", tmp_path / "nope.safetensors", "--sampler", "Eulr", "--out", tmp_path / "g", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and "did you mean" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
