"""Merge back on the toy world: a probed finetune merged into its base at a ratio, every
candidate measured on the run's own probe inputs, one table and one chart; the report shows it."""

from __future__ import annotations

import json

from tests.conftest import run_cli

def test_merge_back_measures_every_candidate_and_the_report_shows_it(probed_run):
    run, base = probed_run
    last = run / "checkpoints" / "last.safetensors"
    proc = run_cli("merge", "back", "--base", base, "--finetune", last, "--ratios", "0.5", "--run", run, "--probe",
                   "--drift", "--grid", "--dtype", "fp32", timeout=600)
    folder = run / "merges" / "back"
    rows = json.loads((folder / "merge-back.json").read_text())["rows"]
    assert [r["ratio"] for r in rows] == [0.0, 0.5, 1.0] and [r["parts"] for r in rows] == ["base", "all", "finetune"]
    assert rows[0]["probe/drift_preserve"] == 0.0  # the base against itself
    for key in ("probe/drift_preserve", "weights/distance_from_base"):  # halfway moves about halfway
        assert rows[0][key] < rows[1][key] < rows[2][key], key
    assert abs(rows[1]["weights/distance_from_base"] / rows[2]["weights/distance_from_base"] - 0.5) < 1e-3
    assert (folder / "back-0.5.safetensors").is_file() and (folder / "back-0.5.mecha").is_file()
    assert (folder / "merge-back.png").stat().st_size > 5000 and "table and chart" in proc.stdout
    assert [r.get("grid") for r in rows] == [f"grids/step-0000000{i}/{(folder / r['grid']).name}" for i, r in enumerate(rows)]
    assert all((folder / r["grid"]).is_file() for r in rows)  # base, the candidate, the finetune: one grid each
    run_cli("report", run, "--no-drift")
    html = (run / "report.html").read_text()
    assert "merging back" in html and "back-0.5.safetensors" in html
