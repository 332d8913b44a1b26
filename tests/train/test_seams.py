"""The trainer's seams: loop events and their cadence, the prediction record it stamps and the
bases it refuses, the dataset-index guard on resume, state retention, `train(RunConfig)`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.train.conftest import write_run
from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.models.prediction import PredictionRecord
from tunelab.models.safetensors_io import read_header
from tunelab.train.callbacks import Callback, Callbacks
from tunelab.train.trainer import train


class Recorder(Callback):
    """Writes down every event it sees, with the step and (for checkpoints) the file name."""

    every_n_steps = 2

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, str]] = []

    def on_start(self, ctx) -> None:
        self.seen.append(("start", ctx.progress.step, ""))

    def on_step(self, ctx) -> None:
        self.seen.append(("step", ctx.progress.step, ""))

    def on_checkpoint(self, ctx) -> None:
        self.seen.append(("checkpoint", ctx.progress.step, ctx.checkpoint.name))

    def on_end(self, ctx) -> None:
        self.seen.append(("end", ctx.progress.step, ""))


def test_loop_events_fire_in_order_with_their_cadence_and_states_are_retained(tmp_path, world):
    cfg = load_config(write_run(tmp_path / "r.toml", world, tmp_path / "r", train={"max_steps": 5},
                                save={"every_n_steps": 1, "keep_states": 1, "keep_last": 2}))
    rec = Recorder()
    result = train(cfg, callbacks=Callbacks([rec]))  # a RunConfig, not a path
    assert result.steps == 5
    assert rec.seen == [
        ("start", 0, ""),
        ("checkpoint", 1, "step-00000001.safetensors"),
        ("checkpoint", 2, "step-00000002.safetensors"), ("step", 2, ""),
        ("checkpoint", 3, "step-00000003.safetensors"),
        ("checkpoint", 4, "step-00000004.safetensors"), ("step", 4, ""),
        ("checkpoint", 5, "last.safetensors"),  # the last step is not a STEP event of cadence 2 ...
        ("end", 5, ""),  # ... and END always fires
    ]
    assert sorted(p.name for p in (tmp_path / "r" / "state").iterdir()) == ["step-00000005"]  # keep_states = 1
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == \
        ["last.safetensors", "step-00000003.safetensors", "step-00000004.safetensors"]  # keep_last = 2


@pytest.fixture(scope="module")
def eps_base(tmp_path_factory) -> Path:
    """A toy checkpoint *file*: it says it predicts epsilon."""
    from tunelab.models.checkpoint import new_checkpoint

    return new_checkpoint("toy", tmp_path_factory.mktemp("base") / "eps.safetensors", seed=5, dtype="fp32")


def test_vpred_ztsnr_run_from_an_epsilon_base_is_marked_and_sampled_as_such(tmp_path, world, eps_base):
    run = tmp_path / "v"
    objective = {"prediction": "v", "zero_terminal_snr": True, "convert_base": True}
    cfg = write_run(tmp_path / "v.toml", world, run, model={"base": str(eps_base)}, objective=objective,
                    train={"max_steps": 2}, save={"every_n_steps": 1})
    dry = run_cli("train", cfg, "--dry-run").stderr
    assert "objective v + zero-terminal SNR (converting the base's epsilon)" in dry
    train(cfg)
    for name in ("step-00000001.safetensors", "last.safetensors"):
        header = read_header(run / "checkpoints" / name)
        assert {"v_pred", "ztsnr"} <= set(header.tensors), name
        assert header.metadata["modelspec.prediction_type"] == "v"
    # each checkpoint names its base (file name, title, modelspec hash of its tensor data) and step
    from tunelab.models.safetensors_io import data_sha256

    meta = read_header(run / "checkpoints" / "step-00000001.safetensors").metadata
    assert (meta["tunelab.base"], meta["tunelab.base_title"]) == ("eps.safetensors", "eps")
    assert meta["tunelab.base_hash"] == data_sha256(eps_base) == read_header(eps_base).metadata["modelspec.hash_sha256"]
    assert (meta["tunelab.run"], meta["tunelab.step"], meta["ss_steps"]) == ("t", "1", "1")
    # `tunelab grid` is not told: it reads the record and samples v-prediction on a ZTSNR schedule
    proc = run_cli("-v", "grid", run / "checkpoints" / "last.safetensors", "-p", "red circle", "--steps", "2",
                   "--tokenizers", "toy", "--out", tmp_path / "grid")
    assert "v + zero-terminal SNR" in proc.stderr
    from tunelab.sample.grid import GridSpec, load_for_sampling

    model = load_for_sampling(str(run / "checkpoints" / "last.safetensors"), GridSpec(prompts=["x"], tokenizers="toy"))
    assert model.prediction == PredictionRecord("v", True)


def test_an_objective_that_contradicts_the_base_is_refused_before_any_weight_loads(tmp_path, world, eps_base,
                                                                                  monkeypatch):
    import tunelab.models.checkpoint as checkpoint

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the objective was checked")

    monkeypatch.setattr(checkpoint, "load_checkpoint", no_loading)
    cfg = load_config(write_run(tmp_path / "c.toml", world, tmp_path / "c", model={"base": str(eps_base)},
                                objective={"prediction": "v"}))
    with pytest.raises(TunelabError, match="objective.convert_base = true") as err:
        train(cfg)
    assert "predicts epsilon" in str(err.value) and "objective.prediction = 'epsilon'" in str(err.value)
    assert not (tmp_path / "c" / "state").exists() and not (tmp_path / "c" / "checkpoints").exists()
    checked = run_cli("config", "check", tmp_path / "c.toml", check=False)  # `config check` says the same
    assert checked.returncode == 2 and "objective.convert_base = true" in checked.stderr


def test_a_rebuilt_index_is_refused_on_resume(tmp_path):
    from tunelab.data.buckets import BucketConfig
    from tunelab.data.index import IndexOptions, build_index
    from tunelab.toy.world import make_world

    opts = IndexOptions(buckets=BucketConfig(resolution=80, min_side=32, max_side=128, step=32))
    index = tmp_path / "index.parquet"
    make_world(tmp_path / "a", n=16, seed=0)
    build_index([f"folder:{tmp_path / 'a'}"], index, opts)
    cfg = load_config(write_run(tmp_path / "r.toml", index, tmp_path / "r", train={"max_steps": 2},
                                save={"every_n_steps": 1}))
    train(cfg)
    # The same path, the same number of images and the same file names, other images.
    make_world(tmp_path / "b", n=16, seed=1)
    build_index([f"folder:{tmp_path / 'b'}"], index, opts)
    with pytest.raises(TunelabError, match="dataset index changed") as err:
        train(cfg)  # the same run file: only the data changed
    assert "--allow-config-change" in str(err.value) and "new run.output_dir" in str(err.value)
    assert train(cfg, allow_config_change=True).steps == 2  # the user can take the new data on purpose


def test_a_kohya_npz_cache_trains_as_it_is(tmp_path, world):
    """`data.latents` pointing at kohya's .npz files beside the images: the trainer reads them."""
    import os

    import numpy as np

    from tunelab.data.loader import IndexTable

    table = IndexTable(world)
    images = Path(os.path.dirname(table.records([0])[0]["path"]))
    cache = tmp_path / "kohya"  # kohya's fine-tuning layout: KEY.npz in one folder
    cache.mkdir()
    for i, rec in enumerate(table.records(range(len(table)))):
        bw, bh = rec["bucket_width"], rec["bucket_height"]
        lat = np.random.default_rng(i).standard_normal((4, bh // 8, bw // 8)).astype(np.float32)
        np.savez(cache / f"{rec['key']}.npz", latents=lat, original_size=np.array([rec["width"], rec["height"]]),
                 crop_ltrb=np.array([0, 0, bw, bh]))
    assert not list(images.glob("*.npz"))  # nothing beside the images: the cache folder is what is read
    cfg = load_config(write_run(tmp_path / "k.toml", world, tmp_path / "k", data={"latents": str(cache)},
                                train={"max_steps": 2}))
    assert train(cfg).steps == 2
