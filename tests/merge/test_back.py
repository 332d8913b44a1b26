"""Merge back on the toy world: a probed finetune merged into its base at a ratio, every
candidate measured on the run's own probe inputs, one table and one chart; the report shows it."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
from tests.train.conftest import write_run

PROBE = {"enabled": True, "every_n_steps": 0, "learn_samples": 2, "preserve_seeds": [0], "preserve_steps": 4,
         "timesteps": 2}


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory):
    from tunelab.data.buckets import BucketConfig
    from tunelab.data.index import IndexOptions, build_index
    from tunelab.models.checkpoint import new_checkpoint
    from tunelab.toy.world import make_world
    from tunelab.train.trainer import train

    root = tmp_path_factory.mktemp("back")
    make_world(root / "img", n=12, seed=0, split="concept")
    build_index([f"folder:{root / 'img'}"], root / "i.parquet",
                IndexOptions(buckets=BucketConfig(resolution=80, min_side=32, max_side=128, step=32), holdout=0.25))
    base = new_checkpoint("toy", root / "base.safetensors", seed=5, dtype="fp32")
    cfg = write_run(root / "r.toml", root / "i.parquet", root / "run", probe=PROBE, model={"base": str(base)},
                    train={"max_steps": 4}, save={"every_n_steps": 0})
    train(cfg)
    return root / "run", base


def test_merge_back_measures_every_candidate_and_the_report_shows_it(probed_run):
    run, base = probed_run
    last = run / "checkpoints" / "last.safetensors"
    proc = run_cli("merge", "back", "--base", base, "--finetune", last, "--ratios", "0.5", "--run", run, "--probe",
                   "--drift", "--dtype", "fp32", timeout=600)
    folder = run / "merges" / "back"
    rows = json.loads((folder / "merge-back.json").read_text())["rows"]
    assert [r["ratio"] for r in rows] == [0.0, 0.5, 1.0] and [r["parts"] for r in rows] == ["base", "all", "finetune"]
    assert rows[0]["probe/drift_preserve"] == 0.0  # the base against itself
    for key in ("probe/drift_preserve", "weights/distance_from_base"):  # halfway moves about halfway
        assert rows[0][key] < rows[1][key] < rows[2][key], key
    assert abs(rows[1]["weights/distance_from_base"] / rows[2]["weights/distance_from_base"] - 0.5) < 1e-3
    assert (folder / "back-0.5.safetensors").is_file() and (folder / "back-0.5.mecha").is_file()
    assert (folder / "merge-back.png").stat().st_size > 5000 and "table and chart" in proc.stdout
    run_cli("report", run, "--no-drift")
    html = (run / "report.html").read_text()
    assert "merging back" in html and "back-0.5.safetensors" in html
