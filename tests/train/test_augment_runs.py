"""flip_aug and random_crop through `tunelab data cache`, `config check` and `tunelab train` on the
toy world (in-process: a subprocess costs seconds of imports): a run from a cache with the mirrored
latents, a run cropping at random on the fly, their refusals before anything runs, and a run cut
after its step-2 state and resumed, which ends bitwise where an uninterrupted one does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tests.train.conftest import write_run
from tests.train.test_data_checks import _config_check
from tunelab.cli import app
from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.train.callbacks import Callback, Callbacks
from tunelab.train.trainer import setup, train

FAST = {"train.parts": {"text_encoder": "off"}, "report": {"enabled": False}}


def _cache(index: Path, out: Path, *flags: str) -> None:
    res = CliRunner().invoke(app, ["data", "cache", str(index), "--out", str(out), "--model", "toy", *flags])
    assert res.exit_code == 0, (res.output, res.exception)


def _plain_shards(index: Path, out: Path) -> None:
    """Shards of the index's shapes without mirrored latents, as a cache made before --flip (cheap: zeros)."""
    import numpy as np

    from tunelab.data.latents import _write_shard
    from tunelab.data.loader import IndexTable

    table = IndexTable(index)
    out.mkdir()
    _write_shard(out, 0, {r["key"]: (np.zeros((4, r["bucket_height"] // 8, r["bucket_width"] // 8), np.float16),
                                     {"original_size": [r["width"], r["height"]], "crop_ltrb": [0, 0, 1, 1]})
                          for r in table.records(range(len(table)))})


def test_flip_aug_trains_from_a_cache_with_the_mirrored_latents(tmp_path, world, monkeypatch, capsys):
    _plain_shards(world, tmp_path / "plain")
    _cache(world, tmp_path / "flip", "--flip")
    refused = write_run(tmp_path / "r0.toml", world, tmp_path / "r0", data={"latents": str(tmp_path / "plain"),
                                                                           "flip_aug": True}, **FAST)
    code, _, err = _config_check(monkeypatch, capsys, refused)
    assert code == 2 and "--flip" in err and "NEW_DIR" in err  # before anything runs
    with pytest.raises(TunelabError, match="cached without the mirrored images"):
        train(refused, dry_run=True)
    run_file = write_run(tmp_path / "r.toml", world, tmp_path / "r", data={"latents": str(tmp_path / "flip"),
                                                                          "flip_aug": True},
                         train={"max_steps": 4}, **FAST)
    code, out, _ = _config_check(monkeypatch, capsys, run_file)
    assert code == 0 and "latents: tunelab shards with the mirrored images, fit the index" in out
    s = setup(load_config(run_file), dry_run=True)
    flips = [f for batch in s.data.loader for f in batch["flipped"]]  # one epoch as the run reads it
    assert 0 < sum(flips) < len(flips)
    result = train(run_file, callbacks=Callbacks([]))
    assert result.steps == 4 and (tmp_path / "r" / "checkpoints" / "last.safetensors").is_file()


def test_random_crop_trains_encoding_on_the_fly_and_refuses_a_cache(tmp_path, world, monkeypatch, capsys):
    refused = write_run(tmp_path / "r0.toml", world, tmp_path / "r0", data={"latents": str(tmp_path),
                                                                           "random_crop": True}, **FAST)
    code, _, err = _config_check(monkeypatch, capsys, refused)
    assert code == 2 and "data.random_crop needs images decoded while training" in err and "data.latents empty" in err
    run_file = write_run(tmp_path / "r.toml", world, tmp_path / "r", data={"random_crop": True, "flip_aug": True,
                                                                          "crop_conditioning": "crop"},
                         train={"max_steps": 4}, **FAST)
    assert _config_check(monkeypatch, capsys, run_file)[0] == 0
    result = train(run_file, callbacks=Callbacks([]))
    assert result.steps == 4


class _CutAfter(Callback):
    """Stops the run right after the state of `step` is written (a kill, in-process)."""

    def __init__(self, step: int) -> None:
        self.every_n_steps = step
        self.step = step

    def on_step(self, ctx) -> None:
        if ctx.progress.step == self.step:
            raise KeyboardInterrupt("cut")


def test_a_resumed_run_draws_the_same_flips_and_crops(tmp_path, world):
    aug = {"data": {"flip_aug": True, "random_crop": True, "crop_conditioning": "crop"},
           "objective": {"timestep_bias_strategy": "later", "timestep_bias_multiplier": 3.0},
           "train": {"max_steps": 4}, **FAST}
    straight = write_run(tmp_path / "a.toml", world, tmp_path / "a", **aug)
    train(straight, callbacks=Callbacks([]))
    cut = write_run(tmp_path / "b.toml", world, tmp_path / "b", **aug)
    with pytest.raises(KeyboardInterrupt):
        train(cut, callbacks=Callbacks([_CutAfter(2)]))
    assert (tmp_path / "b" / "state" / "step-00000002" / "trainer.json").is_file()
    assert not (tmp_path / "b" / "checkpoints" / "last.safetensors").exists()
    assert train(cut, callbacks=Callbacks([])).steps == 4  # resumes at step 2
    a = load_file(tmp_path / "a" / "checkpoints" / "last.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = write_run(tmp_path / "c.toml", world, tmp_path / "c", train={"max_steps": 4}, **FAST)
    train(plain, callbacks=Callbacks([]))
    c = load_file(tmp_path / "c" / "checkpoints" / "last.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the augmentations did change what was trained
