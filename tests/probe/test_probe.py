"""The probe end to end on the toy world: base against itself, the in-training callback (files,
metrics tags, resume), `tunelab probe` on a run directory and on loose files, scorers, errors.

One toy run (24 images, a quarter held out, 6 steps, probes every 2 steps) is trained once per
module (~10 s) and shared."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import run_cli
from tests.train.conftest import write_run
from tunelab.errors import TunelabError

PROBE = {"enabled": True, "every_n_steps": 2, "learn_samples": 4, "preserve_seeds": [0], "preserve_steps": 8,
         "timesteps": 4}


def _index(root: Path, holdout: float) -> Path:
    from tunelab.data.buckets import BucketConfig
    from tunelab.data.index import IndexOptions, build_index
    from tunelab.toy.world import make_world

    if not (root / "images").is_dir():
        make_world(root / "images", n=24, seed=0)
    opts = IndexOptions(buckets=BucketConfig(resolution=80, min_side=32, max_side=128, step=32), holdout=holdout)
    build_index([f"folder:{root / 'images'}"], root / f"index-{holdout}.parquet", opts)
    return root / f"index-{holdout}.parquet"


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    return _index(tmp_path_factory.mktemp("probe-world"), 0.25)


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory, held_out) -> Path:
    from tunelab.train.trainer import train

    root = tmp_path_factory.mktemp("probe-run")
    cfg = write_run(root / "run.toml", held_out, root / "run", probe=PROBE)
    train(cfg)
    return root / "run"


def _by_step(rows, metric: str, set_name: str) -> dict[int, float]:
    acc: dict[int, list[float]] = {}
    for r in rows:
        if r["metric"] == metric and r["set"] == set_name:
            acc.setdefault(r["step"], []).append(r["value"])
    return {s: sum(v) / len(v) for s, v in sorted(acc.items())}


def test_base_against_itself_has_drift_exactly_zero_bitwise_repeatable(tmp_path, held_out):
    from tunelab.config import RunConfig
    from tunelab.models.arch import build_components
    from tunelab.models.text import load_tokenizers
    from tunelab.probe.suite import prepare
    from tunelab.train.step import StepModels

    cfg = RunConfig.model_validate({"model": {"base": "toy", "max_chunks": 2}, "data": {"index": str(held_out)},
                                    "probe": PROBE})
    comps, toks = build_components("toy", seed=1), load_tokenizers("toy")
    prepared = prepare(cfg, "toy", tmp_path, lambda: (comps, toks))
    models = StepModels.of(comps, toks)
    first = prepared.probe.run(models, base=prepared.base)
    again = prepared.probe.run(models, base=prepared.base)
    for name in ("learn", "preserve"):
        assert torch.count_nonzero(first.sets[name].drift) == 0, name
        assert torch.equal(first.sets[name].loss, again.sets[name].loss)  # bit for bit
        assert torch.equal(first.sets[name].loss, prepared.base_measurement.sets[name].loss)
    scalars = first.scalars()
    assert all(scalars[f"probe/drift_{s}{b}"] == 0.0 for s in ("learn", "preserve") for b in ("", "/low", "/mid", "/high"))
    assert prepared.probe.forwards == (4 + 8) * 4  # 4 held-out images + 8 toy preserve looks x 1 seed, 4 timesteps
    # A second prepare reads both files back instead of drawing the preserve images again.
    reread = prepare(cfg, "toy", tmp_path, lambda: pytest.fail("the base was loaded again"))
    assert reread.base_measurement is None
    assert torch.equal(reread.probe.run(models, base=reread.base).sets["preserve"].drift, first.sets["preserve"].drift)


def test_training_probes_write_tables_chart_and_metrics(probed_run):
    probes = probed_run / "probes"
    for name in ("sets.safetensors", "base-predictions.safetensors", "training.parquet", "training.csv", "training.png"):
        assert (probes / name).is_file(), name
    assert len(list((probes / "preserve").glob("*.png"))) == 8  # the base's drawings, to look at
    rows = pq.read_table(probes / "training.parquet").to_pylist()
    learn_loss = _by_step(rows, "loss", "learn")
    assert list(learn_loss) == [0, 2, 4, 6]
    assert learn_loss[6] < learn_loss[0]  # the toy model learns the toy world's held-out images
    for s in ("learn", "preserve"):
        drift = _by_step(rows, "drift", s)
        assert drift[0] == 0.0 and drift[2] > 0 and drift[6] > drift[2]
    metrics = pq.read_table(probed_run / "metrics.parquet").to_pylist()
    tags = {r["tag"] for r in metrics}
    for tag in ("probe/learn_loss", "probe/preserve_loss", "probe/drift_preserve", "probe/drift_learn",
                "probe/drift_preserve/high", "probe/learn_loss/low"):
        assert tag in tags, tag
    logged = {r["step"]: r["value"] for r in metrics if r["tag"] == "probe/learn_loss"}
    assert logged == pytest.approx(learn_loss)


def test_a_resumed_run_keeps_its_probe_rows_once(tmp_path, probed_run, caplog):
    from tunelab.train.trainer import train

    run = tmp_path / "run"
    shutil.copytree(probed_run, run)
    cfg_text = (probed_run.parent / "run.toml").read_text().replace(str(probed_run), str(run))
    (tmp_path / "run.toml").write_text(cfg_text)
    shutil.rmtree(run / "state" / "step-00000006")  # resume from step 4: steps 5-6 again
    sets_written = (run / "probes" / "sets.safetensors").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="tunelab"):
        train(tmp_path / "run.toml")
    assert "from step 4" in caplog.text
    rows = pq.read_table(run / "probes" / "training.parquet").to_pylist()
    before = pq.read_table(probed_run / "probes" / "training.parquet").to_pylist()
    assert rows == before  # a resumed run ends bitwise identical on the CPU, its probes too
    per_step = {}
    for r in rows:
        per_step[r["step"]] = per_step.get(r["step"], 0) + 1
    assert list(per_step) == [0, 2, 4, 6] and len(set(per_step.values())) == 1  # step 6 measured once, not twice
    assert (run / "probes" / "sets.safetensors").stat().st_mtime_ns == sets_written  # the same inputs reused


def test_probe_command_on_the_run_matches_training(probed_run, tmp_path):
    out = tmp_path / "p"
    proc = run_cli("probe", probed_run, "--out", out)
    assert "UNet forwards per checkpoint" in proc.stdout and "preserve drift" in proc.stdout
    rows = pq.read_table(out / "checkpoints.parquet").to_pylist()
    assert (out / "checkpoints.csv").is_file() and (out / "checkpoints.png").stat().st_size > 10_000
    trained = pq.read_table(probed_run / "probes" / "training.parquet").to_pylist()
    for s in ("learn", "preserve"):
        for metric in ("loss", "drift"):
            # fp32 checkpoints of the same weights on the same inputs: the training probe's numbers
            assert _by_step(rows, metric, s) == pytest.approx(_by_step(trained, metric, s), rel=1e-6, abs=1e-12)
    assert {r["checkpoint"] for r in rows} == {"base", "step-00000002", "step-00000004", "last"}


def test_probe_command_on_files_with_a_plugged_in_scorer(probed_run, tmp_path):
    ckpts = probed_run / "checkpoints"
    out = tmp_path / "files"
    proc = run_cli("probe", ckpts / "step-00000004.safetensors", ckpts / "last.safetensors",
                   "--base", ckpts / "step-00000002.safetensors", "--out", out, "--timesteps", "2",
                   "-p", "a red circle on a white background", "-p", "astolfo, solo, sky_background", "--seeds", "0",
                   "--scorer", "tunelab.toy.evaluate:reader_scorer")
    rows = pq.read_table(out / "checkpoints.parquet").to_pylist()
    assert {r["set"] for r in rows} == {"preserve"}  # loose files: no learn set without --learn
    drift = _by_step(rows, "drift", "preserve")
    assert drift[0] == 0.0 and drift[6] > drift[4] > 0  # base = step 2
    scores = {r["metric"] for r in rows if r["metric"].startswith("score/")}
    assert {"score/all", "score/subject", "score/shape", "score/stripes"} <= scores
    assert all(0.0 <= r["value"] <= 1.0 for r in rows if r["metric"].startswith("score/"))
    assert "preserve_score/all" in proc.stdout


def test_learn_needs_holdout_rows(tmp_path):
    from tunelab.config import RunConfig
    from tunelab.models.arch import build_components
    from tunelab.probe.sets import learn_set

    index = _index(tmp_path, 0.0)
    cfg = RunConfig.model_validate({"model": {"base": "toy"}, "data": {"index": str(index)}, "probe": PROBE})
    with pytest.raises(TunelabError, match="no holdout rows.*--holdout 0.05.*'train'"):
        learn_set(cfg, build_components("toy", seed=0).vae)
    cfg.probe.learn = "train"
    assert len(learn_set(cfg, build_components("toy", seed=0).vae)) == 4


@pytest.mark.parametrize("spec, message", [("nomodule", "package.module:function"),
                                           ("tunelab.nothere:f", "cannot be imported"),
                                           ("tunelab.toy.evaluate:nothere", "cannot be imported"),
                                           ("tunelab.toy.evaluate:EVAL_SEEDS", "not a function")])
def test_bad_scorers_are_named(spec, message):
    from tunelab.probe.images import load_scorer

    with pytest.raises(TunelabError, match=message):
        load_scorer(spec)


def test_reader_scorer_reads_a_world_image():
    import numpy as np

    from tunelab.toy.evaluate import reader_scorer
    from tunelab.toy.world import CONCEPT_LOOK, Look, draw, prompt_of

    look = Look("circle", "red", "white")
    image = draw(look, (64, 64), np.random.default_rng(0))
    assert reader_scorer(image, prompt_of(look)) == {"shape": 1.0, "color": 1.0, "background": 1.0, "stripes": 1.0,
                                                     "style": 1.0, "all": 1.0, "subject": 1.0}
    wrong = reader_scorer(image, "astolfo, solo, sky_background")  # asks for the concept
    assert wrong["all"] == 0.0 and wrong["shape"] == 0.0 and wrong["stripes"] == 0.0
    assert reader_scorer(draw(CONCEPT_LOOK, (64, 64), np.random.default_rng(0)), "astolfo, solo, sky_background")["all"] == 1.0
    assert reader_scorer(image, "") == {}


def test_two_processes_probe_on_rank_zero_with_the_auto_interval(tmp_path, held_out):
    """accelerate's 2-process DDP (gloo): the auto interval is agreed on by both ranks from the
    settings, rank 0 probes while rank 1 waits, and the run ends (no rank left waiting)."""
    import os
    import subprocess
    import sys

    cfg = write_run(tmp_path / "two.toml", held_out, tmp_path / "two",
                    train={"batch_size": 1, "grad_accumulation": 1, "max_steps": 2, "expect_world_size": 2},
                    save={"every_n_steps": 2}, probe={**PROBE, "every_n_steps": 0})
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29541",
           "-m", "tunelab", "train", str(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("probe at step 0") == 1 and proc.stderr.count("probe at step 2") == 1  # rank 0 only
    rows = pq.read_table(tmp_path / "two" / "probes" / "training.parquet").to_pylist()
    drift = _by_step(rows, "drift", "preserve")
    assert list(drift) == [0, 2] and drift[0] == 0.0 and drift[2] > 0


def test_config_check_refuses_a_learn_split_without_rows(tmp_path):
    index = _index(tmp_path, 0.0)
    cfg = write_run(tmp_path / "r.toml", index, tmp_path / "r", probe={"enabled": True})
    proc = run_cli("config", "check", cfg, check=False)
    assert proc.returncode == 2 and "no holdout rows" in proc.stderr and "--holdout 0.05" in proc.stderr


def test_probe_command_with_the_toy_scorer(probed_run, tmp_path):
    """`--scorer toy`: the toy world's concept (learn) and preserve sets, as `tunelab toy score` reads them."""
    out = tmp_path / "toy"
    proc = run_cli("probe", probed_run, "--out", out, "--timesteps", "1", "--scorer", "toy")
    rows = pq.read_table(out / "checkpoints.parquet").to_pylist()
    for s in ("learn", "preserve"):
        scores = _by_step(rows, "score/all", s)
        assert list(scores) == [0, 2, 4, 6] and all(0.0 <= v <= 1.0 for v in scores.values())
        assert _by_step(rows, "score/subject", s)
    assert "learn_score/all" in proc.stdout and "preserve_score/all" in proc.stdout


def test_grid_and_probes_draw_on_the_ema(tmp_path, held_out):
    """grid.weights = 'both' and probe.weights = 'ema': the EMA grid is the one its SGM file draws,
    the live grid another, and the training probe's numbers are `tunelab probe`'s on the EMA files."""
    import numpy as np
    from PIL import Image

    from tunelab.config import parse_config
    from tunelab.models.checkpoint import load_checkpoint
    from tunelab.models.text import load_tokenizers
    from tunelab.probe.command import ProbeOptions, run_probe
    from tunelab.sample.grid import render_training_grid
    from tunelab.train.trainer import train

    grid = {"prompts": ["a red circle on a white background"], "seeds": [1], "steps": 3, "cfg": 2.0, "weights": "both"}
    cfg_path = write_run(tmp_path / "run.toml", held_out, tmp_path / "run", train={"max_steps": 4},
                         probe=PROBE | {"weights": "ema"}, ema={"enabled": True, "decay": 0.9}, grid=grid)
    train(cfg_path)
    run = tmp_path / "run"
    live, ema = (sorted(p.glob("step-*/grid*.png")) for p in (run / "samples", run / "samples" / "ema"))
    assert live and len(live) == len(ema)
    pixels = lambda path: np.asarray(Image.open(path))  # noqa: E731
    assert not np.array_equal(pixels(live[-1]), pixels(ema[-1]))  # the EMA lags the live weights
    cfg = parse_config(__import__("json").loads((run / "config.json").read_text()), "config.json")
    comps = load_checkpoint(run / "checkpoints" / "ema" / "last.safetensors", "toy")
    again = render_training_grid(comps, load_tokenizers("toy"), cfg, tmp_path / "again", 4).grid
    assert np.array_equal(pixels(again), pixels(ema[-1]))
    files = [run / "checkpoints" / "ema" / n for n in ("step-00000002.safetensors", "last.safetensors")]
    rep = run_probe(files, tmp_path / "p", ProbeOptions(run=str(run)), steps=[2, 4])
    rows = pq.read_table(tmp_path / "p" / "checkpoints.parquet").to_pylist()
    trained = pq.read_table(run / "probes" / "training.parquet").to_pylist()
    for s in ("learn", "preserve"):
        assert _by_step(rows, "drift", s) == pytest.approx(_by_step(trained, "drift", s), rel=1e-6, abs=1e-12)
    assert rep.checkpoints
